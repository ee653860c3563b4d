"""Read through zarr-python: every layout, every dtype (the reference and last fallback)."""

from __future__ import annotations

import numpy as np
import zarr

from arraystore.layout import Layout
from arraystore.location import Location
from arraystore.readers.base import Backend, FieldReader
from arraystore.region import Region
from arraystore.schema import Field


class ZarrFieldReader(FieldReader):
    def __init__(self, array: zarr.Array) -> None:
        self._array = array

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._array[start:stop])

    def read_region(self, sample: int, region: Region) -> np.ndarray:
        return np.asarray(self._array[(sample, *region)])


class ZarrBackend(Backend):
    name = "zarr"

    @classmethod
    def supports(cls, field: Field, layout: Layout, location: Location) -> bool:
        return True

    def open_field(self, field: Field) -> FieldReader:
        array = zarr.open_array(self.location.zarr_store(read_only=True), path=field.name,
                                mode="r", zarr_format=3)
        return ZarrFieldReader(array)
