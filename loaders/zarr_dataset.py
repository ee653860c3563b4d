"""``ZarrDistillDataset``: the drop-in replacement of ``BinaryDistillDataset`` over an ``sa1b``
store.

Map-style and picklable: it holds the path, the backend name and the committed index; readers
open lazily in the process that reads (DataLoader workers under fork, spawn or forkserver). Only
committed samples exist for it, and only the fields the item needs are read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from arraystore.kinds.sa1b import KIND
from arraystore.loaders.batched import Batched, Slot, allocate, fill
from arraystore.loaders.distill_item import (
    ALL_KEYS,
    ITEM_KEYS,
    MASKS_SLOT,
    STACKED_SLOTS,
    box_count,
    collate_distill,
    distill_item,
    fields_for,
)
from arraystore.reader import SampleReader
from arraystore.store import StoreTarget


class ZarrDistillDataset(Dataset):
    """Items of an ``sa1b`` store as the dicts of the ``.bin`` reader (docs/formats.md).

    ``backend``: ``auto`` (direct ``pread`` for uncompressed layouts, TensorStore for compressed
    ones), ``direct``, ``tensorstore`` or ``zarr``. ``keys``: the item keys to return (default:
    all of them); only the store fields those keys need are read. ``path`` may be an
    object-store URL (``s3://bucket/sa1b.zarr``) with its ``storage_options``; ``cache_dir``
    and ``cache_limit`` keep what is fetched on the node (:mod:`arraystore.node_cache`).
    """

    collate_fn = staticmethod(collate_distill)  # how its items batch (a Mixture uses it)

    def __init__(
        self, path: StoreTarget, backend: str = "auto",
        keys: Sequence[str] = ALL_KEYS, storage_options: Mapping[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None, cache_limit: int | str | None = None,
    ) -> None:
        self.keys = tuple(keys)
        self.reader = SampleReader(path, backend=backend, fields=fields_for(self.keys),
                                   storage_options=storage_options, cache_dir=cache_dir,
                                   cache_limit=cache_limit, kind=KIND, user="ZarrDistillDataset")
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
        """The item: its fields read (on a disk in two halves at once,
        :mod:`arraystore.readers.halves`), then the dict built."""
        return distill_item(self.reader.read(index), self.sample_ids[index], self.keys)

    def batch_slots(self) -> list[Slot]:
        """The item keys batched by stacking, and the boxes' masks (:data:`MASKS_SLOT`), as
        slots of a batch buffer."""
        return [STACKED_SLOTS[k] for k in self.keys if k in STACKED_SLOTS] + [
            MASKS_SLOT] * (MASKS_SLOT.key in self.keys)

    def __getitems__(self, indices: Sequence[int]) -> Batched:
        """A batch of the ``indices``-th items, read straight into one buffer (shared memory
        in a DataLoader worker; see :mod:`arraystore.loaders.batched`). Equals per-item reads +
        :func:`collate_distill`, which hands it on unchanged; any other ``collate_fn`` gets
        the items."""
        slots = self.batch_slots()
        return self.fill_batch(indices, allocate(self.reader, slots, len(indices)))

    def fill_batch(self, indices: Sequence[int],
                   buffers: Mapping[str, torch.Tensor]) -> Batched:
        """:meth:`__getitems__` into ``buffers`` given (from
        :func:`arraystore.loaders.batched.allocate`, at least ``len(indices)`` rows): how
        :class:`~arraystore.loaders.BatchLoader` reuses them."""
        rest = [k for k in self.keys if k not in STACKED_SLOTS]
        built = [k for k in rest if k != MASKS_SLOT.key]  # by distill_item, item by item
        # the masks come from their slot; the item's count of them from its metadata
        fields = tuple(f for f in fields_for(rest) if f != MASKS_SLOT.field)
        # from an object store: every field of the batch in one round of requests
        filled = fill(self.reader, self.batch_slots(), buffers, indices, also=fields)
        masks = filled.pop(MASKS_SLOT.key, None)
        items = []
        for row, index in enumerate(indices):
            values = self.reader.read(int(index), fields) if fields else {}
            item = distill_item(values, self.sample_ids[int(index)], built)
            if masks is not None:
                item[MASKS_SLOT.key] = masks[row, :box_count(values)]
            items.append(item)
        batch = {**filled, **(collate_distill(items) if rest else {})}
        order = [k for k in ITEM_KEYS if k in self.keys] + ["image_id"] * ("image_id" in rest)
        rows = {k: t.unbind(0) for k, t in filled.items()}  # one call a key, not one a row
        views = [{k: rows[k][row] if k in rows else item[k] for k in order}
                 for row, item in enumerate(items)]
        return Batched(views, batch)
