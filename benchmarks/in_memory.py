"""A reader without I/O: sample ``i``'s field values are held in memory and copied per read.

It does what every reader must also do -- fill fresh arrays of the item's size, then build the
item dict from them (the same ``distill_item`` the real readers use) -- and nothing else: no
system calls, no files. Single process and through a DataLoader it is the ceiling for items of
this size on this machine; a reader close to it has little left to gain. The samples are
distinct (together larger than the CPU caches), so the copies come from RAM as the page-cache
copies of the real readers do. Values are NumPy arrays: they pickle into DataLoader workers
without one shared-memory file descriptor per tensor.

``halves=True`` copies an item the way the direct backend reads one from a disk, with the same
code (:func:`arraystore.readers.halves.read_in_halves`): two halves of its fields by size at
once, the keys of the calling thread's half built while the helper thread still copies. That
is the ceiling of ``ZarrDistillDataset[i]``: the same threads and the same dict, with memory
copies in place of ``preadv`` and mapped copies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from arraystore.loaders.distill_item import distill_item
from arraystore.readers.base import FieldReader
from arraystore.readers.halves import read_in_halves, split_by_size


class HeldField(FieldReader):
    """One field's values held in memory, one array per sample; a read is a fresh copy."""

    def __init__(self, values: Sequence[np.ndarray]) -> None:
        self.values = values

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.stack(self.values[start:stop])

    def read_sample(self, sample: int) -> np.ndarray:
        out = np.empty_like(self.values[sample])
        np.copyto(out, self.values[sample])
        return out


class InMemoryDataset:
    """Items built from copies of in-memory field values (``values[i]``, ``ids[i]``), one
    field after another, or with ``halves`` two halves of the fields at once."""

    def __init__(self, values: Sequence[Mapping[str, np.ndarray]], ids: Sequence[str],
                 halves: bool = False) -> None:
        if len(values) != len(ids):
            raise ValueError(f"{len(values)} samples of values but {len(ids)} ids")
        self.values = [dict(v) for v in values]
        self.ids = list(ids)
        self.names = list(self.values[0]) if self.values else []
        self.fields = [HeldField([v[name] for v in self.values]) for name in self.names]
        self.split = (split_by_size([v.nbytes for v in self.values[0].values()])
                      if halves and self.values else None)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.split is None:
            fresh = {name: value.copy() for name, value in self.values[index].items()}
            return distill_item(fresh, self.ids[index])
        copies = read_in_halves(self.fields, index, self.split)
        return distill_item(dict(zip(self.names, copies, strict=True)), self.ids[index])
