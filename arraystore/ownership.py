"""Commands never destroy what they do not own.

A read-only command (``show``, ``export``) writes its output outside every store: a PNG or an
exported folder inside a store would overwrite its files (``show -o store.zarr/zarr.json``
replaced the group's metadata) or add foreign files to it. ``--overwrite`` deletes the old store
before writing the new one, so it refuses while any input lies inside that store. Both checks
are for local paths, all links resolved; an object store's keys cannot be reached through a
local path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from arraystore.errors import OptionError
from arraystore.location import is_url
from arraystore.store import is_store


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(path))


def enclosing_store(path: str | os.PathLike[str]) -> Path | None:
    """The store that ``path`` is, or lies inside (links resolved), or None."""
    real = _real(path)
    for candidate in (real, *real.parents):
        if (candidate / "zarr.json").is_file() and is_store(candidate):
            return candidate
    return None


def refuse_output_inside_store(out: str | os.PathLike[str], command: str) -> None:
    """Refuse ``out`` when it is a store or lies inside one, naming both."""
    if is_url(out):
        return
    store = enclosing_store(out)
    if store is not None:
        raise OptionError(f"{command}: the output {out} is inside the store {store}; a command "
                          f"that reads a store never writes into one: choose an output outside "
                          f"it (e.g. beside it)")


def refuse_inputs_inside(out: str | os.PathLike[str],
                         inputs: Sequence[str | os.PathLike[str]]) -> None:
    """Before ``--overwrite`` deletes ``out``: refuse if any input lies inside it."""
    if is_url(out) or not Path(out).exists():
        return
    store = _real(out)
    for item in inputs:
        if not is_url(item) and _real(item).is_relative_to(store):
            raise OptionError(f"--overwrite would delete the input {item}, which lies inside "
                              f"{out}; move the input out of it or choose another --out")
