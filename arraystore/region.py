"""A window of one sample: a box of ``[start, stop)`` ranges over the per-sample dimensions.

Region reads (``SampleReader.read_region``) take a tuple of slices as NumPy would; this module
turns it into explicit bounds once, so every backend reads the same window and a bad window is
refused with one message instead of being clipped silently, as NumPy slicing would.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
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


def _first_cut_axis(shape: tuple[int, ...], region: Region) -> int:
    """The first axis ``region`` does not take whole (0 where it takes every axis whole)."""
    whole = [r.start == 0 and r.stop == n for r, n in zip(region, shape, strict=True)]
    return whole.index(False) if False in whole else 0


def row_runs(shape: tuple[int, ...], itemsize: int, region: Region) -> list[RowRun]:
    """The byte ranges that hold ``region`` of a C-order array of ``shape``, fewest first.

    Let ``p`` be the first axis the window does not take whole: for each index of the axes
    before it (taken whole), the rows ``region[p]`` with every later axis whole are one
    contiguous range. An image window is then one range of its rows; a (10, h, w) spike
    window ten; a window that takes everything, one range of the whole array. (Plain Python:
    it runs for every window of every clip, and with ``np.ndindex`` listing the ranges took a
    fifth of a spike window's read, profiled.)"""
    p = _first_cut_axis(shape, region)
    row_bytes = math.prod(shape[p + 1:]) * itemsize
    if not region:
        return [RowRun((), 0, row_bytes)]
    rows = region[p].stop - region[p].start
    return [RowRun(prefix, (k * shape[p] + region[p].start) * row_bytes, rows * row_bytes)
            for k, prefix in enumerate(itertools.product(*map(range, shape[:p])))]


def place_rows(out: np.ndarray, run: RowRun, rows: np.ndarray, shape: tuple[int, ...],
               region: Region) -> None:
    """The rows of ``run`` (``rows``: its bytes as an array of the stored dtype) written into
    the window ``out``, the columns ``region`` keeps sliced out where rows are wider."""
    p = len(run.prefix)
    rows = rows.reshape(-1, *shape[p + 1:]) if region else rows.reshape(shape)
    out[run.prefix] = rows[(slice(None), *region[p + 1:])] if region else rows


def place_runs(out: np.ndarray, rows: np.ndarray, shape: tuple[int, ...],
               region: Region) -> None:
    """Every :func:`row_runs` range of a window whose columns are cut (``rows``: one range a
    row, in order, as arrays of the stored dtype) written into the window ``out`` in one
    copy, the columns ``region`` keeps sliced out."""
    p = _first_cut_axis(shape, region)
    stored = rows.reshape(len(rows), -1, *shape[p + 1:])
    out.reshape(len(rows), *out.shape[p:])[...] = stored[(slice(None), slice(None),
                                                          *region[p + 1:])]
