"""What each array of a store must be, given the schema and layout in its group attributes.

A store may come from elsewhere (a bucket someone shares): its group attributes and its arrays'
own metadata are both input. ``Store.open`` refuses a store whose arrays disagree with its
schema (any key of their ``zarr.json`` but the descriptions and the sample-axis length) and
whose array folders or metadata are links or lead outside it, so that no reader sizes a buffer
from one and reads the other; ``arraystore verify`` reports the same disagreements, one by one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

IGNORED = ("attributes",)  # descriptions and xarray hints: they change no value read


def disagreements(expected: dict[str, Any], meta: Any) -> list[str]:
    """How an array's metadata ``meta`` (its ``zarr.json``, parsed) differs from ``expected``,
    the metadata this project writes for the field in the store's layout: every key but the
    attributes and the sample-axis length, whole (codecs with their configuration, byte order,
    chunk key encoding, fill value, dimension names), so that no reader sees other values in
    the same bytes than zarr-python, TensorStore or xarray do."""
    if not isinstance(meta, dict):
        return [f"array metadata malformed: a JSON {type(meta).__name__}, not an object"]
    problems = []
    for key in [*expected, *(k for k in meta if k not in expected)]:
        if key in IGNORED:
            continue
        want, found = expected.get(key), meta.get(key)
        if key == "shape":
            if not isinstance(found, list) or not found or not all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in found):
                problems.append(f"shape {found!r} is not a list of sizes")
                continue
            want, found = tuple(want[1:]), tuple(found[1:])
        elif key == "dimension_names" and isinstance(found, list):
            want, found = tuple(want), tuple(found)
        if found != want:
            problems.append(f"{key} is {found!r}, the schema and layout say {want!r}"
                            if key in meta else f"{key} is absent, the schema and layout say "
                                                f"{want!r}")
    return problems


def links_below(store_root: Path) -> list[str]:
    """Every symbolic link anywhere below ``store_root`` (any path component: an array folder,
    ``c``, a chunk's folders, the chunk). A link could lead zarr-python, TensorStore, xarray or
    a writer's appends out of the store. The walk reads directory entries only (their type
    comes with the listing, no ``stat`` a file) and still costs ~40 µs a chunk file here:
    ``verify`` walks, an open checks the array folders, and reads open each file with no
    link allowed on the way (:mod:`arraystore.beneath`)."""
    found: list[str] = []
    folders = [os.fspath(store_root)]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    found.append(entry.path)
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
    return sorted(found)


def escapes(store_root: Path, path: Path) -> str | None:
    """Why ``path`` must not be read as part of the store at ``store_root`` (a link, or a
    location outside it once links are resolved), or None."""
    if path.is_symlink():
        return f"{path} is a symbolic link"
    real, root = os.path.realpath(path), os.path.realpath(store_root)
    if os.path.commonpath([real, root]) != root:
        return f"{path} resolves to {real}, outside the store"
    return None
