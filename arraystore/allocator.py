"""Keep a CPU model's working memory mapped between its batches (glibc's allocator).

A model run on the CPU allocates and frees tens of megabytes of activations per batch. Between
two batches an ingest decodes, crops and writes; glibc then hands much of the freed memory back
to the kernel (large blocks are mapped one by one and unmapped when freed, and the top of the
heap is trimmed), and the next batch takes it back one 4 KiB page fault at a time: measured on
the 2-core machine of ``benchmarks/results/embeddings.md``, 0.5-0.8 million faults per
SigLIP batch of 32 inside ``ingest coco-embeddings``, ~10% of the model's time (none once the
memory is kept). While :func:`keeping_freed_memory` is entered the
allocator maps no block on its own and trims nothing, so a batch reuses what the one before it
freed.

Leaving it returns the freed memory to the kernel (``malloc_trim``) and sets the allocator to
where glibc's own adjustment ends up after large blocks were freed (blocks from 32 MiB mapped on
their own, the heap trimmed past 64 MiB free): glibc cannot be told to resume adjusting itself.
Elsewhere than glibc (macOS, musl), and in a process whose allocator its user tuned
(``MALLOC_MMAP_THRESHOLD_`` and the like, ``glibc.malloc`` tunables, in the environment it
started with: Dask's workers start with ``MALLOC_TRIM_THRESHOLD_``), this does nothing. It can go
if torch gets a caching CPU allocator of its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Iterator
from pathlib import Path

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
KEEP_FREE_BYTES = 2**31 - 1  # the largest trim threshold an int takes: never trim
TUNED = ("mmap_max", "mmap_threshold", "trim_threshold", "top_pad")  # a user's own choice
AFTER = ((M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 64 << 20))

_lock = threading.Lock()
_depth = 0


def startup_environment() -> dict[str, str]:
    """The environment this process started with, which is what glibc read (Linux keeps it in
    ``/proc/self/environ``; a variable set later, as Dask sets ``MALLOC_TRIM_THRESHOLD_`` for
    the workers it spawns, tuned nothing here); elsewhere the current one."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    return dict(entry.split("=", 1) for entry in raw.decode(errors="replace").split("\0")
                if "=" in entry)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``) and its
    allocator is untuned, else None."""
    environment = startup_environment()
    tunables = environment.get("GLIBC_TUNABLES", "")
    if any(f"MALLOC_{name.upper()}_" in environment or f"glibc.malloc.{name}" in tunables
           for name in TUNED):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "malloc_trim")):
        return None
    return libc


@contextlib.contextmanager
def keeping_freed_memory(active: bool = True) -> Iterator[None]:
    """Within: freed memory stays with the process (see the module docstring); nests, and
    threads may enter it together (the setting is the process's: the last to leave resets
    it). ``active=False`` does nothing, for callers that need it only sometimes."""
    global _depth
    libc = _glibc() if active else None
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREE_BYTES)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for parameter, value in AFTER:
                    libc.mallopt(parameter, value)
                libc.malloc_trim(0)
