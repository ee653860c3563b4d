"""Private copy-on-write mappings of file ranges that hold no descriptor.

What a mapping is for: handing out a file's bytes (a store's chunk, a node-local cache entry)
as the page cache's pages rather than a copy. The mapping is private, made with ``PROT_READ |
PROT_WRITE`` and ``MAP_PRIVATE``: an array of it is writable, and a write copies the page it
lands on, reaching neither the file nor any other mapping. It is made with the C library's
``mmap`` because Python's ``mmap`` keeps a duplicate descriptor per mapping, which thousands of
mappings held at once would exhaust; it is unmapped when the last array made from it is
collected.

Each mapping counts against the kernel's limit of mappings per process (``vm.max_map_count``),
which malloc and every library share, so at most :data:`PRIVATE_MAPPINGS` (or a quarter of that
limit) are out at once; past that, :func:`private_chunk` says no and the caller copies. A file
truncated in place under a mapping ends a process that then reads past the new end with
``SIGBUS``: arraystore writes new files and renames them, and says so where it hands mappings
out.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import threading

import numpy as np

from arraystore.per_process import PerProcess

PRIVATE_MAPPINGS = 16384


class PrivateMapping:
    """One mapping (see the module docstring), exposed to NumPy by its address."""

    def __init__(self, libc: ctypes.CDLL, address: int, length: int) -> None:
        self._munmap, self._address, self._length = libc.munmap, address, length
        self._release = _released  # held: module globals may be gone when this goes
        self.__array_interface__ = {"data": (address, False), "shape": (length,),
                                    "typestr": "|u1", "version": 3}

    def __del__(self) -> None:
        self._munmap(self._address, self._length)
        self._release()


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library's ``mmap`` and ``munmap``, typed; None where there is no such library."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long)
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    except (OSError, AttributeError, TypeError):  # no C library to load by name
        return None
    return libc


_MAP_FAILED = ctypes.c_void_p(-1).value
_out = 0  # private mappings alive in this process
_out_lock = PerProcess(threading.Lock)  # a forked child's own (another thread may hold it)


@functools.cache
def _private_limit() -> int:
    """:data:`PRIVATE_MAPPINGS`, or a quarter of the kernel's ``vm.max_map_count`` if less."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return min(PRIVATE_MAPPINGS, int(f.read()) // 4)
    except (OSError, ValueError):
        return PRIVATE_MAPPINGS


def _released() -> None:
    global _out
    with _out_lock.get():
        _out -= 1


def private_chunk(fd: int, offset: int, nbytes: int, dtype: np.dtype) -> np.ndarray | None:
    """``nbytes`` of ``fd`` at byte ``offset`` as a writable 1-d ``dtype`` array backed by a
    private copy-on-write mapping made for it alone, unmapped when the last array using it is
    collected. None (copy instead) where the bytes would be misaligned for ``dtype``, where
    :func:`_private_limit` mappings are out already, or where the kernel (or the platform)
    refuses a mapping."""
    global _out
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    if (offset - start) % dtype.alignment:
        return None
    libc = _libc()
    if libc is None:
        return None
    with _out_lock.get():
        if _out >= _private_limit():
            return None
        _out += 1
    length = offset + nbytes - start
    address = libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd,
                        start)
    if address is None or address == _MAP_FAILED:
        _released()
        return None
    pages = np.asarray(PrivateMapping(libc, address, length))
    return pages[offset - start:].view(dtype)
