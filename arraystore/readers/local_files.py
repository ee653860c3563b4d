"""The direct read path: ``pread`` a chunk's bytes straight into a NumPy buffer.

For an uncompressed chunk the bytes on disk *are* the array (little-endian, C order), optionally
followed by a 4-byte crc32c. So reading a sample is: compute the chunk's file, ``pread`` into the
output buffer, check the crc. In the sharded layout the shard's index (offset, length per inner
chunk, at the end of the shard) is read once and cached with the open file; the inner chunk is
then one ``pread`` of its byte range. The bytes read are the bytes zarr-python and TensorStore
decode, so all three backends return identical arrays; the library overhead per chunk is gone.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np

from arraystore.beneath import StoreRoot
from arraystore.chunk_format import (
    CRC_BYTES,
    EMPTY_INT,
    check_crc,
    parse_shard_index,
    shard_index_bytes,
)
from arraystore.errors import ChecksumMismatchError, StoreFormatError
from arraystore.keys import ChunkPaths
from arraystore.private_mappings import private_chunk
from arraystore.readers.base import FieldReader, missing_chunk
from arraystore.readers.mapped import MappedShard, mapped_reads_enabled, worth_mapping
from arraystore.region import Region, place_runs, region_shape, row_runs
from arraystore.schema import Field

OPEN_SHARDS = 32


class OpenShard(NamedTuple):
    """A shard a reader keeps open: its descriptor, (offset, nbytes) of each inner chunk as
    Python ints, its path, and its mapping where shards are mapped (:mod:`.mapped`)."""

    fd: int
    index: list[tuple[int, int]]
    path: str
    mapped: MappedShard | None

    def close(self) -> None:
        """The mapping, then the descriptor."""
        if self.mapped is not None:
            self.mapped.close()
        os.close(self.fd)


def read_shard_index(fd: int, shard_size: int, checksum: bool, path: str,
                     chunk_bytes: int | None) -> np.ndarray:
    """:func:`parse_shard_index` of the shard open as ``fd``."""
    index_bytes = shard_index_bytes(shard_size, checksum)
    size = os.fstat(fd).st_size
    raw = os.pread(fd, index_bytes, size - index_bytes) if size >= index_bytes else b""
    return parse_shard_index(raw, size, shard_size, checksum, path, chunk_bytes)


def read_window(fd: int, base: int, shape: tuple[int, ...], dtype: np.dtype, region: Region,
                what: str) -> np.ndarray:
    """``region`` of the C-order array of ``shape`` stored uncompressed at byte ``base`` of
    ``fd``, reading only the rows the window covers: one ``pread`` per
    :func:`~arraystore.region.row_runs` range (an image window, one; a (10, h, w) spike window,
    ten). Where the window takes the rows whole they land straight in the output; otherwise
    every range is read into one buffer and the window's columns are cut out of all of them
    in one copy (:func:`~arraystore.region.place_runs`), not one NumPy call per range."""
    out = np.empty(region_shape(region), dtype)
    runs = row_runs(shape, dtype.itemsize, region)
    if runs[0].nbytes == out[runs[0].prefix].nbytes:  # the rows whole: no columns cut
        for run in runs:
            _pread_into(fd, out[run.prefix], base + run.offset, what)
        return out
    rows = np.empty((len(runs), runs[0].nbytes // dtype.itemsize), dtype)
    for run, buffer in zip(runs, rows, strict=True):
        _pread_into(fd, buffer, base + run.offset, what)
    place_runs(out, rows, shape, region)
    return out


def _pread_into(fd: int, out: np.ndarray, offset: int, what: str) -> None:
    got = os.preadv(fd, [memoryview(out.reshape(-1).view(np.uint8))], offset)
    if got != out.nbytes:
        raise StoreFormatError(f"{what}: the chunk ends after {got} of the {out.nbytes} bytes "
                               f"wanted at byte {offset}")


def fits(out: np.ndarray, dtype: np.dtype) -> bool:
    """Whether the bytes of a chunk of ``dtype`` can be read straight into ``out``."""
    return out.dtype == dtype and out.flags.c_contiguous


class _DirectFieldReader(FieldReader):
    """What both direct readers know of their field: dtype on disk, chunk paths, checksum."""

    def __init__(self, field: Field, array_dir: Path, checksum: bool) -> None:
        self.field = field
        self.checksum = checksum
        self.dtype = np.dtype(field.dtype).newbyteorder("<")
        self.shape = field.shape
        # the store's root: chunks are opened below it, never through a link (a store from
        # elsewhere could point a chunk, or its folder, at any file)
        self.root = StoreRoot(os.fspath(array_dir.parent))
        self.paths = ChunkPaths(array_dir, 1 + len(field.shape))  # for messages
        self.keys = ChunkPaths(Path(field.name), 1 + len(field.shape))  # below the root


class ChunkFileReader(_DirectFieldReader):
    """Unsharded chunks of ``per_chunk`` samples, one file each. A sample chunk read (and its
    crc32c checked) before in this process is mapped on its next reads, not copied, as a
    sharded store's inner chunk is (:mod:`.mapped`)."""

    def __init__(self, field: Field, array_dir: Path, per_chunk: int, checksum: bool) -> None:
        super().__init__(field, array_dir, checksum)
        self.per_chunk = per_chunk
        self._maps = per_chunk == 1 and worth_mapping(field.nbytes) and mapped_reads_enabled()
        self._read_before = bytearray()  # by sample, where chunks are mapped

    def read(self, start: int, stop: int) -> np.ndarray:
        first, last = start // self.per_chunk, (stop - 1) // self.per_chunk
        if first == last and self.per_chunk == 1:  # the hot path: one sample, one chunk
            return self.read_sample(first)[None]
        out = np.empty((stop - start, *self.field.shape), self.dtype)
        for index in range(first, last + 1):
            fd, path = self._open_chunk(index)
            chunk = np.empty((self.per_chunk, *self.field.shape), self.dtype)
            self._fill(fd, path, index, chunk)
            lo, hi = index * self.per_chunk, (index + 1) * self.per_chunk
            a, b = max(lo, start), min(hi, stop)
            out[a - start: b - start] = chunk[a - lo: b - lo]
        return out

    def read_sample(self, sample: int) -> np.ndarray:
        if self.per_chunk != 1:
            return super().read_sample(sample)
        mapped = self.mapped_sample(sample)
        if mapped is not None:
            return mapped
        fd, path = self._open_chunk(sample)  # its size checked before the buffer is made
        out = np.empty(self.shape, self.dtype)
        self._fill(fd, path, sample, out)
        return out

    def mapped_sample(self, sample: int) -> np.ndarray | None:
        """The sample's chunk file as a private copy-on-write mapping made for this read
        alone (:func:`~arraystore.private_mappings.private_chunk`), where it was read and its
        crc32c checked before in this process; else None."""
        if not self._maps or sample >= len(self._read_before) or \
                not self._read_before[sample]:
            return None
        fd, _ = self._open_chunk(sample)  # its size checked
        try:
            got = private_chunk(fd, 0, self.field.nbytes, self.dtype)
        finally:
            os.close(fd)  # the mapping stays
        return None if got is None else got.reshape(self.shape)

    def read_into(self, sample: int, out: np.ndarray) -> None:
        if self.per_chunk != 1 or not fits(out, self.dtype):
            super().read_into(sample, out)
        else:
            self._fill(*self._open_chunk(sample), sample, out)

    def read_region(self, sample: int, region: Region) -> np.ndarray:
        if self.checksum or self.per_chunk != 1:  # the crc covers the whole chunk
            return super().read_region(sample, region)
        fd, path = self._open_chunk(sample)
        try:
            return read_window(fd, 0, self.field.shape, self.dtype, region,
                               f"field {self.field.name!r}, sample {sample}, file {path}")
        finally:
            os.close(fd)

    def _open_chunk(self, index: int) -> tuple[int, str]:
        """A descriptor of chunk ``index`` and its path, once its size is the size an
        uncompressed chunk of this field has: a missing chunk, or one of another size, is an
        error here, before any buffer is sized from the schema."""
        path = self.paths.path(index)
        fd = self.root.open(self.keys.path(index))
        if fd is None:
            raise missing_chunk(self.field.name, index * self.per_chunk, f"chunk file {path}")
        expected = self.per_chunk * self.field.nbytes + (CRC_BYTES if self.checksum else 0)
        size = os.fstat(fd).st_size
        if size != expected:
            os.close(fd)
            raise StoreFormatError(
                f"field {self.field.name!r}, chunk {index}, file {path}: {size} bytes, "
                f"expected {expected} (an uncompressed chunk of {self.per_chunk} samples of "
                f"shape {self.shape})")
        return fd, path

    def _fill(self, fd: int, path: str, index: int, out: np.ndarray) -> None:
        """Chunk ``index``, open as ``fd``, read into ``out`` (closing ``fd``); its crc checked."""
        crc = bytearray(CRC_BYTES) if self.checksum else None
        try:  # a C-contiguous array is itself the buffer preadv fills
            got = os.preadv(fd, [out, crc] if crc else [out], 0)
        finally:
            os.close(fd)
        expected = out.nbytes + (CRC_BYTES if crc else 0)
        if got != expected:  # shortened since it was opened
            raise StoreFormatError(
                f"field {self.field.name!r}, chunk {index}, file {path}: {got} bytes, expected "
                f"{expected} (an uncompressed chunk of shape {out.shape})"
            )
        if crc:
            check_crc(memoryview(out.reshape(-1).view(np.uint8)), bytes(crc), self.field.name,
                      index * self.per_chunk, path)
        if self._maps:  # read whole and checked: later reads may map it
            if index >= len(self._read_before):
                self._read_before.extend(bytes(index + 1 - len(self._read_before)))
            self._read_before[index] = 1


