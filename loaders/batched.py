"""Batches read straight into one buffer: no per-item arrays, no collate copy.

A batch's fixed-shape fields are *slots* of one buffer (64-byte aligned views; in shared memory
when allocated in a DataLoader worker, pinned when asked): every sample's chunk is ``preadv`` d
into its slot by the direct backend. A slot whose
batch dtype differs from the stored one (edge maps: uint8 stored, float32 in the batch) is read
into a scratch array and converted once, as the per-item path does. The result equals per-item
reads + collate, value for value.

``Batched`` is what a dataset's ``__getitems__`` returns: a list of the items (views into the
batch buffer, so any ``collate_fn`` sees ordinary items) that also carries the collated batch,
which the project's collate functions hand on unchanged -- and so does ``default_collate`` when
the batch is in its format (``default_format``: :class:`PrebatchedItem`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info
from torch.utils.data._utils.collate import collate, default_collate_fn_map

from arraystore.loaders.read_ahead import upcoming
from arraystore.loaders.shared_ring import shippable, worker_buffer
from arraystore.reader import SampleReader

ALIGN = 64
HUGE_PAGE = 2 << 20  # bytes of a transparent huge page on x86-64 and most arm64 kernels


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class Slot:
    """One batched key: the store field read into it, the batch's dtype, and how the stored
    layout ``(n, *field.shape)`` becomes the batch's (a permute, an added axis)."""

    key: str
    field: str
    dtype: torch.dtype
    view: Callable[[torch.Tensor], torch.Tensor] = _same


class Batched(list):
    """The items of a batch (a list, for any ``collate_fn``) and the batch already collated
    (``.batch``, for the collate functions that know it).

    ``default_format``: the batch is exactly what ``default_collate`` makes of the items; the
    items are then :class:`PrebatchedItem` s, and ``default_collate`` (a DataLoader's default
    ``collate_fn``) hands the batch on instead of stacking the items again."""

    def __init__(self, items: Sequence[Mapping[str, Any]], batch: dict[str, Any],
                 default_format: bool = False) -> None:
        if default_format:
            _teach_default_collate()
        super().__init__([PrebatchedItem(i) for i in items] if default_format else items)
        self.batch = batch
        self.default_format = default_format

    def collated(self) -> dict[str, Any]:
        """The batch as a collate function returns it: ready to cross from a DataLoader
        worker by reference into its ring segment (:func:`shippable`). Looked for here, once
        per batch, not for every part of a batch built from parts (a mixture's)."""
        return shippable(self.batch)


class PrebatchedItem(dict):
    """An item of a :class:`Batched` whose batch is ``default_collate``'s own."""


def _collate_prebatched(items: Sequence[PrebatchedItem], *,
                        collate_fn_map: dict | None = None) -> Any:
    """``default_collate`` of :class:`PrebatchedItem` s: the batch already built when ``items``
    is the :class:`Batched` itself, else the items collated as plain dicts."""
    if isinstance(items, Batched):
        return items.collated()
    return collate([dict(item) for item in items], collate_fn_map=collate_fn_map)


def _teach_default_collate() -> None:
    """Register :class:`PrebatchedItem` in ``default_collate``'s map (torch's documented way to
    extend it), in the process that builds such a batch, where its DataLoader collates it:
    importing this module changes nothing of torch's."""
    default_collate_fn_map.setdefault(PrebatchedItem, _collate_prebatched)


