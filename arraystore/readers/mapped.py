"""Inner chunks copied out of a persistent read-only mapping of their shard.

Why: a chunk in the page cache copies out of a mapping whose pages are already mapped at
user-space ``memcpy`` speed, while ``preadv`` walks the page cache and copies in the kernel.
Measured on the 2-core VM of ``benchmarks/results/batches.md`` (4 MB inner chunks, page cache
warm): ``preadv`` 520-690 µs, a copy out of a mapping already touched 450-520 µs. Timed by
hand, an SA-1B item's fields read by two threads came to 1.8-2.1x the lean ``.bin`` reader
against 1.45-1.76x with ``preadv``; in the interleaved benchmark the whole item gained only
1.04x. FFCV reads its files the same way.

Why not always: the first touch of a mapped page costs a page fault, which made a first copy
~30% slower than ``preadv`` (735-840 µs). So a shard's chunk is read with ``preadv`` the first
time, and out of the mapping from its second read on (one flag per inner chunk); a store read
once, or much larger than the open-shard LRU of its reader, keeps reading with ``preadv``.

Small chunks: under :data:`MIN_MAPPED_CHUNK` a shard is not mapped at all. A copy out of a
mapping costs an ``fstat`` (below) and a copy, two calls that release the GIL where ``preadv`` is
one, and the copy's gain is proportional to the bytes: measured here per read of a warm chunk
(``preadv`` against ``fstat`` + copy) 3.7 against 4.6 µs at 16 KB, 6.9 against 7.1 µs at 64 KB,
21.6 against 18.8 µs at 256 KB, 74 against 62 µs at 1 MB. Reading an SA-1B item's five small
fields (16-64 KB) with ``preadv`` made the item 2-3% faster in three interleaved runs.

Bounds: a mapping lives exactly as long as its shard stays in the reader's LRU of open shards
(:data:`arraystore.readers.direct.OPEN_SHARDS` per field), so mapped bytes are bounded by that;
page tables grow only with the pages touched (~0.2% of them).

Truncation: a copy from a part of a mapping that its file no longer has fails with ``SIGBUS``,
which ends the process. So each copy first checks the file's size (one ``fstat``, ~1 µs): a
shard another program truncated in place is read with ``preadv`` instead, which reports the
short chunk as a clear error. Only a truncation racing with the copy itself gets past that
check. arraystore never truncates in place (it writes a new file and renames it over the old;
a mapping keeps reading the file it mapped, as an open descriptor does). Set
``ARRAYSTORE_MAPPED_READS=0`` to read with ``preadv`` only.

Items: a sample read on its own (``SampleReader.read``, ``ZarrDistillDataset[i]``) is not
copied at all from its second read on. It is handed out as a private copy-on-write mapping of
its inner chunk (in the raw layout, of its chunk file) made for that read alone
(:mod:`arraystore.private_mappings`): the array is writable, a write to it copies the page it
lands on and reaches neither the file nor any other read of the sample, as with a copy (and
as ``torch.load(mmap=True)`` hands out tensors). Its pages are the page cache's until
written, so the bytes are read once, by whoever uses them. What that is worth once the caller
uses every byte: a hand probe on the 2-core VM (SA-1B item, 7.5 MB, page cache warm) measured
305 µs for a mapping per read + use against 460 µs for ``pread`` + use, but in
``benchmarks.batches``, through the item dict and interleaved with the other readers, the two
come out even (0.93-0.99x): the bytes leave memory once either way. A mapping kept
per shard could not be handed out: two reads of one sample would share its pages, and one
caller's in-place write would show in the other's item. The same truncation caveat applies,
now also while the caller holds the array: arraystore never truncates a shard in place, but
another program that truncates one (``cp`` over it) ends a process still holding such an
array with ``SIGBUS``, as it would one holding a ``numpy.memmap``. Each mapping counts
against the kernel's limit of mappings per process (``vm.max_map_count``), so at most
:data:`~arraystore.private_mappings.PRIVATE_MAPPINGS` are out at once; past that, reads
copy.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from arraystore.private_mappings import private_chunk

ENV_SWITCH = "ARRAYSTORE_MAPPED_READS"
MIN_MAPPED_CHUNK = 1 << 17  # bytes of an inner chunk; smaller ones are read with preadv


def worth_mapping(chunk_bytes: int) -> bool:
    """Whether inner chunks of ``chunk_bytes`` are large enough to be mapped."""
    return chunk_bytes >= MIN_MAPPED_CHUNK


def mapped_reads_enabled() -> bool:
    """Whether shards are mapped (the default), unless the environment says ``0``/``no``."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "no", "false", "off")


class MappedShard:
    """One shard mapped read-only, whole, and which of its inner chunks were read before."""

    def __init__(self, fd: int, size: int, inner_chunks: int) -> None:
        self._fd = fd  # the shard's descriptor, owned by its reader
        self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        self._bytes = np.frombuffer(self._map, np.uint8)  # read-only, as the pages are
        self._read_before = bytearray(inner_chunks)

    @classmethod
    def open(cls, fd: int, inner_chunks: int, chunk_bytes: int) -> MappedShard | None:
        """A mapping of the shard open as ``fd``, whose inner chunks are ``chunk_bytes`` long;
        None where mapped reads are switched off, the chunks are under
        :data:`MIN_MAPPED_CHUNK` or the file system cannot map the file (reads then stay with
        ``preadv``)."""
        if not worth_mapping(chunk_bytes) or not mapped_reads_enabled():
            return None
        try:
            return cls(fd, os.fstat(fd).st_size, inner_chunks)
        except (OSError, ValueError):
            return None

    def chunk(self, slot: int, offset: int, nbytes: int) -> np.ndarray | None:
        """The ``nbytes`` mapped bytes of inner chunk ``slot`` at byte ``offset``, to copy
        from at once (no view may outlive the shard's stay in the LRU), if the chunk was read
        before; else None (read it with ``preadv``), and it now counts as read. A range past
        the end of the mapping, or of the file now, is None too."""
        if not self._read_before[slot]:
            self._read_before[slot] = 1
            return None
        if not self._within(offset + nbytes):
            return None
        return self._bytes[offset:offset + nbytes]

    def private(self, slot: int, offset: int, nbytes: int,
                dtype: np.dtype) -> np.ndarray | None:
        """Inner chunk ``slot`` (``nbytes`` at byte ``offset``) as a 1-d ``dtype`` array of a
        private mapping of its own (:func:`private_chunk`), if the chunk was read before and
        the file still holds it; else None (copy it: :meth:`chunk` then marks a first read)."""
        if not self._read_before[slot] or not self._within(offset + nbytes):
            return None
        return private_chunk(self._fd, offset, nbytes, dtype)

    def _within(self, end: int) -> bool:
        """Whether byte ``end`` is inside the mapping and the file (one ``fstat``)."""
        return end <= len(self._bytes) and end <= os.fstat(self._fd).st_size

    def close(self) -> None:
        """Unmap (no view of the mapping outlives a copy)."""
        self._bytes = np.empty(0, np.uint8)
        self._map.close()
