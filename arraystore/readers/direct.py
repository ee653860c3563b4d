"""The direct read path: ``pread`` a chunk's bytes straight into a NumPy buffer.

For an uncompressed chunk the bytes on disk *are* the array (little-endian, C order), optionally
followed by a 4-byte crc32c. So reading a sample is: compute the chunk's file, ``pread`` into the
output buffer, check the crc. In the sharded layout the shard's index (offset, length per inner
chunk, at the end of the shard) is read once and cached with the open file; the inner chunk is
then one ``pread`` of its byte range. The bytes read are the bytes zarr-python and TensorStore
decode, so all three backends return identical arrays; the library overhead per chunk is gone.
"""

from __future__ import annotations

import errno
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from crc32c import crc32c

from arraystore.errors import ChecksumMismatchError, StoreFormatError
from arraystore.keys import ChunkPaths
from arraystore.layout import Layout
from arraystore.location import LocalLocation, Location
from arraystore.readers import intra_op
from arraystore.readers.base import Backend, FieldReader, WhileWaiting
from arraystore.readers.halves import Split, read_in_halves, split_by_size
from arraystore.readers.mapped import MappedShard
from arraystore.region import Region, region_shape
from arraystore.schema import Field

CRC_BYTES = 4
EMPTY_INT = 2**64 - 1  # an inner chunk never written: offset and nbytes both
EMPTY = np.uint64(EMPTY_INT)
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


