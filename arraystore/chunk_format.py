"""The bytes of stored chunks, as Zarr v3 defines them: the format layer every reader backend and
``verify`` build on, with no I/O of its own.

- A shard's index: (offset, nbytes) as two little-endian uint64 per inner chunk, at the end of the
  shard, followed by the crc32c of the index (zarr's default index codecs); an entry of all ones
  in both halves is an inner chunk never written.
- ``crc32c``: 4 little-endian bytes after the data they cover.
- ``vlen-utf8`` (strings): a uint32 count of items, then per item its uint32 byte length and its
  UTF-8 bytes.
- The codec chains of uncompressed arrays (:func:`plain_chunks`): plain or sharded, with or
  without crc32c.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

import numpy as np
from crc32c import crc32c

from arraystore.errors import ChecksumMismatchError, StoreFormatError

CRC_BYTES = 4
EMPTY_INT = 2**64 - 1  # an inner chunk never written: offset and nbytes both
EMPTY = np.uint64(EMPTY_INT)
_U32 = struct.Struct("<I")


class PlainChunks(NamedTuple):
    """How an uncompressed array's chunks lie: ``shard_size`` samples per shard (None where it
    is not sharded), ``per_chunk`` samples per (inner) chunk, and whether chunks and shard
    indexes carry a crc32c."""

    shard_size: int | None
    per_chunk: int
    chunk_crc: bool
    index_crc: bool


def plain_chunks(meta: dict[str, Any], where: str, string: bool) -> PlainChunks:
    """The :class:`PlainChunks` of an array from its ``zarr.json`` ``meta``; a
    :class:`StoreFormatError` naming ``where`` for codecs that are not an uncompressed layout
    (``string``: ``vlen-utf8`` chunks rather than ``bytes``)."""
    codecs = meta["codecs"]
    encoding = "vlen-utf8" if string else "bytes"
    chunk_shape = meta["chunk_grid"]["configuration"]["chunk_shape"]
    if codec_names(codecs) == ["sharding_indexed"]:
        config = codecs[0]["configuration"]
        inner = codec_names(config["codecs"])
        index = codec_names(config["index_codecs"])
        if (config.get("index_location", "end") != "end" or inner[0] != encoding
                or inner[1:] not in ([], ["crc32c"]) or index[1:] not in ([], ["crc32c"])
                or config["chunk_shape"][0] != 1):
            raise StoreFormatError(f"{where}: unexpected sharding codecs {config}")
        return PlainChunks(chunk_shape[0], 1, inner[1:] == ["crc32c"], index[1:] == ["crc32c"])
    names = codec_names(codecs)
    if names[0] != encoding or names[1:] not in ([], ["crc32c"]):
        raise StoreFormatError(f"{where}: codecs {names} are not an uncompressed layout")
    return PlainChunks(None, chunk_shape[0], names[1:] == ["crc32c"], False)


def codec_names(codecs: list[dict[str, Any]]) -> list[str]:
    return [c["name"] for c in codecs]


def crc_matches(data: Any, stored: bytes) -> bool:
    """Whether ``stored`` (4 bytes, little-endian) is the crc32c of ``data``."""
    return crc32c(data) == int.from_bytes(stored, "little")


def check_crc(data: memoryview, stored: bytes, field: str, sample: int, path: str) -> None:
    if not crc_matches(data, stored):
        raise ChecksumMismatchError(
            f"crc32c mismatch in field {field!r}, sample {sample}, file {path}: the chunk is "
            f"corrupt (run `arraystore verify` on the store, then re-ingest the sample's source)"
        )


def shard_index_bytes(shard_size: int, checksum: bool) -> int:
    """Length of a shard's index: (offset, nbytes) as two uint64 per inner chunk [+ crc32c]."""
    return shard_size * 16 + (CRC_BYTES if checksum else 0)