def fresh_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` of new memory as a uint8 tensor, in 2 MiB pages where the kernel gives them
    (``MADV_HUGEPAGE``; Linux, else ``torch.empty``); unmapped when the last view of it goes.

    A batch buffer is new memory written once, all of it: with 4 KiB pages each page's first
    write is a fault, and a batch of 8 SA-1B items (60 MB) takes 15,000 of them. Measured here
    in the main process (a DataLoader without workers): ``__getitems__`` 4.3-4.5 ms an item
    into ``torch.empty``, 1.0 ms into huge pages. The size is rounded up to whole huge pages,
    as recent kernels align only such mappings to them; the pages past ``nbytes`` are never
    touched."""
    if not nbytes or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # EINVAL: a kernel built without huge pages
        region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.uint8, count=nbytes)  # keeps region alive


@functools.cache
def torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of NumPy's ``dtype`` (as ``torch.from_numpy`` maps it), looked up once:
    building an empty array to ask costs ~10 µs, paid per slot per batch."""
    return torch.from_numpy(np.empty(0, dtype)).dtype


def allocate_arrays(shapes: Mapping[Hashable, tuple[tuple[int, ...], torch.dtype]], *,
                    pin: bool = False, shared: bool | None = None) -> dict[Any, torch.Tensor]:
    """Tensors of the given shapes and dtypes, all views (64-byte aligned) of one allocation:
    shared memory inside a DataLoader worker (``shared`` None: decide from
    ``get_worker_info``; a segment the worker reuses, see :mod:`arraystore.loaders.shared_ring`),
    page-locked with ``pin``, else :func:`fresh_buffer`. Each is one ``as_strided`` of the
    allocation seen in its dtype: every torch call costs about a microsecond, and a small
    batch's views are a fair part of its fixed cost."""
    layout, total = [], 0
    for key, (shape, dtype) in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        layout.append((key, shape, dtype, total))
        total += -(-nbytes // ALIGN) * ALIGN
    if shared if shared is not None else get_worker_info() is not None:
        buffer = worker_buffer(total)
    elif pin:
        buffer = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    else:
        buffer = fresh_buffer(total)
    buffer = buffer[:total]  # a whole number of every dtype's items: ALIGN is a multiple
    typed: dict[torch.dtype, torch.Tensor] = {}
    arrays = {}
    for key, shape, dtype, start in layout:
        whole = typed.get(dtype)
        if whole is None:
            whole = typed[dtype] = buffer.view(dtype)
        arrays[key] = whole.as_strided(shape, contiguous_strides(shape),
                                       whole.storage_offset() + start // dtype.itemsize)
    return arrays


@functools.cache
def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides, in items, of a C-contiguous array of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def slot_shapes(reader: SampleReader, slots: Sequence[Slot],
                n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Each slot's buffer for ``n`` samples: ``(n, *field.shape)`` in the slot's dtype, as
    :func:`allocate_arrays` takes them."""
    return {slot.key: ((n, *reader.schema[slot.field].shape), slot.dtype) for slot in slots}


def allocate(reader: SampleReader, slots: Sequence[Slot], n: int, *, pin: bool = False,
             shared: bool | None = None) -> dict[str, torch.Tensor]:
    """Buffers for ``n`` samples of each slot, all views of one allocation (see
    :func:`allocate_arrays`)."""
    return allocate_arrays(slot_shapes(reader, slots, n), pin=pin, shared=shared)


def fill(reader: SampleReader, slots: Sequence[Slot], buffers: Mapping[str, torch.Tensor],
         indices: Sequence[int], also: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Read the ``indices``-th committed samples of every slot's field into ``buffers`` (their
    first ``len(indices)`` rows); returns each slot's batch tensor in the batch's layout.

    One thread fills a batch: the parallelism is across batches (DataLoader workers,
    BatchLoader threads); splitting a batch's fields over threads too was no faster here. From
    an object store the batch's chunks, and those of fields ``also`` (read by the caller next),
    are fetched first, all at once, and the next batch's start on the reader's read-ahead
    thread where ``indices`` name it (:mod:`arraystore.loaders.read_ahead`,
    :meth:`SampleReader.fetch_ahead`)."""
    reader.fetch_ahead(indices, [*(slot.field for slot in slots), *also], upcoming(indices))
    n, batch = len(indices), {}
    positions = reader.positions_of(indices)
    for slot in slots:
        target = buffers[slot.key]
        if target.shape[0] != n:
            target = target[:n]
        field = reader.schema[slot.field]
        same = torch_dtype(field.numpy_dtype) == slot.dtype
        rows = target.numpy() if same else np.empty((n, *field.shape), field.numpy_dtype)
        reader.read_rows(positions, slot.field, rows)
        if not same:  # converted by NumPy: torch's intra-op threads cost more than this
            np.copyto(target.numpy(), rows, casting="unsafe")
        batch[slot.key] = slot.view(target)
    return batch
