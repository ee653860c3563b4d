"""A reader without I/O: sample ``i``'s field values are held in memory and copied per read.

It does what every reader must also do -- fill fresh arrays of the item's size, then build the
item dict from them (the same ``distill_item`` the real readers use) -- and nothing else: no
system calls, no files. Single process and through a DataLoader it is the ceiling for items of
this size on this machine; a reader close to it has little left to gain. The samples are
distinct (together larger than the CPU caches), so the copies come from RAM as the page-cache
copies of the real readers do. Values are NumPy arrays: they pickle into DataLoader workers
without one shared-memory file descriptor per tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from loaders.distill_item import distill_item


class InMemoryDataset:
    """Items built from copies of in-memory field values (``values[i]``, ``ids[i]``)."""

    def __init__(self, values: Sequence[Mapping[str, np.ndarray]], ids: Sequence[str]) -> None:
        if len(values) != len(ids):
            raise ValueError(f"{len(values)} samples of values but {len(ids)} ids")
        self.values = [dict(v) for v in values]
        self.ids = list(ids)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> dict[str, Any]:
        fresh = {name: value.copy() for name, value in self.values[index].items()}
        return distill_item(fresh, self.ids[index])
