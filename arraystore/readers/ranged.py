"""The direct read path in an object store: ranged GETs where a disk has ``pread``.

The same bytes as :mod:`arraystore.readers.local_files` reads, fetched over HTTP: a per-sample chunk
is one GET of its object; in the sharded layout a shard's index (the last bytes of the shard
object, one suffix-range GET) is fetched once and cached, then each sample is one ranged GET of
its inner chunk. Every request of one item (all its fields, and the indexes of shards not seen
yet) is issued at once, concurrently (:func:`fetch_samples`), so an item costs about
one round trip, not one per field. A chunk's declared size comes from the schema, never from the
store: a shard index pointing elsewhere yields an error, not a large allocation.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from arraystore.chunk_format import (
    CRC_BYTES,
    EMPTY,
    check_crc,
    crc_matches,
    decode_vlen_utf8,
    parse_shard_index,
    shard_index_bytes,
    string_array,
    without_crc,
)
from arraystore.errors import ObjectChangedError, StoreFormatError
from arraystore.keys import ChunkPaths
from arraystore.location import ObjectLocation
from arraystore.node_cache import CachedRange
from arraystore.readers.base import FieldReader, missing_chunk
from arraystore.region import Region, RowRun, place_rows, region_shape, row_runs
from arraystore.schema import Field

CACHED_INDEXES = 256
# the largest GET that joined ranges make: a GET's bytes come over one connection, and an S3
# connection carries ~100 MB/s, so two neighbouring 3 MB chunks arrive sooner as two GETs in
# parallel than as one of 6 MB; at 4 MB a GET's transfer takes about two round trips (20 ms
# each). Measured in the loopback region (DataLoader of 2 workers, 48 SA-1B items, probes):
# batches over one shard at a time 79-81 items/s with 64 MB, 101-108 with 4 MB
COALESCE_BYTES = 4 << 20
SEPARATE_RUNS = 16  # a window of more row ranges than this is fetched as the span they cover
MAX_STRING_CHUNK = 16 << 20  # the largest string chunk fetched (a caption is bytes to kilobytes)

Request = tuple[str, int, int]  # key, start, stop (start < 0: the last -start bytes)
T = TypeVar("T")
Cuts = list[tuple[RowRun, int, int]]  # a window's row ranges: (rows, answer number, offset in it)


class RangedFieldReader(FieldReader):
    """One field of a store in an object store, read by ranged GETs.

    Reading one sample is two steps, so that :class:`RangedBackend` can batch the requests of
    several fields: :meth:`request` (what to fetch) and :meth:`decode` (the fetched bytes as
    the sample's array; a chunk that is not there is a :class:`MissingChunkError`)."""

    def __init__(self, field: Field, location: ObjectLocation, checksum: bool) -> None:
        self.field = field
        self.location = location
        self.checksum = checksum
        self.dtype = np.dtype(field.dtype).newbyteorder("<")
        self.keys = ChunkPaths(Path(field.name), 1 + len(field.shape))
        self.chunk_bytes = field.nbytes + (CRC_BYTES if checksum else 0)

    def missing_indexes(self, sample: int) -> list[tuple[int, Request]]:
        """Shard indexes :meth:`request` needs that are not cached: (shard, request)."""
        return []

    def store_index(self, shard: int, raw: bytes | None) -> None:
        """Cache a shard index fetched for :meth:`missing_indexes`."""

    def forget(self, keys: Collection[str]) -> None:
        """Drop what is cached of objects ``keys`` (they were replaced): shard indexes."""

    def request(self, sample: int) -> Request:
        return self.keys.path(sample), 0, self.chunk_bytes

    def decode(self, sample: int, request: Request, data: bytes | None) -> np.ndarray:
        where = self.location.where(request[0])
        if data is None:
            raise missing_chunk(self.field.name, sample, where)
        if len(data) != self.chunk_bytes:  # checked before the buffer is made
            raise StoreFormatError(f"field {self.field.name!r}, sample {sample}, {where}: "
                                   f"{len(data)} bytes fetched, expected {self.chunk_bytes} "
                                   f"(an uncompressed chunk)")
        out = _array_of(data, self.field.nbytes, self.dtype).reshape(self.field.shape)
        view = memoryview(out.reshape(-1).view(np.uint8))
        if self.checksum:
            check_crc(view, bytes(data[-CRC_BYTES:]), self.field.name, sample,
                      self.location.where(self.keys.path(sample)))
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        samples = list(range(start, stop))
        return np.stack(fetch_samples(self.location, [(self, s) for s in samples]))

    def read_region(self, sample: int, region: Region) -> np.ndarray:
        """The window ``region`` of one sample, fetching only the rows it covers
        (:func:`fetch_windows`)."""
        return fetch_windows(self.location, [(self, sample, region)])[0]

    def window_requests(self, sample: int, region: Region) -> tuple[list[Request], Cuts]:
        """The GETs of window ``region`` of ``sample`` (its shard index known), and where in
        their answers each :func:`~arraystore.region.row_runs` range of rows lies: one GET per
        range, or, where a window has more than :data:`SEPARATE_RUNS` of them, one GET of the
        span they cover (a request costs a round trip; a (256, h, w) window of features
        would be 256)."""
        key, base, _ = self.request(sample)
        runs = list(row_runs(self.field.shape, self.dtype.itemsize, region))
        if len(runs) <= SEPARATE_RUNS:
            return [(key, base + r.offset, base + r.offset + r.nbytes) for r in runs], \
                [(run, number, 0) for number, run in enumerate(runs)]
        first = runs[0].offset
        return [(key, base + first, base + runs[-1].offset + runs[-1].nbytes)], \
            [(run, 0, run.offset - first) for run in runs]

    def window(self, sample: int, region: Region, requests: Sequence[Request], cuts: Cuts,
               got: Sequence[Any]) -> np.ndarray:
        """The window from ``got``, the answers to its :meth:`window_requests`."""
        out = np.empty(region_shape(region), self.dtype)
        for run, number, at in cuts:
            key, start, _ = requests[number]
            if got[number] is None:
                raise missing_chunk(self.field.name, sample, self.location.where(key))
            rows = memoryview(got[number])[at:at + run.nbytes]
            if len(rows) != run.nbytes:
                raise StoreFormatError(
                    f"field {self.field.name!r}, sample {sample}, {self.location.where(key)}: "
                    f"{len(rows)} bytes fetched at byte {start + at}, expected {run.nbytes} "
                    f"(the chunk ends early)")
            place_rows(out, run, np.frombuffer(rows, self.dtype), self.field.shape, region)
        return out

    def read_cached(self, sample: int, entry: CachedRange,
                    out: np.ndarray | None = None) -> np.ndarray | None:
        """The sample from its node-local cache entry, read straight into ``out`` (a batch
        slot; a fresh array if None); None where the entry was evicted or failed its check
        since it was found (the caller reads the sample again)."""
        direct = out is not None and out.dtype == self.dtype and out.flags.c_contiguous
        target = out if direct else np.empty(self.field.shape, self.dtype)
        view = memoryview(target.reshape(-1).view(np.uint8))
        if not _read_entry(entry, view, memoryview(bytearray(CRC_BYTES if self.checksum else 0))):
            return None
        if out is not None and not direct:
            out[...] = target
        return target


class RangedBlockReader(RangedFieldReader):
    """A field chunked in blocks of ``per_chunk`` samples (ids, flags): whole chunks fetched."""

    def __init__(self, field: Field, location: ObjectLocation, per_chunk: int,
                 checksum: bool) -> None:
        super().__init__(field, location, checksum)
        self.per_chunk = per_chunk

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)``."""
        return fetch_blocks(self.location, [(self, start, stop)])[0]

    def block_requests(self, start: int, stop: int) -> list[Request]:
        """The GETs of the chunks holding rows ``[start, stop)``."""
        first, last = start // self.per_chunk, (stop - 1) // self.per_chunk
        nbytes = self.per_chunk * self.field.nbytes + (CRC_BYTES if self.checksum else 0)
        return [(self.keys.path(i), 0, nbytes) for i in range(first, last + 1)]

    def rows(self, start: int, stop: int, requests: Sequence[Request],
             got: Sequence[Any]) -> np.ndarray:
        """Rows ``[start, stop)`` from ``got``, the answers to their :meth:`block_requests`,
        each chunk's length and crc32c checked."""
        first = start // self.per_chunk
        chunks = []
        for index, ((key, _, nbytes), data) in enumerate(zip(requests, got, strict=True), first):
            if data is None:
                raise missing_chunk(self.field.name, index * self.per_chunk,
                                    self.location.where(key))
            if len(data) != nbytes:
                raise StoreFormatError(f"{self.location.where(key)}: {len(data)} bytes, "
                                       f"expected {nbytes}")
            chunk = np.empty((self.per_chunk, *self.field.shape), self.dtype)
            view = memoryview(chunk.reshape(-1).view(np.uint8))
            view[:] = memoryview(data)[: chunk.nbytes]
            if self.checksum:
                check_crc(view, bytes(data[-CRC_BYTES:]), self.field.name,
                          index * self.per_chunk, self.location.where(key))
            chunks.append(chunk)
        offset = start - first * self.per_chunk
        return np.concatenate(chunks)[offset: offset + stop - start]


