"""What each array of a store must be, given the schema and layout in its group attributes.

A store may come from elsewhere (a bucket someone shares): its group attributes and its arrays'
own metadata are both input. ``Store.open`` refuses a store whose arrays disagree with its
schema (shape, dtype, dimension names, chunk grid, codecs) and whose array folders or metadata
are links or lead outside it, so that no reader sizes a buffer from one and reads the other;
``arraystore verify`` reports the same disagreements, one by one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from arraystore.layout import Layout
from arraystore.schema import SAMPLE_DIM, Field


def expected_codecs(f: Field, layout: Layout) -> list[Any]:
    """Codec names a field's array has in ``layout``: ``[names]``, or a sharding codec's
    ``["sharding_indexed", [inner names]]``."""
    inner = ["vlen-utf8" if f.is_string else "bytes"]
    inner += ["zstd"] if layout.compression == "zstd" else []
    inner += ["crc32c"] if layout.checksum else []
    if f.chunking == "sample" and layout.sharded:
        return ["sharding_indexed", inner]
    return inner


def codec_names(codecs: list[dict[str, Any]]) -> list[Any]:
    if [c["name"] for c in codecs] == ["sharding_indexed"]:
        return ["sharding_indexed", [c["name"] for c in codecs[0]["configuration"]["codecs"]]]
    return [c["name"] for c in codecs]


def disagreements(f: Field, layout: Layout, meta: dict[str, Any]) -> list[str]:
    """How an array's metadata ``meta`` differs from what ``f`` in ``layout`` says it is."""
    try:
        chunk_shape = list(meta["chunk_grid"]["configuration"]["chunk_shape"])
        found = {
            "shape": tuple(meta["shape"][1:]),
            "data_type": meta["data_type"],
            "dimension_names": tuple(meta.get("dimension_names") or ()),
            "chunk_shape": (chunk_shape[0], *chunk_shape[1:]),
            "codecs": codec_names(meta["codecs"]),
        }
    except (KeyError, TypeError, IndexError) as exc:
        return [f"array metadata malformed: lacks {exc}"]
    expected = {
        "shape": f.shape,
        "data_type": "string" if f.is_string else f.dtype,
        "dimension_names": (SAMPLE_DIM, *f.dims),
        "chunk_shape": (layout.samples_per_file(f), *f.shape),
        "codecs": expected_codecs(f, layout),
    }
    return [f"{key} is {found[key]!r}, the schema and layout say {value!r}"
            for key, value in expected.items() if found[key] != value]


def escapes(store_root: Path, path: Path) -> str | None:
    """Why ``path`` must not be read as part of the store at ``store_root`` (a link, or a
    location outside it once links are resolved), or None."""
    if path.is_symlink():
        return f"{path} is a symbolic link"
    real, root = os.path.realpath(path), os.path.realpath(store_root)
    if os.path.commonpath([real, root]) != root:
        return f"{path} resolves to {real}, outside the store"
    return None
