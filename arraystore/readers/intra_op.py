"""Memory copies split across torch's intra-op threads, for items already in memory.

Why: once an item's inner chunks are mapped and were read before (:mod:`.mapped`), reading it
is a few copies of megabytes, and what limits them is how they are spread over the cores.
Measured on the 2-core VM of ``benchmarks/results/batches.md``: a 4 MiB chunk out of a warm
mapping, NumPy's one-thread copy 275 µs against torch's ``copy_`` on its two intra-op threads
167 µs (and torch's is faster from 64 KiB up); two 4 MiB chunks, one on the calling thread and
one handed to a helper thread (:mod:`.halves`), ~525 µs (the helper starts ~50 µs after the
hand-off, the caller resumes ~60 µs after the helper is done) against ~355 µs for torch
copying both in turn. torch's OpenMP threads split each copy with no Python, no GIL and no
sleeping thread to wake in between. An SA-1B item: 1.41-1.44x the lean ``.bin`` reader
against 1.30-1.36x in two halves, in the same runs of ``benchmarks/batches.py``.

Who copies this way: only a thread inside :func:`parallel_copies` (one reading a whole item
out of memory, :func:`.halves.read_in_halves`), and only where the process has torch loaded
already (arraystore never imports it: 1-2 s) with two or more intra-op threads (DataLoader
workers have one). Other threads (a ``BatchLoader``'s readers, the halves' helper) keep
NumPy's copy: each thread entering torch's parallel regions brings its own team of OpenMP
threads onto the same cores.

Never in a forked child: GNU OpenMP (torch's on Linux) does not survive ``fork``, and a child
entering a parallel region after its parent used one hangs (checked here with a plain
``copy_`` of 4 MiB). A forked child reads its items in two halves instead; children started
by ``spawn`` or ``forkserver`` (fresh interpreters) copy in parallel again.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

_local = threading.local()
_forked = False  # this process is a forked child (of a process that had imported this module)


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def torch_threads() -> int:
    """torch's intra-op threads this process may split copies across: 1 where torch is not
    loaded or in a forked child, else ``torch.get_num_threads()``."""
    torch = sys.modules.get("torch")
    return 1 if torch is None or _forked else torch.get_num_threads()


@contextmanager
def parallel_copies() -> Iterator[None]:
    """Within it, :func:`copy` on this thread splits copies across torch's intra-op threads
    (torch must be loaded: see :func:`torch_threads`)."""
    before = copies_in_parallel()
    _local.on = True
    try:
        yield
    finally:
        _local.on = before


def copies_in_parallel() -> bool:
    """Whether :func:`copy` on this thread uses torch's intra-op threads."""
    return getattr(_local, "on", False)


def copy(dst: np.ndarray, src: np.ndarray) -> None:
    """``src`` into ``dst`` (both C-contiguous, the same number of bytes, ``src`` writable or
    made so by :func:`writable_view`): by torch's intra-op threads inside
    :func:`parallel_copies`, else by NumPy."""
    dst, src = dst.reshape(-1).view(np.uint8), src.reshape(-1).view(np.uint8)
    if copies_in_parallel():
        torch = sys.modules["torch"]  # parallel_copies is only entered with torch loaded
        torch.from_numpy(dst).copy_(torch.from_numpy(src))
    else:
        np.copyto(dst, src)


class _WritableFlag:
    """Exposes the memory of a read-only array through the array interface, flagged
    writable, and keeps that array (and what it holds) alive."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.__array_interface__ = {"data": (array.ctypes.data, False), "shape": array.shape,
                                    "typestr": array.dtype.str, "version": 3}


def writable_view(array: np.ndarray) -> np.ndarray:
    """A view of the read-only C-contiguous ``array`` flagged writable, so that torch takes
    it as a copy's source without its "not writable" warning (issued once per process, so
    silencing it would hide it from the user's own arrays). Nothing writes through it; over a
    ``PROT_READ`` mapping a write would fault, never reach the file."""
    return np.asarray(_WritableFlag(array))
