"""Read through TensorStore's ``zarr3`` driver (every numeric field; it has no string type).

TensorStore is not fork-safe: a process that has used it must not fork DataLoader workers. The
backend is therefore only ever opened inside the reading process, never by index building.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from arraystore.layout import Layout
from arraystore.location import LocalLocation, Location, ObjectLocation
from arraystore.readers.base import Backend, FieldReader
from arraystore.region import Region
from arraystore.schema import Field


def kvstore(location: Location, key: str) -> dict[str, Any] | None:
    """TensorStore's kvstore spec of ``key`` at ``location``; None where it has no driver
    (an object store other than S3 and GCS: the chain then falls back to zarr-python)."""
    if isinstance(location, LocalLocation):
        return {"driver": "file", "path": str(location.file(key))}
    assert isinstance(location, ObjectLocation)
    return location.tensorstore_kvstore(key)


class TensorStoreFieldReader(FieldReader):
    def __init__(self, array: object) -> None:
        self._array = array

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._array[start:stop].read().result()

    def read_region(self, sample: int, region: Region) -> np.ndarray:
        return self._array[(sample, *region)].read().result()


class TensorStoreBackend(Backend):
    name = "tensorstore"

    @classmethod
    def supports(cls, field: Field, layout: Layout, location: Location) -> bool:
        return not field.is_string and kvstore(location, "") is not None

    def open_field(self, field: Field) -> FieldReader:
        import tensorstore as ts  # imported here: only reading processes ever load it

        spec = {
            "driver": "zarr3",
            "kvstore": kvstore(self.location, field.name),
            # a store grows while it is read: always see the current shape and chunks
            "recheck_cached_metadata": True,
            "recheck_cached_data": True,
        }
        return TensorStoreFieldReader(ts.open(spec, read=True).result())
