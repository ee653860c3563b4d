"""No unpickling of data we did not write, no archive extraction, anywhere in the package."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("arraystore", "converters", "loaders", "benchmarks", "scripts")
FORBIDDEN = ("allow_pickle=True", "extractall(", "pickle.load(", "tarfile.TarFile.extract(",
             ".extract(member")


@pytest.mark.parametrize("pattern", FORBIDDEN)
def test_package_code_never_uses(pattern: str) -> None:
    offenders = [str(p.relative_to(ROOT)) for package in PACKAGES
                 for p in (ROOT / package).rglob("*.py") if pattern in p.read_text()]
    assert offenders == [], f"{pattern!r} found in {offenders}"
