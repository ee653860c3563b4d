"""A window of one sample: a box of ``[start, stop)`` ranges over the per-sample dimensions.

Region reads (``SampleReader.read_region``) take a tuple of slices as NumPy would; this module
turns it into explicit bounds once, so every backend reads the same window and a bad window is
refused with one message instead of being clipped silently, as NumPy slicing would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

Region = tuple[slice, ...]


def normalize_region(region: Sequence[slice], shape: tuple[int, ...], what: str) -> Region:
    """``region`` as one ``slice(start, stop)`` per dimension of ``shape`` (missing trailing
    dimensions are taken whole). Steps other than 1, empty or out-of-bounds ranges raise
    :class:`ValueError` naming ``what``."""
    region = tuple(region)
    if len(region) > len(shape):
        raise ValueError(f"{what}: a region of {len(region)} slices for a per-sample shape "
                         f"{shape}")
    bounds = []
    for axis, size in enumerate(shape):
        part = region[axis] if axis < len(region) else slice(None)
        if not isinstance(part, slice) or part.step not in (None, 1):
            raise ValueError(f"{what}: region axis {axis} must be a slice with step 1, got "
                             f"{part!r}")
        start = 0 if part.start is None else int(part.start)
        stop = size if part.stop is None else int(part.stop)
        if not 0 <= start < stop <= size:
            raise ValueError(f"{what}: region axis {axis} is [{start}, {stop}), outside the "
                             f"sample's extent [0, {size}) or empty")
        bounds.append(slice(start, stop))
    return tuple(bounds)


def region_shape(region: Region) -> tuple[int, ...]:
    return tuple(part.stop - part.start for part in region)


class RowRun(NamedTuple):
    """One contiguous byte range of a window's rows: where its values go in the window
    (``prefix``: the indices of the axes taken whole before the first axis that is not), and
    its ``offset`` and ``nbytes`` in the stored C-order array."""

    prefix: tuple[int, ...]
    offset: int
    nbytes: int


def row_runs(shape: tuple[int, ...], itemsize: int, region: Region) -> Iterator[RowRun]:
    """The byte ranges that hold ``region`` of a C-order array of ``shape``, fewest first.

    Let ``p`` be the first axis the window does not take whole: for each index of the axes
    before it (taken whole), the rows ``region[p]`` with every later axis whole are one
    contiguous range. An image window is then one range of its rows; a (10, h, w) spike
    window ten; a window that takes everything, one range of the whole array."""
    whole = [r.start == 0 and r.stop == n for r, n in zip(region, shape, strict=True)]
    p = whole.index(False) if False in whole else 0
    row_bytes = int(np.prod(shape[p + 1:], dtype=np.int64)) * itemsize
    rows = region[p].stop - region[p].start if region else 1
    for k, prefix in enumerate(np.ndindex(*shape[:p])):
        start = (k * shape[p] + region[p].start) * row_bytes if region else 0
        yield RowRun(prefix, start, rows * row_bytes)


def place_rows(out: np.ndarray, run: RowRun, rows: np.ndarray, shape: tuple[int, ...],
               region: Region) -> None:
    """The rows of ``run`` (``rows``: its bytes as an array of the stored dtype) written into
    the window ``out``, the columns ``region`` keeps sliced out where rows are wider."""
    p = len(run.prefix)
    rows = rows.reshape(-1, *shape[p + 1:]) if region else rows.reshape(shape)
    out[run.prefix] = rows[(slice(None), *region[p + 1:])] if region else rows