class ShardReader(_DirectFieldReader):
    """Per-sample inner chunks packed ``shard_size`` to a shard file with an index at its end."""

    maps_shards = True  # copy chunks read again out of a mapping (:mod:`.mapped`)

    def __init__(self, field: Field, array_dir: Path, shard_size: int, checksum: bool,
                 index_checksum: bool) -> None:
        super().__init__(field, array_dir, checksum)
        self.shard_size = shard_size
        self.index_checksum = index_checksum
        self.chunk_bytes = field.nbytes + (CRC_BYTES if checksum else 0)
        # what the index must say of every inner chunk (strings vary: None)
        self.uncompressed_bytes = None if field.is_string else self.chunk_bytes
        # shard -> its OpenShard, LRU; the shard read last is also kept apart, so a run of
        # samples in one shard skips the LRU
        self._open: OrderedDict[int, OpenShard] = OrderedDict()
        self._last: tuple[int, OpenShard] | None = None

    def __del__(self) -> None:
        for handle in self._open.values():
            handle.close()

    def _shard(self, shard: int) -> OpenShard | None:
        cached = self._open.get(shard)
        if cached is not None:
            self._open.move_to_end(shard)
            self._last = (shard, cached)
            return cached
        path = self.paths.path(shard)
        fd = self.root.open(self.keys.path(shard))
        if fd is None:
            return None
        try:
            index = read_shard_index(fd, self.shard_size, self.index_checksum, path,
                                     self.uncompressed_bytes)
        except (StoreFormatError, ChecksumMismatchError) as exc:
            os.close(fd)
            raise type(exc)(f"field {self.field.name!r}, samples from "
                            f"{shard * self.shard_size}: {exc}") from exc
        handle = self._open[shard] = OpenShard(
            fd, [tuple(row) for row in index.tolist()], path,
            MappedShard.open(fd, self.shard_size, self.chunk_bytes) if self.maps_shards
            else None)
        self._last = (shard, handle)  # the newest: never the one evicted below
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)[1].close()
        return handle

    def read(self, start: int, stop: int) -> np.ndarray:
        located = [self._chunk_of(sample) for sample in range(start, stop)]
        out = np.empty((stop - start, *self.shape), self.dtype)
        for k, chunk in enumerate(located):
            self._read_located(start + k, chunk, out[k])
        return out

    def read_sample(self, sample: int) -> np.ndarray:
        """The sample: from its second read on, a private mapping of its inner chunk
        (:meth:`mapped_sample`); else read into a new array."""
        located = self._chunk_of(sample)  # the index checked before the buffer is made
        mapped = self._private(located)
        if mapped is not None:
            return mapped
        out = np.empty(self.shape, self.dtype)
        self._read_located(sample, located, out)
        return out

    def mapped_sample(self, sample: int) -> np.ndarray | None:
        """The sample as a private copy-on-write mapping of its inner chunk, made for this
        read alone (:func:`~arraystore.private_mappings.private_chunk`: writable, and what is
        written stays in it), where the shard is mapped and the chunk was read (and its
        crc32c checked) before in this process; else None."""
        if not self.maps_shards or not worth_mapping(self.chunk_bytes):
            return None  # (not even the shard looked up: most fields of an item are small)
        return self._private(self._chunk_of(sample))

    def _private(self, located: tuple[OpenShard, int, int, int]) -> np.ndarray | None:
        (_, _, _, mapped), offset, _, slot = located
        if mapped is None:
            return None
        got = mapped.private(slot, offset, self.field.nbytes, self.dtype)
        return None if got is None else got.reshape(self.shape)

    def _chunk_of(self, sample: int) -> tuple[OpenShard, int, int, int]:
        """(its open shard, byte offset, byte count, slot in the shard) of the sample's inner
        chunk, whose size the shard's index was checked for when the shard was opened; a
        :class:`MissingChunkError` when the shard or the inner chunk is absent."""
        shard, slot = divmod(sample, self.shard_size)
        last = self._last
        handle = last[1] if last is not None and last[0] == shard else self._shard(shard)
        if handle is None:
            raise missing_chunk(self.field.name, sample, f"shard file {self.paths.path(shard)}")
        offset, nbytes = handle.index[slot]
        if offset == EMPTY_INT:
            raise missing_chunk(self.field.name, sample,
                                f"inner chunk {slot} of shard {handle.path}")
        return handle, offset, nbytes, slot

    def _read_located(self, sample: int, located: tuple[OpenShard, int, int, int],
                      out: np.ndarray) -> None:
        """The sample's chunk, found by :meth:`_chunk_of`, into ``out`` (C-contiguous, the
        field's dtype): copied out of the shard's mapping from its second read on
        (:mod:`.mapped`), else ``preadv``. Its crc32c is checked on the first read in this
        process, the one from the disk; a re-read out of the mapping is a memory copy of the
        bytes checked then, and checking them again would halve a single process's item rate
        (``benchmarks/results/checksums.md``)."""
        (fd, _, path, mapped), offset, _, slot = located
        stored = None if mapped is None else mapped.chunk(slot, offset, self.chunk_bytes)
        if stored is not None:  # read (and its crc32c checked) before, in this process
            np.copyto(out.reshape(-1).view(np.uint8), stored[:out.nbytes])
            return
        # a C-contiguous array is itself the buffer preadv fills
        crc_buffer = bytearray(CRC_BYTES if self.checksum else 0)
        got = os.preadv(fd, [out, crc_buffer] if self.checksum else [out], offset)
        if got != self.chunk_bytes:
            raise StoreFormatError(f"field {self.field.name!r}, sample {sample}: shard "
                                   f"{path} ends inside the inner chunk")
        if self.checksum:
            check_crc(memoryview(out.reshape(-1).view(np.uint8)), bytes(crc_buffer),
                      self.field.name, sample, path)

    def read_into(self, sample: int, out: np.ndarray) -> None:
        if fits(out, self.dtype):
            self._read_located(sample, self._chunk_of(sample), out)
        else:
            super().read_into(sample, out)

    def read_region(self, sample: int, region: Region) -> np.ndarray:
        if self.checksum:  # the crc covers the whole inner chunk
            return super().read_region(sample, region)
        (fd, _, path, _), offset, _, _ = self._chunk_of(sample)
        return read_window(fd, offset, self.field.shape, self.dtype, region,
                           f"field {self.field.name!r}, sample {sample}, shard {path}")
