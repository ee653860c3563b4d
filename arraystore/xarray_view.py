"""The store as a lazy ``xarray.Dataset``: named dimensions, ``sample`` ids as the index."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from arraystore.schema import SAMPLE_DIM
from arraystore.store import COMMITTED_ARRAY, Store, StoreTarget


def open_xarray(path: StoreTarget, *, committed_only: bool = True,
                storage_options: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Open the store at ``path`` (a local path, or an object-store URL with its
    ``storage_options``) lazily (dask arrays, one dask chunk per Zarr chunk).

    Nothing is read but metadata, ``sample`` and ``committed``. With ``committed_only`` (the
    default) samples whose data is incomplete are left out, as every reader does; without it,
    every slot is there and the boolean coordinate ``committed`` marks the complete ones (as
    plain ``xarray.open_zarr`` shows them: ``ds.isel(sample=ds.committed.values)`` keeps those).
    ``ds.sel(sample="sa_1")`` selects by id.
    """
    store = Store.open(path, storage_options=storage_options)
    ds = xr.open_zarr(store.location.zarr_store(read_only=True), zarr_format=3,
                      consolidated=False, chunks={})  # the arrays as they are now
    if COMMITTED_ARRAY not in ds.coords:  # stores made before it was a coordinate
        ds = ds.set_coords(COMMITTED_ARRAY)
    if committed_only:
        # the mask covers the slots ``committed`` stores (Store.committed_extent): the rest
        # of the arrays, when longer, holds nothing committed either
        positions = np.flatnonzero(store.committed_mask())
        if len(positions) != ds.sizes[SAMPLE_DIM]:
            ds = ds.isel(sample=positions)
        ds = ds.drop_vars(COMMITTED_ARRAY)
    return ds