def fetch_blocks(location: ObjectLocation,
                 wanted: Sequence[tuple[RangedBlockReader, int, int]]) -> list[np.ndarray]:
    """Rows ``[start, stop)`` of each block-chunked field (reader, start, stop) ``wanted``,
    their chunks fetched in one concurrent batch of requests (a batch's first read of an
    SA-1B store needs six such fields: one round trip, not six)."""
    def fetch() -> tuple[list[list[Request]], list[Any]]:
        requests = [reader.block_requests(start, stop) for reader, start, stop in wanted]
        return requests, _get(location, [r for each in requests for r in each])

    with location.fetching():
        requests, got = _fresh_if_replaced(location, {r for r, _, _ in wanted}, fetch)
    out, done = [], 0
    for (reader, start, stop), asked in zip(wanted, requests, strict=True):
        out.append(reader.rows(start, stop, asked, got[done:done + len(asked)]))
        done += len(asked)
    return out


class RangedShardReader(RangedFieldReader):
    """Per-sample inner chunks in shard objects; shard indexes cached (LRU)."""

    def __init__(self, field: Field, location: ObjectLocation, shard_size: int, checksum: bool,
                 index_checksum: bool) -> None:
        super().__init__(field, location, checksum)
        self.shard_size = shard_size
        self.index_checksum = index_checksum
        self._indexes: OrderedDict[int, np.ndarray | None] = OrderedDict()

    def missing_indexes(self, sample: int) -> list[tuple[int, Request]]:
        shard = sample // self.shard_size
        if shard in self._indexes:
            self._indexes.move_to_end(shard)
            return []
        size = shard_index_bytes(self.shard_size, self.index_checksum)
        return [(shard, (self.keys.path(shard), -size, 0))]

    def store_index(self, shard: int, raw: bytes | None) -> None:
        key = self.location.where(self.keys.path(shard))
        self._indexes[shard] = None if raw is None else parse_shard_index(
            raw, None, self.shard_size, self.index_checksum, key,
            None if self.field.is_string else self.chunk_bytes)
        if len(self._indexes) > CACHED_INDEXES:
            self._indexes.popitem(last=False)

    def forget(self, keys: Collection[str]) -> None:
        for shard in [s for s in self._indexes if self.keys.path(s) in keys]:
            del self._indexes[shard]

    def request(self, sample: int) -> Request:
        shard, slot = divmod(sample, self.shard_size)
        index, key = self._indexes[shard], self.keys.path(shard)
        if index is None:
            raise missing_chunk(self.field.name, sample,
                                f"shard {self.location.where(key)}")
        offset, nbytes = index[slot]  # the index was checked whole when it was fetched
        if offset == EMPTY:
            raise missing_chunk(self.field.name, sample,
                                f"inner chunk {slot} of shard {self.location.where(key)}")
        return key, int(offset), int(offset + nbytes)


