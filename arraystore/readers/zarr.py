"""Read through zarr-python: every layout, every dtype (the reference and last fallback).

zarr-python reads a chunk that is not there as the fill value; :class:`~.stored.StoredChunks`
checks before each read that the samples' chunks are stored (and shard indexes sound), so a
lost chunk of a committed sample is a :class:`MissingChunkError`, not zeros.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from arraystore.layout import Layout
from arraystore.location import Location
from arraystore.readers.base import Backend, FieldReader, undecodable
from arraystore.readers.stored import StoredChunks
from arraystore.region import Region
from arraystore.schema import Field


class ZarrFieldReader(FieldReader):
    def __init__(self, array: zarr.Array, stored: StoredChunks) -> None:
        self._array = array
        self._stored = stored

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._read((slice(start, stop),), start, stop)

    def read_region(self, sample: int, region: Region) -> np.ndarray:
        return self._read((sample, *region), sample, sample + 1)

    def _read(self, index: tuple[Any, ...], start: int, stop: int) -> np.ndarray:
        self._stored.check(start, stop)
        try:
            return np.asarray(self._array[index])
        except (RuntimeError, ValueError, TypeError) as exc:  # codecs raise their own
            raise undecodable(self._stored.field.name, start, "zarr-python", exc) from exc


class ZarrBackend(Backend):
    name = "zarr"

    @classmethod
    def supports(cls, field: Field, layout: Layout, location: Location) -> bool:
        return True

    def open_field(self, field: Field) -> FieldReader:
        array = zarr.open_array(self.location.zarr_store(read_only=True), path=field.name,
                                mode="r", zarr_format=3)
        return ZarrFieldReader(array, StoredChunks(field, self.location, self.layout))