def _codec_names(codecs: list[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in codecs]


def crc_matches(data: Any, stored: bytes) -> bool:
    """Whether ``stored`` (4 bytes, little-endian) is the crc32c of ``data``."""
    return crc32c(data) == int.from_bytes(stored, "little")


def shard_index_bytes(shard_size: int, checksum: bool) -> int:
    """Length of a shard's index: (offset, nbytes) as two uint64 per inner chunk [+ crc32c]."""
    return shard_size * 16 + (CRC_BYTES if checksum else 0)


def parse_shard_index(raw: bytes, size: int | None, shard_size: int, checksum: bool,
                      path: str) -> np.ndarray:
    """The (offset, nbytes) of each inner chunk from ``raw``, the last bytes of a shard of
    ``size`` bytes (None when unknown: fetched as a suffix range; a chunk past the end then
    reads short and is refused then). Raises :class:`StoreFormatError` for a shard too short or
    an index pointing past the data, :class:`ChecksumMismatchError` for an index whose crc32c is
    wrong."""
    index_bytes = shard_index_bytes(shard_size, checksum)
    if len(raw) != index_bytes or (size is not None and size < index_bytes):
        raise StoreFormatError(f"shard {path} is {len(raw) if size is None else size} bytes, "
                               f"too short for its "
                               f"{index_bytes}-byte index")
    if checksum and not crc_matches(raw[:-CRC_BYTES], raw[-CRC_BYTES:]):
        raise ChecksumMismatchError(f"shard {path}: crc32c mismatch in the shard index")
    index = np.frombuffer(raw, "<u8", shard_size * 2).reshape(shard_size, 2)
    if size is not None and ((index[:, 0] != EMPTY)
                             & (index[:, 0] + index[:, 1] > size - index_bytes)).any():
        raise StoreFormatError(f"shard {path}: the index points past the end of the data")
    return index


def read_shard_index(fd: int, shard_size: int, checksum: bool, path: str) -> np.ndarray:
    """:func:`parse_shard_index` of the shard open as ``fd``."""
    index_bytes = shard_index_bytes(shard_size, checksum)
    size = os.fstat(fd).st_size
    raw = os.pread(fd, index_bytes, size - index_bytes) if size >= index_bytes else b""
    return parse_shard_index(raw, size, shard_size, checksum, path)


def read_window(fd: int, base: int, shape: tuple[int, ...], dtype: np.dtype, region: Region,
                what: str) -> np.ndarray:
    """``region`` of the C-order array of ``shape`` stored uncompressed at byte ``base`` of
    ``fd``, reading only the rows the window covers.

    Let ``p`` be the first axis the window does not take whole: for each index of the axes
    before it (taken whole), the rows ``region[p]`` with every later axis whole are one
    contiguous byte range, read with one ``pread``. An image window is then one ``pread`` of
    its rows; a (10, h, w) spike window ten. When the later axes are whole too, the rows land
    straight in the output; otherwise they are sliced out of a reused row buffer.
    """
    out = np.empty(region_shape(region), dtype)
    whole = [r.start == 0 and r.stop == n for r, n in zip(region, shape, strict=True)]
    p = whole.index(False) if False in whole else len(shape)
    if p == len(shape):
        _pread_into(fd, out, base, what)
        return out
    row_bytes = int(np.prod(shape[p + 1:], dtype=np.int64)) * dtype.itemsize
    rest = region[p + 1:]
    direct = all(whole[p + 1:])
    rows = None if direct else np.empty((region[p].stop - region[p].start, *shape[p + 1:]), dtype)
    for k, prefix in enumerate(np.ndindex(*shape[:p])):
        offset = base + (k * shape[p] + region[p].start) * row_bytes
        if direct:
            _pread_into(fd, out[prefix], offset, what)
        else:
            _pread_into(fd, rows, offset, what)
            out[prefix] = rows[(slice(None), *rest)]
    return out


def _pread_into(fd: int, out: np.ndarray, offset: int, what: str) -> None:
    got = os.preadv(fd, [memoryview(out.reshape(-1).view(np.uint8))], offset)
    if got != out.nbytes:
        raise StoreFormatError(f"{what}: the chunk ends after {got} of the {out.nbytes} bytes "
                               f"wanted at byte {offset}")


def fits(out: np.ndarray, dtype: np.dtype) -> bool:
    """Whether the bytes of a chunk of ``dtype`` can be read straight into ``out``."""
    return out.dtype == dtype and out.flags.c_contiguous


def open_chunk(path: str) -> int | None:
    """A descriptor of a chunk (or shard) file, None when it was never written. A link is
    refused: a store from elsewhere could point its chunks at any file (checked for free, by
    the kernel: ``O_NOFOLLOW``)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreFormatError(f"{path} is a symbolic link: chunks are never read through "
                                   f"links (`arraystore verify` lists them)") from exc
        raise


def check_crc(data: memoryview, stored: bytes, field: str, sample: int, path: str) -> None:
    if not crc_matches(data, stored):
        raise ChecksumMismatchError(
            f"crc32c mismatch in field {field!r}, sample {sample}, file {path}: the chunk is "
            f"corrupt (run `arraystore verify` on the store, then re-ingest the sample's source)"
        )


class _DirectFieldReader(FieldReader):
    """What both direct readers know of their field: dtype on disk, chunk paths, checksum."""

    def __init__(self, field: Field, array_dir: Path, checksum: bool) -> None:
        self.field = field
        self.checksum = checksum
        self.dtype = np.dtype(field.dtype).newbyteorder("<")
        self.shape = field.shape
        self.paths = ChunkPaths(array_dir, 1 + len(field.shape))


class ChunkFileReader(_DirectFieldReader):
    """Unsharded chunks of ``per_chunk`` samples, one file each."""

    def __init__(self, field: Field, array_dir: Path, per_chunk: int, checksum: bool) -> None:
        super().__init__(field, array_dir, checksum)
        self.per_chunk = per_chunk

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.field.shape), self.dtype)
        first, last = start // self.per_chunk, (stop - 1) // self.per_chunk
        if first == last and self.per_chunk == 1:  # the hot path: one sample, one chunk
            self._read_chunk(first, out)
            return out
        for index in range(first, last + 1):
            chunk = np.empty((self.per_chunk, *self.field.shape), self.dtype)
            self._read_chunk(index, chunk)
            lo, hi = index * self.per_chunk, (index + 1) * self.per_chunk
            a, b = max(lo, start), min(hi, stop)
            out[a - start: b - start] = chunk[a - lo: b - lo]
        return out

    def read_sample(self, sample: int) -> np.ndarray:
        if self.per_chunk != 1:
            return super().read_sample(sample)
        out = np.empty(self.shape, self.dtype)
        self._read_chunk(sample, out)
        return out

    def read_into(self, sample: int, out: np.ndarray) -> None:
        if self.per_chunk != 1 or not fits(out, self.dtype):
            super().read_into(sample, out)
        else:
            self._read_chunk(sample, out)

    def read_region(self, sample: int, region: Region) -> np.ndarray:
        if self.checksum or self.per_chunk != 1:  # the crc covers the whole chunk
            return super().read_region(sample, region)
        path = self.paths.path(sample)
        fd = open_chunk(path)
        if fd is None:
            return np.zeros(region_shape(region), self.dtype)
        try:
            return read_window(fd, 0, self.field.shape, self.dtype, region,
                               f"field {self.field.name!r}, sample {sample}, file {path}")
        finally:
            os.close(fd)

    def _read_chunk(self, index: int, out: np.ndarray) -> None:
        path = self.paths.path(index)
        fd = open_chunk(path)
        if fd is None:
            out[...] = 0  # a chunk never written holds the fill value
            return
        crc = bytearray(CRC_BYTES) if self.checksum else None
        try:  # a C-contiguous array is itself the buffer preadv fills
            got = os.preadv(fd, [out, crc] if crc else [out], 0)
        finally:
            os.close(fd)
        expected = out.nbytes + (CRC_BYTES if crc else 0)
        if got != expected:
            raise StoreFormatError(
                f"field {self.field.name!r}, chunk {index}, file {path}: {got} bytes, expected "
                f"{expected} (an uncompressed chunk of shape {out.shape})"
            )
        if crc:
            check_crc(memoryview(out.reshape(-1).view(np.uint8)), bytes(crc), self.field.name,
                      index * self.per_chunk, path)


class ShardReader(_DirectFieldReader):
    """Per-sample inner chunks packed ``shard_size`` to a shard file with an index at its end."""

    maps_shards = True  # copy chunks read again out of a mapping (:mod:`.mapped`)

    def __init__(self, field: Field, array_dir: Path, shard_size: int, checksum: bool,
                 index_checksum: bool) -> None:
        super().__init__(field, array_dir, checksum)
        self.shard_size = shard_size
        self.index_checksum = index_checksum
        self.chunk_bytes = field.nbytes + (CRC_BYTES if checksum else 0)
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
        fd = open_chunk(path)
        if fd is None:
            return None
        try:
            index = read_shard_index(fd, self.shard_size, self.index_checksum, path)
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
        out = np.empty((stop - start, *self.shape), self.dtype)
        for sample in range(start, stop):
            self._read_sample(sample, out[sample - start])
        return out

    def read_sample(self, sample: int) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        self._read_sample(sample, out)
        return out

    def _chunk_of(self, sample: int) -> tuple[OpenShard, int, int, int] | None:
        """(its open shard, byte offset, byte count, slot in the shard) of the sample's inner
        chunk; None if never written."""
        shard, slot = divmod(sample, self.shard_size)
        last = self._last
        handle = last[1] if last is not None and last[0] == shard else self._shard(shard)
        if handle is None:
            return None
        offset, nbytes = handle.index[slot]
        if offset == EMPTY_INT and nbytes == EMPTY_INT:
            return None
        return handle, offset, nbytes, slot

    def _uncompressed_chunk(self, sample: int) -> tuple[OpenShard, int, int] | None:
        """(its open shard, byte offset, slot) of the sample's inner chunk, which must be one
        uncompressed sample; None if never written."""
        chunk = self._chunk_of(sample)
        if chunk is None:
            return None
        handle, offset, nbytes, slot = chunk
        if nbytes != self.chunk_bytes:
            raise StoreFormatError(
                f"field {self.field.name!r}, sample {sample}, shard {handle.path}: inner chunk "
                f"of {nbytes} bytes, expected {self.chunk_bytes} (uncompressed)"
            )
        return handle, offset, slot

    def _read_sample(self, sample: int, out: np.ndarray) -> None:
        """The sample's chunk into ``out`` (C-contiguous, the field's dtype): copied out of
        the shard's mapping from its second read on (:mod:`.mapped`), else ``preadv``."""
        located = self._uncompressed_chunk(sample)
        if located is None:
            out[...] = 0
            return
        (fd, _, path, mapped), offset, slot = located
        stored = None if mapped is None else mapped.chunk(slot, offset, self.chunk_bytes)
        if stored is not None:
            intra_op.copy(out, stored[:out.nbytes])
            crc = stored[out.nbytes:].tobytes()
        else:  # a C-contiguous array is itself the buffer preadv fills
            crc_buffer = bytearray(CRC_BYTES if self.checksum else 0)
            got = os.preadv(fd, [out, crc_buffer] if self.checksum else [out], offset)
            if got != self.chunk_bytes:
                raise StoreFormatError(f"field {self.field.name!r}, sample {sample}: shard "
                                       f"{path} ends inside the inner chunk")
            crc = bytes(crc_buffer)
        if self.checksum:
            check_crc(memoryview(out.reshape(-1).view(np.uint8)), crc, self.field.name,
                      sample, path)

    def in_memory(self, sample: int) -> bool | None:
        located = self._uncompressed_chunk(sample)
        if located is None:
            return False
        mapped = located[0].mapped  # None: this reader does not map (MappedShard.open)
        return None if mapped is None else mapped.read_before(located[2])

    def read_into(self, sample: int, out: np.ndarray) -> None:
        if fits(out, self.dtype):
            self._read_sample(sample, out)
        else:
            super().read_into(sample, out)

    def read_region(self, sample: int, region: Region) -> np.ndarray:
        if self.checksum:  # the crc covers the whole inner chunk
            return super().read_region(sample, region)
        located = self._uncompressed_chunk(sample)
        if located is None:
            return np.zeros(region_shape(region), self.dtype)
        (fd, _, path, _), offset, _ = located
        return read_window(fd, offset, self.field.shape, self.dtype, region,
                           f"field {self.field.name!r}, sample {sample}, shard {path}")


