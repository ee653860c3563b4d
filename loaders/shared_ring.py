"""Batch buffers a DataLoader worker reuses, handed to the main process without a fresh segment.

A batch that a worker collates into new shared memory costs a new segment every time: the
kernel zero-fills each of its pages on first write (measured here: 68 ms for a 60 MB batch of 8
SA-1B items, against 10 ms to copy the same bytes into a buffer already mapped), then the segment
crosses as a file descriptor and is mapped again. FFCV's answer is reused page buffers; this is
that for torch's DataLoader.

Each worker keeps a small ring of segments (``memfd``s, so nothing is left in ``/dev/shm`` if a
process dies). A batch's tensors are views of one segment's payload; the batch dict is wrapped
as a :class:`RingBatch`, which the DataLoader's result queue ships (:func:`ship`, registered
with its pickler) as (offset, shape, stride) into the segment instead of sharing the tensors'
storage; any other pickle of it is an ordinary one. The main process maps the segment
(``/proc/<worker>/fd/<n>``) and rebuilds the same dict of ordinary tensors; it keeps the
mapping for the segment's next batches (:class:`_KeptMappings`), so their pages are not
faulted in again. Small tensors of the batch that are not in the segment (counts, flags, a
sample's boxes) travel by value inside the same pickle.

Reuse is safe by a flag in the segment's header: the worker sets it when it ships a batch
to the main process, the main process clears it once every tensor of that batch is gone
(a finalizer on the one array they all share), and the worker reuses a segment only when the
flag is clear and none of its own views are alive. A batch the training loop keeps stays
valid for as long as it is kept: its segment is just not reused. When every segment is held,
or where ``memfd``/``/proc`` are missing (not Linux), a batch goes into fresh shared memory as
before.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import mmap
import multiprocessing
import os
import secrets
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
import torch

from arraystore.per_process import PerProcess

HEADER = 64  # byte 0: held by the main process; bytes 8..24: the segment's token
TOKEN = slice(8, 24)
MAX_SEGMENTS = 8  # per worker: enough for prefetch_factor batches in flight plus a few held


class Segment:
    """One reusable buffer of a worker: an anonymous shared file, mapped once."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.fd = os.memfd_create("arraystore-batch", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, HEADER + nbytes)
        self.map = mmap.mmap(self.fd, HEADER + nbytes)
        self.token = secrets.token_bytes(TOKEN.stop - TOKEN.start)
        self.map[TOKEN] = self.token
        self.local_views = False  # a batch of this process still uses the payload
        self.data_ptr = 0

    def free(self) -> bool:
        """Neither this process nor the main process holds a batch in it."""
        return not self.local_views and self.map[0] == 0

    def payload(self) -> torch.Tensor:
        """The payload as a uint8 tensor; the segment counts as used by this process until
        the tensor and every view of it are gone."""
        array = np.frombuffer(self.map, np.uint8, self.nbytes, HEADER)
        self.local_views = True
        weakref.finalize(array, self._released_here)
        tensor = torch.from_numpy(array)
        self.data_ptr = tensor.untyped_storage().data_ptr()
        return tensor

    def _released_here(self) -> None:
        self.local_views = False

    def close(self) -> None:
        """Unmap and close; the memory goes once the main process has unmapped it too."""
        self.map.close()
        os.close(self.fd)


