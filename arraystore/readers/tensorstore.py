"""Read through TensorStore's ``zarr3`` driver (every numeric field; it has no string type).

TensorStore is not fork-safe: a process that has used it must not fork DataLoader workers. The
backend is therefore only ever opened inside the reading process, never by index building.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from arraystore.layout import Layout
from arraystore.location import Location
from arraystore.readers.base import Backend, FieldReader, missing_chunk, undecodable
from arraystore.readers.stored import StoredChunks
from arraystore.region import Region
from arraystore.schema import Field


class TensorStoreFieldReader(FieldReader):
    """One field; a chunk that is not there is a :class:`MissingChunkError` (TensorStore is
    opened with ``fill_missing_data_reads`` off and reports it as ``NOT_FOUND``), a shard
    index that is not sound, or a link on a chunk's way, a :class:`StoreFormatError`
    (:class:`~.stored.StoredChunks`: TensorStore checks neither)."""

    def __init__(self, array: Any, field: Field, stored: StoredChunks) -> None:
        self._array = array
        self._field = field
        self._stored = stored
        # shard indexes anywhere; on a disk also the links TensorStore would follow (an
        # ``openat2`` a chunk, ~8 µs); missing chunks it reports itself
        self._checks = stored.sharded or stored.location.may_hold_links

    def read(self, start: int, stop: int) -> np.ndarray:
        if self._checks:
            self._stored.check(start, stop)
        return self._read((slice(start, stop),), start)

    def read_region(self, sample: int, region: Region) -> np.ndarray:
        if self._checks:
            self._stored.check(sample, sample + 1)
        return self._read((sample, *region), sample)

    def _read(self, index: tuple[Any, ...], sample: int) -> np.ndarray:
        try:
            return self._array[index].read().result()
        except ValueError as exc:
            if "NOT_FOUND" not in str(exc):
                raise undecodable(self._field.name, sample, "TensorStore", exc) from exc
            raise missing_chunk(self._field.name, sample, f"a chunk (TensorStore: {exc})") from exc


class TensorStoreBackend(Backend):
    name = "tensorstore"

    @classmethod
    def supports(cls, field: Field, layout: Layout, location: Location) -> bool:
        return not field.is_string and location.tensorstore_kvstore("") is not None

    def open_field(self, field: Field) -> FieldReader:
        import tensorstore as ts  # imported here: only reading processes ever load it

        spec = {
            "driver": "zarr3",
            "kvstore": self.location.tensorstore_kvstore(field.name),
            # a store grows while it is read: always see the current shape and chunks
            "recheck_cached_metadata": True,
            "recheck_cached_data": True,
            "fill_missing_data_reads": False,  # only committed samples are read: all written
        }
        return TensorStoreFieldReader(ts.open(spec, read=True).result(), field,
                                      StoredChunks(field, self.location, self.layout))
