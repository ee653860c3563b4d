"""Read an item's fields from a disk in two halves at once.

The calling thread reads one half of an item's bytes while a helper thread reads the other:
``preadv`` releases the GIL, and two threads copy memory faster than one (on the 2-core VM of
``benchmarks/results/batches.md``: 13.5-16.6 against 9.3-9.8 GB/s over its runs). The fields
are split by size, not one task per field: handing work to a thread costs tens of
microseconds, more than reading a small field, so an item makes one hand-off. Items under
:data:`MIN_SPLIT_BYTES`, and machines with one core, read their fields in turn.

Items whose chunks are copied out of mappings (:mod:`.mapped`) take the same two halves. The
copies are not split across torch's intra-op (OpenMP) threads: that was faster on an idle
machine (1.41x against 1.30x the lean ``.bin`` reader) but collapsed when another process kept
a core busy (0.22-0.30x: an OpenMP team waits at every parallel region for its descheduled
member, ``benchmarks/results/checksums.md`` before this change), where the helper, a thread
that blocks, just runs later.

One helper thread per process (:mod:`arraystore.per_process`: started on first use, and again
in a forked child, where threads do not survive ``fork``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from arraystore.machine import available_cores
from arraystore.per_process import PerProcess
from arraystore.readers.base import FieldReader

MIN_SPLIT_BYTES = 1 << 20
Split = tuple[tuple[int, ...], tuple[int, ...]] | None

_helper = PerProcess(functools.partial(ThreadPoolExecutor, 1,
                                        thread_name_prefix="arraystore-read"))


def split_by_size(sizes: Sequence[int]) -> Split:
    """Indices of ``sizes`` in two groups of nearly equal total (largest first, each to the
    lighter group), the heavier group first; or None when splitting does not pay: under
    :data:`MIN_SPLIT_BYTES` in all, one core, or a group that would be empty."""
    if sum(sizes) < MIN_SPLIT_BYTES or available_cores() < 2:
        return None
    groups: tuple[list[int], list[int]] = ([], [])
    totals = [0, 0]
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        lighter = int(totals[1] < totals[0])
        groups[lighter].append(i)
        totals[lighter] += sizes[i]
    if not groups[1]:
        return None
    heavier = int(totals[1] > totals[0])
    return tuple(groups[heavier]), tuple(groups[1 - heavier])


def read_in_halves(readers: Sequence[FieldReader], sample: int, split: Split) -> list[np.ndarray]:
    """Sample ``sample`` of each of ``readers``, in order: the heavier group of ``split`` read
    on the helper thread while this one reads the lighter group; all read in turn when
    ``split`` is None.

    Building part of the item on this thread while the helper still reads (a callback here
    once did) did not pay: ``ZarrDistillDataset[i]`` against the lean ``.bin`` reader, in two
    interleaved runs, 0.91x and 0.96x with it against 0.89x and 0.92x without, idle, and 0.80x
    and 0.63x against 0.83x and 0.78x with a core busy."""
    if split is None:
        return [reader.read_sample(sample) for reader in readers]
    helpers, mine = split
    pending = _helper.get().submit(
        lambda: [readers[i].read_sample(sample) for i in helpers])
    out: list[np.ndarray | None] = [None] * len(readers)
    try:
        for i in mine:
            out[i] = readers[i].read_sample(sample)
    finally:
        theirs = pending.result()  # waited for even when this half failed
    for i, value in zip(helpers, theirs, strict=True):
        out[i] = value
    return out  # type: ignore[return-value]
