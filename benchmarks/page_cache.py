"""Reading a store from the disk itself, not from the page cache: for benchmark rows that compare
against a local store larger than the node's memory (a training set usually is).

:func:`evict` drops a folder's pages from the page cache (``posix_fadvise(DONTNEED)``: no root
needed; only clean pages go, so :func:`os.sync` the folder's writes first). A page mapped into a
process stays, so the readers of such a row take :func:`preadv_only` as their DataLoader
workers' ``worker_init_fn`` (arraystore maps a shard's chunks from their second read on).
:func:`resident_fraction` (``mincore``) says how much of the folder is still cached, so a report
can show the eviction worked.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path

import numpy as np

from arraystore.readers.mapped import ENV_SWITCH

PAGE = mmap.PAGESIZE


def _files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and path.stat().st_size]


def evict(root: Path) -> None:
    """Drop every clean page of the files under ``root`` from the page cache."""
    for path in _files(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(root: Path) -> float:
    """The share of the pages of the files under ``root`` that are in the page cache."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    resident = total = 0
    for path in _files(root):
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as view:
            pages = -(-len(view) // PAGE)
            flags = np.zeros(pages, np.uint8)
            pinned = np.frombuffer(view, np.uint8)  # its address; gone before the unmap
            failed = libc.mincore(pinned.ctypes.data, len(view), flags.ctypes.data)
            del pinned
            if failed:
                raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
            resident += int(np.count_nonzero(flags & 1))
            total += pages
    return resident / max(total, 1)


def preadv_only(worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: this worker reads with ``preadv`` and maps no shard, so
    :func:`evict` reaches every page it read."""
    os.environ[ENV_SWITCH] = "0"
