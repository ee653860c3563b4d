"""What a store holds: kind, layout, samples committed, and per array its shape, dtype, codecs,
bytes on disk and file count (``arraystore info``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from arraystore.regions import pending
from arraystore.store import COMMITTED_ARRAY, SAMPLE_ARRAY, Store, StoreTarget


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
    samples: int  # positions, committed or not
    committed: int
    reserved: int  # positions reserved for units of a distributed ingest still running
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


def store_info(path: StoreTarget, storage_options: Mapping[str, Any] | None = None) -> StoreInfo:
    """What the store at ``path`` (a local path or an object-store URL) holds."""
    store = Store.open(path, storage_options=storage_options)
    arrays = []
    for name in [*store.schema.names, SAMPLE_ARRAY, COMMITTED_ARRAY]:
        meta = json.loads(store.location.read_bytes(f"{name}/zarr.json"))
        size, files = store.location.usage(name)
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
        reserved=sum(r["stop"] - r["start"] for r in pending(store)),
        arrays=arrays,
        provenance=store.provenance,
    )
