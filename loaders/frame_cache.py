"""A RAM cache of whole decoded frames, bounded in bytes, least recently used out first.

One budget covers the whole loader: a DataLoader with ``n`` workers gives each worker
``budget / n`` (each worker is a process with its own cache), found from
``torch.utils.data.get_worker_info()`` in the process that reads. The cache is created lazily in
that process, so it never crosses a fork or a pickle.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Hashable

import numpy as np
from torch.utils.data import get_worker_info

from arraystore.per_process import PerProcess


class FrameCache:
    """Arrays by key, at most ``capacity`` bytes in all; an array larger than that is not kept."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.nbytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> np.ndarray | None:
        value = self._items.get(key)
        if value is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return value

    def get_or_load(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        """The cached array of ``key``, or ``load()``'s result, kept if it fits."""
        value = self.get(key)
        if value is None:
            value = load()
            self.put(key, value)
        return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        if value.nbytes > self.capacity or key in self._items:
            return
        while self.nbytes + value.nbytes > self.capacity:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes
        self._items[key] = value
        self.nbytes += value.nbytes


def worker_share(total_bytes: int) -> int:
    """This process's part of a loader-wide byte budget: all of it outside DataLoader workers,
    ``total / num_workers`` inside one."""
    info = get_worker_info()
    return int(total_bytes) // (info.num_workers if info is not None else 1)


class ProcessLocalCache:
    """A :class:`FrameCache` per process, sized by :func:`worker_share` when first used."""

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = int(total_bytes)
        self._cache = PerProcess(functools.partial(_worker_cache, self.total_bytes))

    def get(self) -> FrameCache | None:
        """This process's cache, or None when the budget is zero."""
        return self._cache.get() if self.total_bytes > 0 else None


def _worker_cache(total_bytes: int) -> FrameCache:
    return FrameCache(worker_share(total_bytes))
