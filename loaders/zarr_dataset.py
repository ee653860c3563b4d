"""``ZarrDistillDataset``: the drop-in replacement of ``BinaryDistillDataset`` over an ``sa1b``
store.

Map-style and picklable: it holds the path, the backend name and the committed index; readers
open lazily in the process that reads (DataLoader workers under fork, spawn or forkserver). Only
committed samples exist for it, and only the fields the item needs are read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset

from arraystore.reader import SampleReader
from arraystore.store import StoreTarget
from loaders.distill_item import ALL_KEYS, collate_distill, distill_item, fields_for

SA1B_KIND = "sa1b"


class ZarrDistillDataset(Dataset):
    """Items of an ``sa1b`` store as the dicts of SEEDS.md 000.

    ``backend``: ``auto`` (direct ``pread`` for uncompressed layouts, TensorStore for compressed
    ones), ``direct``, ``tensorstore`` or ``zarr``. ``keys``: the item keys to return (default:
    all of them); only the store fields those keys need are read. ``path`` may be an
    object-store URL (``s3://bucket/sa1b.zarr``) with its ``storage_options``.
    """

    collate_fn = staticmethod(collate_distill)  # how its items batch (a Mixture uses it)

    def __init__(
        self, path: StoreTarget, backend: str = "auto",
        keys: Sequence[str] = ALL_KEYS, storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.keys = tuple(keys)
        self.reader = SampleReader(path, backend=backend, fields=fields_for(self.keys),
                                   storage_options=storage_options)
        self.reader.expect_kind(SA1B_KIND, "ZarrDistillDataset")
        self.sample_ids = self.reader.sample_ids  # every item names its id: read once, here

    @property
    def path(self) -> str:
        return str(self.reader.path)

    @property
    def backend(self) -> str:
        return self.reader.backend

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return distill_item(self.reader.read(index), self.sample_ids[index], self.keys)
