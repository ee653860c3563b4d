"""The import rules of docs/architecture.md, checked from the source files; and the install is
one package."""

from __future__ import annotations

import ast
import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from arraystore.version import __version__

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_FOLDERS = ("tests", "benchmarks", "scripts")


def folder_of_package() -> dict[str, Path]:
    """Each installed package and its folder, as pyproject.toml maps them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = config["package-dir"]
    folders = {}
    for package in config["packages"]:
        prefix = max((p for p in mapped if package == p or package.startswith(p + ".")), key=len)
        rest = package[len(prefix):].lstrip(".").split(".") if package != prefix else []
        folders[package] = ROOT / mapped[prefix] / Path(*rest)
    return folders


def modules() -> dict[str, Path]:
    """Every module of the installed package by its dotted name."""
    found = {}
    for package, folder in folder_of_package().items():
        for path in folder.glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(module of the package, line) for every import in ``path``, at any depth (inside
    functions too); ``from p import x`` counts as ``p.x`` where that is a module."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name:
                yield target, node.lineno


def layer_rules() -> dict[str, list[str]]:
    """The ``layers`` block of docs/architecture.md: name -> patterns, in order."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```layers block"
    return {name.strip(): patterns.split()
            for name, patterns in (line.split(":", 1) for line in block.group(1).splitlines())}


RULES = layer_rules()
LAYERS = [name for name in RULES if name not in ("apart", "torch")]
KNOWN = modules()


def layer_of(module: str) -> str:
    matches = [layer for layer in LAYERS
               if any(fnmatch.fnmatchcase(module, p) for p in RULES[layer])]
    assert len(matches) == 1, (f"{module} is in layers {matches} of docs/architecture.md; "
                               f"add it to exactly one")
    return matches[0]


def test_every_package_folder_is_installed() -> None:
    """A folder with an ``__init__.py`` under the three source folders is a listed package (a
    sub-package missing from pyproject.toml would be left out of the install)."""
    listed = {folder.resolve() for folder in folder_of_package().values()}
    on_disk = {init.parent.resolve() for top in ("arraystore", "converters", "loaders")
               for init in (ROOT / top).rglob("__init__.py")}
    assert on_disk == listed, (on_disk - listed, listed - on_disk)


def test_every_module_is_in_one_layer() -> None:
    assert len(KNOWN) > 50
    for module in KNOWN:
        layer_of(module)


def test_imports_go_down_the_layers_only() -> None:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    apart = set(RULES["apart"])
    wrong = []
    for module, path in KNOWN.items():
        here = layer_of(module)
        for target, line in imported(module, path, KNOWN):
            there = layer_of(target)
            if rank[there] > rank[here] or (here != there and {here, there} <= apart):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {here} imports {there} "
                             f"({target})")
    assert wrong == []


def test_no_import_cycles() -> None:
    graph = {m: {t for t, _ in imported(m, p, KNOWN)} for m, p in KNOWN.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = [*path[path.index(target):], target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_torch_is_imported_only_where_allowed() -> None:
    wrong = []
    for module, path in KNOWN.items():
        if any(fnmatch.fnmatchcase(module, p) for p in RULES["torch"]):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            wrong += [f"{module}: {n}" for n in names if n.split(".")[0] == "torch"]
    assert wrong == []


def test_nothing_imports_the_folders_by_their_own_names() -> None:
    """``converters`` and ``loaders`` are folders of the repository, not import names: code
    that imports them so would work in the working tree only (and twice over)."""
    pattern = re.compile(r"^\s*(from|import)\s+(converters|loaders)\b", re.M)
    files = [*KNOWN.values(),
             *(p for folder in SCRIPT_FOLDERS for p in (ROOT / folder).rglob("*.py"))]
    offenders = [str(p.relative_to(ROOT)) for p in files if pattern.search(p.read_text())]
    assert offenders == []


def test_a_built_wheel_holds_one_top_level_package(tmp_path: Path) -> None:
    """What ``pip install`` puts into site-packages: ``arraystore`` and its metadata, with the
    converters and loaders inside it."""
    source = tmp_path / "source"  # a copy: setuptools stages the build in the tree it builds
    for folder in ("arraystore", "converters", "loaders"):
        shutil.copytree(ROOT / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                            str(tmp_path), str(source)], capture_output=True, text=True,
                           timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("arraystore-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"arraystore",
                                                f"arraystore-{__version__}.dist-info"}
    for module in ("arraystore/loaders/zarr_dataset.py", "arraystore/converters/sa1b/source.py",
                   "arraystore/kinds/sa1b.py", "arraystore/readers/direct.py"):
        assert module in names
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "= converters." not in entry_points and "= arraystore.converters." in entry_points


def test_one_fork_hook_and_no_process_id_checks() -> None:
    """Per-process state goes through :mod:`arraystore.per_process`, whose fork hook is the only
    one; no module compares process ids to find out whether it was forked."""
    hooks = [m for m, p in KNOWN.items() if "register_at_fork" in p.read_text()]
    assert hooks == ["arraystore.per_process"]
    compared = re.compile(r"[!=]=\s*os\.getpid\(\)|os\.getpid\(\)\s*[!=]=")
    assert [m for m, p in KNOWN.items() if compared.search(p.read_text())] == []


def test_only_location_tells_disk_and_object_store_apart_by_type() -> None:
    """What differs between a disk and an object store (durability, TensorStore's kvstore, the
    lock's place) is asked of the :class:`Location`, not decided by its type elsewhere."""
    by_type = re.compile(r"isinstance\([^)]*,\s*\(?\s*(Local|Object)Location")
    assert [m for m, p in KNOWN.items()
            if m != "arraystore.location" and by_type.search(p.read_text())] == []