class RangedStringShardReader(RangedShardReader):
    """One-sample string chunks in shard objects (the sharded layout), decoded as
    :mod:`arraystore.readers.strings` decodes them on a disk. A string chunk's size varies, so
    it comes from the shard's index (checked whole when fetched), and one larger than
    :data:`MAX_STRING_CHUNK` is refused rather than fetched."""

    def request(self, sample: int) -> Request:
        key, start, stop = super().request(sample)
        if stop - start > MAX_STRING_CHUNK:
            raise StoreFormatError(
                f"field {self.field.name!r}, sample {sample}: shard {self.location.where(key)} "
                f"declares a string chunk of {stop - start} bytes, more than "
                f"{MAX_STRING_CHUNK} (a damaged or crafted shard index)")
        return key, start, stop

    def decode(self, sample: int, request: Request, data: bytes | None) -> Any:
        key, start, stop = request
        where = self.location.where(key)
        if data is None:
            raise missing_chunk(self.field.name, sample, where)
        if len(data) != stop - start:
            raise StoreFormatError(f"field {self.field.name!r}, sample {sample}: shard {where} "
                                   f"ends inside the inner chunk")
        data = bytes(data)
        if self.checksum:
            data = without_crc(data, self.field.name, sample, where)
        return self._strings(sample, data, where)

    def _strings(self, sample: int, data: bytes, where: str) -> Any:
        """The sample's value from its chunk's bytes, crc32c removed: a ``str``, or a
        ``StringDType`` array of the field's shape."""
        count = int(np.prod(self.field.shape, dtype=np.int64))
        values = decode_vlen_utf8(data, count, f"field {self.field.name!r}, sample {sample}, "
                                               f"shard {where}")
        return string_array(values, (1, *self.field.shape))[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        values: list[str] = []
        for value in fetch_samples(self.location, [(self, s) for s in range(start, stop)]):
            values.extend([value] if isinstance(value, str) else value.reshape(-1).tolist())
        return string_array(values, (stop - start, *self.field.shape))

    def read_cached(self, sample: int, entry: CachedRange,
                    out: np.ndarray | None = None) -> Any:
        """The sample from its node-local cache entry (checked as a numeric chunk's); None
        where the entry was evicted or failed its check."""
        data = memoryview(bytearray(entry.size))
        cut = max(entry.size - CRC_BYTES, 0) if self.checksum else entry.size
        if not _read_entry(entry, data[:cut], data[cut:]):
            return None
        shard = self.location.where(self.keys.path(sample // self.shard_size))
        value = self._strings(sample, bytes(data[:cut]), shard)
        if out is not None:
            out[...] = value
        return value


def _read_entry(entry: CachedRange, body: memoryview, crc: memoryview) -> bool:
    """Fill ``body`` and ``crc`` (the chunk's own crc32c; empty where it has none) from a
    node-local cache entry, checked on its first read while this process holds it: by the
    chunk's crc32c where it has one, else by the entry's own. False where the entry was evicted
    or failed its check (then it is discarded)."""
    if not entry.read_into([body, crc] if len(crc) else [body], check_crc=not len(crc)):
        return False
    if len(crc) and not entry.verified:
        if not crc_matches(body, crc):
            entry.discard()
            return False
        entry.mark_verified()
    return True


def _array_of(data: Any, nbytes: int, dtype: np.dtype) -> np.ndarray:
    """The first ``nbytes`` of fetched ``data`` as a 1-d ``dtype`` array: the fetched buffer
    itself where it is writable and aligned (:mod:`arraystore.s3_gets` reads each answer into
    a NumPy buffer of its own: copying it again cost a batch of 8 SA-1B items 35 ms of page
    faults and copies, profiled), else a copy. Such an array keeps its whole answer alive:
    the chunks of neighbouring samples too, where their ranges were joined into one GET."""
    raw = np.frombuffer(data, np.uint8, nbytes)
    if not raw.flags.writeable or raw.ctypes.data % dtype.alignment:
        raw = raw.copy()  # a buffer of its own, writable and aligned
    return raw.view(dtype)


def fetch_samples(location: ObjectLocation, wanted: Sequence[tuple[RangedFieldReader, int]],
                  lazy: bool = False) -> list[np.ndarray | CachedRange]:
    """The samples ``wanted`` (reader, sample) as arrays: first the shard indexes none of them
    has cached (one concurrent batch of requests), then every chunk (a second). ``lazy``:
    a sample the node-local cache holds comes as its entry, for
    :meth:`RangedFieldReader.read_cached` into a batch slot. One fetch at a time per process
    and location (a read-ahead thread's and the reader's own)."""
    def fetch() -> tuple[list[Request], list[Any]]:
        _fetch_indexes(location, wanted)
        requests = [reader.request(sample) for reader, sample in wanted]
        return requests, _get(location, requests, lazy)

    with location.fetching():
        requests, fetched = _fresh_if_replaced(location, {r for r, _ in wanted}, fetch)
    return [data if isinstance(data, CachedRange) else reader.decode(sample, request, data)
            for (reader, sample), request, data in zip(wanted, requests, fetched, strict=True)]


def fetch_windows(location: ObjectLocation,
                  wanted: Sequence[tuple[RangedFieldReader, int, Region]]) -> list[np.ndarray]:
    """Windows (reader, sample, region) of samples, fetching only the rows each covers, all
    at once: the shard indexes none of them has cached (one concurrent batch of requests),
    then every window's ranges (a second). A window of a field whose chunks carry a crc32c is
    cut from the whole chunk, fetched with the others: the crc covers the whole chunk."""
    whole = [n for n, (reader, _, _) in enumerate(wanted) if reader.checksum]
    windows = [n for n in range(len(wanted)) if not wanted[n][0].checksum]

    def fetch() -> tuple[list[tuple[list[Request], Cuts]], list[Any]]:
        _fetch_indexes(location, [(reader, sample) for reader, sample, _ in wanted])
        plans = [wanted[n][0].window_requests(wanted[n][1], wanted[n][2]) for n in windows]
        return plans, _get(location, [r for requests, _ in plans for r in requests])

    with location.fetching():
        plans, got = _fresh_if_replaced(location, {r for r, _, _ in wanted}, fetch)
    out: list[np.ndarray] = [np.empty(0)] * len(wanted)
    done = 0
    for n, (requests, cuts) in zip(windows, plans, strict=True):
        reader, sample, region = wanted[n]
        out[n] = reader.window(sample, region, requests, cuts, got[done:done + len(requests)])
        done += len(requests)
    chunks = fetch_samples(location, [wanted[n][:2] for n in whole])
    for n, chunk in zip(whole, chunks, strict=True):
        out[n] = np.ascontiguousarray(chunk[wanted[n][2]])
    return out


def _fetch_indexes(location: ObjectLocation,
                   wanted: Iterable[tuple[RangedFieldReader, int]]) -> None:
    """Fetch the shard indexes the samples ``wanted`` need that their readers have not
    cached, in one concurrent batch of requests."""
    needed: dict[tuple[int, int], tuple[RangedFieldReader, int, Request]] = {}
    for reader, sample in wanted:
        for shard, req in reader.missing_indexes(sample):
            needed.setdefault((id(reader), shard), (reader, shard, req))
    if needed:
        got = _get(location, [req for _, _, req in needed.values()])
        for (reader, shard, _), raw in zip(needed.values(), got, strict=True):
            reader.store_index(shard, raw)


def _fresh_if_replaced(location: ObjectLocation, readers: Iterable[RangedFieldReader],
                       fetch: Callable[[], T]) -> T:
    """``fetch()``; where objects it read were replaced meanwhile
    (:class:`ObjectChangedError`), once more after forgetting what the readers and the
    node-local cache knew of them (shard indexes, versions): a read sees one version of
    each object, never ranges of two. Objects replaced again at once raise."""
    try:
        return fetch()
    except ObjectChangedError as changed:
        for reader in readers:
            reader.forget(changed.keys)
        if location.cache is not None:
            location.cache.forget(location.url, changed.keys)
        return fetch()


def coalesced(requests: Sequence[Request],
              largest: int = COALESCE_BYTES) -> list[tuple[Request, list[int]]]:
    """``requests`` as fewer GETs: ranges of one object that touch or overlap (neighbouring
    inner chunks of a shard) joined up to ``largest`` bytes; each GET with the numbers of the
    requests it serves. Suffix requests (the last bytes of an object) stay as they are."""
    order = sorted(range(len(requests)), key=lambda n: (requests[n][0], requests[n][1]))
    out: list[tuple[Request, list[int]]] = []
    for number in order:
        key, start, stop = requests[number]
        if out and start >= 0:
            (last_key, last_start, last_stop), served = out[-1]
            if key == last_key and last_start >= 0 and start <= last_stop \
                    and max(stop, last_stop) - last_start <= largest:
                out[-1] = ((key, last_start, max(stop, last_stop)), [*served, number])
                continue
        out.append(((key, start, stop), [number]))
    return out


def _get(location: ObjectLocation, requests: Sequence[Request],
         lazy: bool = False) -> list[Any]:
    """The bytes of each request: from the location's node-local cache where it holds them
    (:mod:`arraystore.node_cache`; ``lazy``: as entries, read later), the others fetched
    concurrently as :func:`coalesced` GETs (and kept in the cache)."""
    if not requests:
        return []
    if location.cache is not None:
        return location.cache.get(location.url, requests, functools.partial(_fetch, location),
                                  location.versions, lazy)
    return _fetch(location, requests)


def _fetch(location: ObjectLocation,
           requests: Sequence[Request]) -> list[bytes | memoryview | None]:
    """The bytes of each request, fetched concurrently as :func:`coalesced` GETs."""
    if not requests:
        return []
    gets = coalesced(requests)
    got = location.read_ranges([k for (k, _, _), _ in gets], [s for (_, s, _), _ in gets],
                               [e if s >= 0 else None for (_, s, e), _ in gets], versioned=True)
    out: list[bytes | memoryview | None] = [None] * len(requests)
    for ((_, start, _), served), data in zip(gets, got, strict=True):
        reach = start  # the end of the ranges served so far (``served`` is in start order)
        for number in served:
            _, first, last = requests[number]
            part = data if data is None or len(served) == 1 \
                else data[first - start:last - start]
            # a range overlapping one served before gets bytes of its own: arrays made from
            # the answer's buffer (:func:`_array_of`) must not share memory
            out[number] = bytes(part) if part is not None and first < reach else part
            reach = max(reach, last)
    return out
