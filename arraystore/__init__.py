"""arraystore: one self-describing Zarr v3 store for every per-sample tensor a training run reads.

The public surface: declare a :class:`Schema` of :class:`Field` s, pick a :class:`Layout`, write
with :class:`StoreWriter` (or :func:`ingest` a registered source), read with
:class:`SampleReader`, analyse with :func:`open_xarray`. The torch Datasets are in
:mod:`arraystore.loaders`, the converters of legacy formats in :mod:`arraystore.converters`.
"""

from arraystore.errors import ArrayStoreError
from arraystore.ingest import IngestReport, ingest
from arraystore.layout import Layout
from arraystore.reader import SampleReader
from arraystore.schema import Field, Schema
from arraystore.store import Store, open_for_writing
from arraystore.version import __version__
from arraystore.writer import StoreWriter
from arraystore.xarray_view import open_xarray

__all__ = [
    "ArrayStoreError",
    "Field",
    "IngestReport",
    "Layout",
    "SampleReader",
    "Schema",
    "Store",
    "StoreWriter",
    "__version__",
    "ingest",
    "open_for_writing",
    "open_xarray",
]