def parse_shard_index(raw: bytes, size: int | None, shard_size: int, checksum: bool,
                      path: str, chunk_bytes: int | None = None) -> np.ndarray:
    """The (offset, nbytes) of each inner chunk from ``raw``, the last bytes of a shard of
    ``size`` bytes (None when unknown: fetched as a suffix range; a chunk past the end then
    reads short and is refused then). Every entry is checked, so that no read returns bytes of
    another sample: empty in both halves or neither, inside the data, overlapping no other
    entry, and of ``chunk_bytes`` where the inner chunks are uncompressed (None: they vary).
    Raises :class:`StoreFormatError` for a shard too short or an index that breaks one of
    those rules, :class:`ChecksumMismatchError` for an index whose crc32c is wrong."""
    index_bytes = shard_index_bytes(shard_size, checksum)
    if len(raw) != index_bytes or (size is not None and size < index_bytes):
        raise StoreFormatError(f"shard {path} is {len(raw) if size is None else size} bytes, "
                               f"too short for its "
                               f"{index_bytes}-byte index")
    if checksum and not crc_matches(raw[:-CRC_BYTES], raw[-CRC_BYTES:]):
        raise ChecksumMismatchError(f"shard {path}: crc32c mismatch in the shard index")
    index = np.frombuffer(raw, "<u8", shard_size * 2).reshape(shard_size, 2)
    problem = shard_index_problem(index, None if size is None else size - index_bytes,
                                  chunk_bytes)
    if problem:
        raise StoreFormatError(f"shard {path}: {problem}")
    return index


def shard_index_problem(index: np.ndarray, data_bytes: int | None,
                        chunk_bytes: int | None) -> str | None:
    """What is wrong with a shard ``index`` (rows of offset, nbytes) over ``data_bytes`` of
    chunk data (None: unknown), or None."""
    empty = index == EMPTY
    if (empty[:, 0] != empty[:, 1]).any():
        return "an index entry is empty in one half only"
    used = index[~empty[:, 0]]
    if not len(used):
        return None
    offsets, lengths = used[:, 0], used[:, 1]
    if (lengths > np.uint64(2**62)).any() or (offsets > np.uint64(2**62)).any():
        return "the index declares an impossible offset or length"
    if data_bytes is not None and (offsets + lengths > data_bytes).any():
        return "the index points past the end of the data"
    if chunk_bytes is not None and (lengths != chunk_bytes).any():
        bad = int(lengths[lengths != chunk_bytes][0])
        return f"an inner chunk of {bad} bytes, expected {chunk_bytes} (uncompressed)"
    order = np.argsort(offsets, kind="stable")
    ends = offsets[order] + lengths[order]
    if (ends[:-1] > offsets[order][1:]).any():
        return "two index entries overlap (a read would return another sample's bytes)"
    return None


def without_crc(data: bytes, field: str, sample: int, path: str) -> bytes:
    """A checksummed chunk's ``data`` without its trailing crc32c, which must match."""
    if len(data) < CRC_BYTES:
        raise StoreFormatError(f"field {field!r}, sample {sample}, file {path}: {len(data)} "
                               f"bytes, too short for a checksummed chunk")
    check_crc(memoryview(data)[:-CRC_BYTES], data[-CRC_BYTES:], field, sample, path)
    return data[:-CRC_BYTES]


def string_array(values: list[str], shape: tuple[int, ...]) -> np.ndarray:
    """Decoded strings as zarr-python returns them: a ``StringDType`` array of ``shape``."""
    return np.array(values, dtype=np.dtypes.StringDType()).reshape(shape)


def decode_vlen_utf8(data: bytes, count: int, what: str) -> list[str]:
    """The ``count`` strings of one ``vlen-utf8`` chunk's bytes ``data`` (crc removed); a
    :class:`StoreFormatError` naming ``what`` for any count, length or UTF-8 that does not fit."""
    if len(data) < _U32.size or _U32.unpack_from(data)[0] != count:
        found = _U32.unpack_from(data)[0] if len(data) >= _U32.size else "no"
        raise StoreFormatError(f"{what}: a string chunk of {found} items, expected {count}")
    values, at = [], _U32.size
    for _ in range(count):
        if at + _U32.size > len(data):
            raise StoreFormatError(f"{what}: the string chunk ends inside an item's length")
        (length,) = _U32.unpack_from(data, at)
        at += _U32.size
        if at + length > len(data):
            raise StoreFormatError(f"{what}: a string of {length} bytes runs past the chunk's "
                                   f"{len(data)} bytes")
        try:
            values.append(data[at:at + length].decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise StoreFormatError(f"{what}: a string is not valid UTF-8 ({exc})") from exc
        at += length
    if at != len(data):
        raise StoreFormatError(f"{what}: {len(data) - at} bytes after the chunk's {count} "
                               f"strings")
    return values