class _Ring:
    """The segments of this process (a forked child starts with none of its parent's), and
    whether the main process can map them at all (``usable``, decided when the worker's ring
    is first used)."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.usable = _main_process_can_map()

    def buffer(self, nbytes: int) -> torch.Tensor | None:
        fitting = [s for s in self.segments if s.nbytes >= nbytes and s.free()]
        if fitting:
            return min(fitting, key=lambda s: s.nbytes).payload()
        if len(self.segments) >= MAX_SEGMENTS:  # make room: drop a free (too small) one
            smaller = next((s for s in self.segments if s.free()), None)
            if smaller is None:
                return None
            self.segments.remove(smaller)
            smaller.close()
        segment = Segment(nbytes)
        self.segments.append(segment)
        return segment.payload()

    def owner(self, tensor: torch.Tensor) -> Segment | None:
        pointer = tensor.untyped_storage().data_ptr()
        return next((s for s in self.segments if s.local_views and s.data_ptr == pointer), None)


_ring = PerProcess(_Ring)
SUPPORTED = hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")
PROCESS_FDS = "/proc/{pid}/fd"  # where the main process opens a worker's segments


def _main_process_can_map() -> bool:
    """Whether the main process will be able to open this worker's segments, judged before
    the first one is made; if not, one warning, and this worker's batches go into torch's
    own shared memory (correct, a new segment per batch).

    The main process opens ``/proc/<worker>/fd/<n>``, which the kernel allows between two
    processes of one user (ptrace read access) unless a security module or a ``/proc``
    mounted with ``hidepid`` forbids it. Between a process and a worker it started (one
    user, one security context) such rules apply alike both ways, so this worker tries the
    same access to the main process's descriptors."""
    if not SUPPORTED:
        reason = "memfd_create or /proc/self/fd is missing on this system"
    else:
        main = multiprocessing.parent_process()  # None outside a worker: this process maps
        folder = PROCESS_FDS.format(pid=main.pid if main else os.getpid())
        try:
            os.listdir(folder)
            return True
        except OSError as error:
            reason = f"{folder} cannot be read ({error.strerror})"
    warnings.warn(f"DataLoader worker {os.getpid()}: batches cross to the main process in "
                  f"torch's shared memory, a new segment each, not in reused buffers: {reason}",
                  RuntimeWarning, stacklevel=2)
    return False


def worker_buffer(nbytes: int) -> torch.Tensor:
    """``nbytes`` of shared memory for a batch built in a DataLoader worker: a reused segment
    of this worker's ring where one is free, else a fresh shared-memory segment. Wrap the batch
    built on it with :func:`shippable` so it crosses as a reference into the segment."""
    ring = _ring.get()
    reused = ring.buffer(nbytes) if ring.usable else None
    if reused is not None:
        return reused
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))


INLINE_BYTES = 1 << 18  # tensors of a batch outside the ring up to this size cross by value
_NUMPY_DTYPES = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32,
                           torch.int64, torch.float16, torch.float32, torch.float64,
                           torch.complex64, torch.complex128})