class DirectBackend(Backend):
    """Uncompressed chunks read as bytes: ``pread`` on a disk, ranged GETs in an object
    store (:mod:`arraystore.readers.ranged`)."""

    name = "direct"

    def __init__(self, location: Location, layout: Layout,
                 array_json: Mapping[str, bytes] | None = None) -> None:
        super().__init__(location, layout, array_json)
        self._splits: dict[tuple[int, ...], Split] = {}  # by the ids of the readers

    @classmethod
    def supports(cls, field: Field, layout: Layout, location: Location) -> bool:
        """Uncompressed layouts; string fields on a local disk (:mod:`.strings`)."""
        return layout.compression == "none" and (not field.is_string
                                                 or isinstance(location, LocalLocation))

    def open_field(self, field: Field) -> FieldReader:
        from arraystore.readers import ranged, strings  # they build on this module's helpers

        where = self.location.where(field.name)
        meta = self.array_meta(field.name)
        codecs = meta["codecs"]
        local = isinstance(self.location, LocalLocation)
        encoding = "vlen-utf8" if field.is_string else "bytes"
        if _codec_names(codecs) == ["sharding_indexed"]:
            config = codecs[0]["configuration"]
            inner = _codec_names(config["codecs"])
            index = _codec_names(config["index_codecs"])
            if (config.get("index_location", "end") != "end" or inner[0] != encoding
                    or inner[1:] not in ([], ["crc32c"]) or index[1:] not in ([], ["crc32c"])
                    or config["chunk_shape"][0] != 1):
                raise StoreFormatError(f"{where}: unexpected sharding codecs {config}")
            shard_size = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
            crcs = (inner[1:] == ["crc32c"], index[1:] == ["crc32c"])
            if local:
                shards = strings.StringShardReader if field.is_string else ShardReader
                return shards(field, self.location.file(field.name), shard_size, *crcs)
            return ranged.RangedShardReader(field, self.location, shard_size, *crcs)
        names = _codec_names(codecs)
        if names[0] != encoding or names[1:] not in ([], ["crc32c"]):
            raise StoreFormatError(f"{where}: codecs {names} are not an uncompressed layout")
        per_chunk = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        crc = names[1:] == ["crc32c"]
        if local:
            files = strings.StringChunkFileReader if field.is_string else ChunkFileReader
            return files(field, self.location.file(field.name), per_chunk, crc)
        if per_chunk == 1:
            return ranged.RangedFieldReader(field, self.location, crc)
        return ranged.RangedBlockReader(field, self.location, per_chunk, crc)

    def read_fields(self, readers: Sequence[FieldReader], sample: int,
                    while_waiting: WhileWaiting | None = None) -> list[np.ndarray]:
        """One sample of several fields: from an object store as one batch of concurrent ranged
        GETs; from a disk in two halves of the item's bytes at once (:mod:`.halves`; a thread
        per field made items slower on 2 cores, one hand-off per item makes them faster)."""
        if isinstance(self.location, LocalLocation):
            key = tuple(map(id, readers))
            if key not in self._splits:
                self._splits[key] = split_by_size(
                    [r.field.nbytes for r in readers])  # type: ignore[attr-defined]
            return read_in_halves(readers, sample, self._splits[key], while_waiting)
        from arraystore.readers.ranged import fetch_samples

        return fetch_samples(self.location, [(r, sample) for r in readers])
