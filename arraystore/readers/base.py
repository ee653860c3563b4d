"""The interface of a reader backend."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from arraystore.chunk_format import parse_shard_index, shard_index_bytes
from arraystore.errors import ChecksumMismatchError, MissingChunkError, StoreFormatError
from arraystore.layout import Layout
from arraystore.location import Location
from arraystore.region import Region
from arraystore.schema import Field


class FieldReader(ABC):
    """Reads samples of one field of one store."""

    @abstractmethod
    def read(self, start: int, stop: int) -> np.ndarray:
        """Samples ``start`` to ``stop`` (exclusive), shape ``(stop - start, *field.shape)``."""

    def read_sample(self, sample: int) -> np.ndarray:
        """Sample ``sample`` as a fresh array of the field's shape: the hot path of an item's
        read. This default slices :meth:`read`; the direct backend reads straight into it."""
        return self.read(sample, sample + 1)[0]

    def mapped_sample(self, sample: int) -> np.ndarray | None:
        """Sample ``sample`` without a copy, where the backend can hand one out at once (a
        disk's uncompressed inner chunk read before, :mod:`arraystore.readers.mapped`);
        else None, and :meth:`read_sample` reads it. This default: None."""
        return None

    def read_into(self, sample: int, out: np.ndarray) -> None:
        """Sample ``sample`` written into ``out`` (the field's shape and dtype, C-contiguous):
        a batch buffer's slot, in shared memory when filled in a DataLoader worker. This
        default reads and copies; the direct backend ``preadv`` s straight into ``out``."""
        out[...] = self.read_sample(sample)

    def read_region(self, sample: int, region: Region) -> np.ndarray:
        """The window ``region`` (normalised, see :mod:`arraystore.region`) of one sample.

        This default reads the whole sample and slices it; backends that can read less do.
        """
        return self.read_sample(sample)[region]


class Backend(ABC):
    """A way of reading fields; opened in the process that reads (never shared across fork)."""

    name: ClassVar[str]

    def __init__(self, location: Location, layout: Layout,
                 array_json: Mapping[str, bytes] | None = None) -> None:
        self.location = location
        self.layout = layout
        self.array_json = dict(array_json or {})  # name -> zarr.json bytes the opener read

    def array_meta(self, name: str) -> dict[str, Any]:
        """The ``zarr.json`` of array ``name``: the bytes the store's opener already fetched
        (and checked), else read now."""
        raw = self.array_json.get(name)
        return json.loads(raw if raw is not None
                          else self.location.read_bytes(f"{name}/zarr.json"))

    @classmethod
    @abstractmethod
    def supports(cls, field: Field, layout: Layout, location: Location) -> bool:
        """Whether this backend can read ``field`` stored with ``layout`` at ``location``."""

    @abstractmethod
    def open_field(self, field: Field) -> FieldReader:
        """A reader for ``field``; cheap to call, handles open lazily where possible."""

    def read_fields(self, readers: Sequence[FieldReader], sample: int) -> list[np.ndarray]:
        """Sample ``sample`` of the fields of ``readers`` (opened by this backend). This
        default reads them one after the other; a backend that can overlap them does."""
        return [reader.read_sample(sample) for reader in readers]


def missing_chunk(field: str, sample: int, where: str) -> MissingChunkError:
    """The error for a committed sample whose chunk (or inner chunk) ``where`` is absent."""
    return MissingChunkError(
        f"field {field!r}, sample {sample}: {where} is missing although the sample is "
        f"committed; the store is damaged (`arraystore verify` lists every such sample; "
        f"re-ingest its source)")


def undecodable(field: str, sample: int, library: str, exc: Exception) -> StoreFormatError:
    """The error for chunks a library could not decode (a codec's own exception, typed): a
    :class:`ChecksumMismatchError` for a crc32c that does not match."""
    text = str(exc).lower()
    kind = ChecksumMismatchError if "checksum" in text or "digest" in text else StoreFormatError
    return kind(f"field {field!r}, samples from {sample}: a chunk does not decode "
                f"({library}: {type(exc).__name__}: {exc}); the store is damaged (`arraystore "
                f"verify --deep` lists every such sample; re-ingest its source)")


def fetch_shard_index(location: Location, key: str, size: int, shard_size: int,
                      chunk_bytes: int | None) -> np.ndarray:
    """:func:`parse_shard_index` of the shard ``key`` of ``size`` bytes at ``location``, read
    with one ranged read (its index always carries a crc32c: zarr's default index codecs)."""
    index_bytes = shard_index_bytes(shard_size, True)
    raw = location.read_range(key, size - index_bytes, size) if size >= index_bytes else b""
    return parse_shard_index(raw, size, shard_size, True, location.where(key), chunk_bytes)