class _Inline:
    """A small tensor of a batch that is not in the ring (counts, flags, a sample's boxes),
    carried by value inside the batch's pickle. torch would move each to a new shared-memory
    file and pass its descriptor over a socket (a file, two mappings and a connection per
    tensor); an SA-1B batch has ~20 such tensors. Measured through a DataLoader of the
    mixture benchmark's sources: 1730-1960 items/s before, 2470-2660 after. It crosses as its
    dtype, shape and bytes and unpickles straight into a tensor (contiguous, writable, same
    dtype and values): a NumPy array's own pickle took 4 µs to load, this 2."""

    __slots__ = ("array",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.array = tensor.numpy()

    def __reduce__(self) -> tuple:
        return _inline_tensor, (self.array.dtype.str, self.array.shape, self.array.tobytes())

    @staticmethod
    def fits(tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` can cross as a NumPy array: a small, plain CPU tensor (no
        autograd, no lazy conjugate or negation) of a dtype NumPy has."""
        return (tensor.device.type == "cpu" and tensor.layout == torch.strided
                and not tensor.requires_grad and tensor.dtype in _NUMPY_DTYPES
                and not tensor.is_conj() and not tensor.is_neg()
                and tensor.numel() * tensor.element_size() <= INLINE_BYTES)


def _inline_tensor(dtype: str, shape: tuple[int, ...], raw: bytes) -> torch.Tensor:
    """An :class:`_Inline` tensor again, in the main process, over its own (writable) copy
    of the bytes."""
    return torch.from_numpy(np.frombuffer(bytearray(raw), dtype).reshape(shape))


class _Ref(tuple):
    """A tensor of a ring segment, by position: (segment number, dtype, storage offset, size,
    stride), what crosses the process boundary. A tuple: it unpickles without a call into
    Python (a batch has one per tensor)."""

    __slots__ = ()

    @classmethod
    def of(cls, segment: int, tensor: torch.Tensor) -> _Ref:
        return cls((segment, tensor.dtype, tensor.storage_offset(), tuple(tensor.shape),
                    tensor.stride()))


_PLAIN = frozenset({str, bytes, int, float, bool, type(None)})  # what no swap changes


def _replace(value: Any, swap: Any) -> Any:
    """``value`` with ``swap`` applied to every leaf inside dicts, lists and tuples (rebuilt
    as plain ones). A list or tuple of plain values only (a batch's captions, its
    ``dataset_type``) is taken as it is: a swap changes tensors and references to them, and
    visiting each string cost more than the rest of a small batch's rebuild."""
    if isinstance(value, dict):
        return {k: _replace(v, swap) for k, v in value.items()}
    if type(value) in (list, tuple):
        if _PLAIN.issuperset(map(type, value)):  # one C call, not one a value
            return value
        return type(value)(_replace(v, swap) for v in value)
    return swap(value)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside dicts, lists and tuples, in the order :func:`_replace` visits
    them."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict) or type(value) in (list, tuple):
        for item in value.values() if isinstance(value, dict) else value:
            if type(item) not in _PLAIN:
                yield from _tensors(item)


class RingBatch(dict):
    """A batch dict some of whose tensors are views of ring segments.

    It crosses to the main process by :func:`ship`, which is registered for this class with
    ``multiprocessing``'s ``ForkingPickler`` -- the pickler of a DataLoader's result queue --
    and nowhere else: any other pickle of it (``pickle.dumps``, ``torch.save`` in a worker) is
    of a plain dict of ordinary tensors, self-contained, and holds no segment."""

    def __init__(self, batch: dict[str, Any], segments: list[Segment]) -> None:
        super().__init__(batch)
        self.segments = segments

    def __copy__(self) -> RingBatch:  # a copy in this process: the same views
        return RingBatch(dict(self), self.segments)

    def __deepcopy__(self, memo: dict) -> dict:  # owned copies of every value
        return copy.deepcopy(dict(self), memo)

    def __reduce__(self) -> tuple:
        return dict, (dict(self),)


def ship(batch: RingBatch) -> tuple:
    """``batch`` on its way to the main process (a reducer for ``ForkingPickler``): each
    tensor of a segment as a reference into it, small tensors by value, the segments marked
    held by the main process until it lets go; the main process rebuilds the dict
    (:func:`_rebuild`)."""
    pointers = {s.data_ptr: number for number, s in enumerate(batch.segments)}

    def swap(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            number = pointers.get(value.untyped_storage().data_ptr())
            if number is not None:
                return _Ref.of(number, value)
            # torch's own IPC reduction drops a lazy conjugate or negation (1+2j arrives
            # for 1-2j; torch 2.13): resolved here, a small one then crosses by value
            value = value.resolve_conj().resolve_neg()
            if _Inline.fits(value):
                return _Inline(value)
        return value

    shipped = _replace(dict(batch), swap)
    for segment in batch.segments:
        segment.map[0] = 1
    return _rebuild, (os.getpid(), [(s.fd, s.token, s.nbytes) for s in batch.segments],
                      shipped)


@functools.cache
def _ship_ring_batches() -> None:
    """Register :func:`ship` with the DataLoader queue's pickler, in the worker that makes
    ring batches, when it makes its first: importing this module changes no pickler."""
    ForkingPickler.register(RingBatch, ship)


def shippable(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` as a :class:`RingBatch` if any of its tensors (nested in dicts, lists and
    tuples) lives in a segment of this process's ring, else unchanged."""
    ring = _ring.peek()
    if ring is None or not ring.segments:
        return batch
    owners = (ring.owner(v) for v in _tensors(batch))
    found = list(dict.fromkeys(s for s in owners if s is not None))  # each once, in order
    if not found:
        return batch
    _ship_ring_batches()
    return RingBatch(batch, found)


KEPT_MAPPINGS = 64  # segment mappings the main process keeps between batches, all workers'
SWEEP_EVERY = 32  # batches between checks that the kept segments still belong to their workers


def _open_segment(pid: int, fd: int, token: bytes, nbytes: int) -> tuple[mmap.mmap, tuple]:
    """A worker's segment mapped in this process, and its file's identity (device, inode)."""
    try:
        handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
    except OSError as error:
        raise RuntimeError(
            f"cannot map the batch buffer of DataLoader worker {pid} ({error.strerror}): the "
            "worker exited before its batch was received, or /proc of another process of "
            "this user cannot be opened here") from error
    try:
        mapping = mmap.mmap(handle, HEADER + nbytes)
        status = os.fstat(handle)
    finally:
        os.close(handle)
    if mapping[TOKEN] != token:
        raise RuntimeError(f"the batch buffer of DataLoader worker {pid} was replaced "
                           "before its batch was received")
    return mapping, (status.st_dev, status.st_ino)


class _KeptMappings:
    """The main process's mappings of worker segments, kept from one batch of a segment to the
    next: its page-table entries stay, so reading a batch (a pinning copy, a ``.to(device)``)
    does not fault its pages in again. Measured through a DataLoader of the SA-1B benchmark
    store (2 workers, batch 8, interleaved rounds), the main process reading one byte of every
    page of each batch: mapped anew per batch 611 items/s and 117 minor faults an item, kept
    730 items/s and 13; copying each batch into a reused buffer (what pinning does) 373 -> 404;
    not reading it 719 -> 756.

    A kept mapping holds its segment's memory alive, so mappings of segments their worker has
    dropped (closed, or the worker exited) are let go: checked on every new segment and every
    ``SWEEP_EVERY`` batches, by whether ``/proc/<worker>/fd/<n>`` is still the same file; at
    most ``KEPT_MAPPINGS`` are kept (least recently used go first)."""

    def __init__(self) -> None:
        self.kept: OrderedDict[tuple[int, int, bytes], tuple[mmap.mmap, tuple]] = OrderedDict()
        self.calls = 0
        self.lock = threading.Lock()  # batches arrive on a pin-memory thread too

    def mapping(self, pid: int, fd: int, token: bytes, nbytes: int) -> mmap.mmap:
        """The mapping of the worker ``pid``'s segment ``fd`` whose token is ``token`` (unique
        to that segment, so a kept mapping is of the same memory)."""
        key = (pid, fd, token)
        with self.lock:
            kept = self.kept.pop(key, None)
            self.calls += 1
            if kept is None or self.calls % SWEEP_EVERY == 0:
                self._let_go_of_dropped()
            if kept is None:
                kept = _open_segment(pid, fd, token, nbytes)
            self.kept[key] = kept
            while len(self.kept) > KEPT_MAPPINGS:
                self.kept.popitem(last=False)
            return kept[0]

    def _let_go_of_dropped(self) -> None:
        """Forget the mappings of segments no longer open in their worker (the memory goes
        once no batch of them is alive here either)."""
        for key, (_, identity) in list(self.kept.items()):
            pid, fd, _ = key
            try:
                status = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                del self.kept[key]
                continue
            if (status.st_dev, status.st_ino) != identity:
                del self.kept[key]


def _unmap_kept(kept: _KeptMappings) -> None:
    """Unmap the kept mappings; one a batch still uses stays (until that batch goes)."""
    for mapping, _ in kept.kept.values():
        with contextlib.suppress(BufferError):
            mapping.close()


# in a forked child (a DataLoader worker forked for the next epoch) the parent's kept mappings
# are unmapped: the child would otherwise hold them, and with them the memory of segments whose
# workers are gone, for its whole life
_kept = PerProcess(_KeptMappings, close=_unmap_kept, close_in_child=True)


def _map(pid: int, fd: int, token: bytes, nbytes: int) -> torch.UntypedStorage:
    """In the main process: a worker's segment mapped here, as a storage whose last user
    releases the segment back to the worker."""
    mapping = _kept.get().mapping(pid, fd, token, nbytes)
    array = np.frombuffer(mapping, np.uint8, nbytes, HEADER)
    weakref.finalize(array, _release, mapping)
    return torch.from_numpy(array).untyped_storage()


def _rebuild(pid: int, segments: list[tuple[int, bytes, int]], shipped: dict[str, Any]) -> dict:
    """The batch again, every reference a tensor over its mapped segment."""
    storages = [_map(pid, *segment) for segment in segments]
    typed: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # a segment seen in a dtype

    def swap(value: Any) -> Any:
        if type(value) is not _Ref:
            return value
        segment, dtype, offset, size, stride = value
        whole = typed.get((segment, dtype))
        if whole is None:
            whole = typed[segment, dtype] = torch.empty(0, dtype=dtype).set_(
                storages[segment])
        return whole.as_strided(size, stride, offset)

    return _replace(shipped, swap)


def _release(mapping: mmap.mmap) -> None:
    mapping[0] = 0
