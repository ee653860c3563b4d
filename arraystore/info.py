"""What a store holds: kind, layout, samples committed, and per array its shape, dtype, codecs,
bytes on disk and file count (``arraystore info``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from arraystore.store import COMMITTED_ARRAY, SAMPLE_ARRAY, Store


@dataclass
class ArrayInfo:
    name: str
    shape: list[int]
    dtype: str
    dims: list[str]
    chunks: list[int]
    codecs: str
    bytes_on_disk: int
    files: int


@dataclass
class StoreInfo:
    path: str
    kind: str
    layout: dict[str, Any]
    layout_label: str
    samples: int
    committed: int
    arrays: list[ArrayInfo]
    provenance: dict[str, Any]

    @property
    def bytes_on_disk(self) -> int:
        return sum(a.bytes_on_disk for a in self.arrays)

    @property
    def files(self) -> int:
        return sum(a.files for a in self.arrays)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_on_disk": self.bytes_on_disk, "files": self.files}


def _codec_label(codecs: list[dict[str, Any]]) -> str:
    parts = []
    for codec in codecs:
        if codec["name"] == "sharding_indexed":
            config = codec["configuration"]
            inner = _codec_label(config["codecs"])
            parts.append(f"shard[{inner}]")
        else:
            parts.append(codec["name"])
    return " > ".join(parts)


def disk_usage(directory: Path) -> tuple[int, int]:
    """Bytes and number of files under ``directory``."""
    total = count = 0
    for root, _, files in os.walk(directory):
        for name in files:
            total += os.stat(os.path.join(root, name)).st_size
            count += 1
    return total, count


def store_info(path: str | os.PathLike[str]) -> StoreInfo:
    store = Store.open(path)
    arrays = []
    for name in [*store.schema.names, SAMPLE_ARRAY, COMMITTED_ARRAY]:
        meta = json.loads((store.path / name / "zarr.json").read_text())
        size, files = disk_usage(store.path / name)
        arrays.append(ArrayInfo(
            name=name,
            shape=meta["shape"],
            dtype=meta["data_type"],
            dims=meta.get("dimension_names") or [],
            chunks=meta["chunk_grid"]["configuration"]["chunk_shape"],
            codecs=_codec_label(meta["codecs"]),
            bytes_on_disk=size,
            files=files,
        ))
    return StoreInfo(
        path=str(store.path),
        kind=store.kind,
        layout=store.layout.to_json(),
        layout_label=store.layout.label,
        samples=len(store),
        committed=store.num_committed(),
        arrays=arrays,
        provenance=store.provenance,
    )
