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
    every slot is there and the boolean coordinate ``committed`` marks the complete ones, as
    every reader counts them (``ds.isel(sample=ds.committed.values)`` keeps those; plain
    ``xarray.open_zarr`` shows the raw array, which may also mark revoked slots).
    ``ds.sel(sample="sa_1")`` selects by id.
    """
    store = Store.open(path, storage_options=storage_options)
    ds = xr.open_zarr(store.location.zarr_store(read_only=True), zarr_format=3,
                      consolidated=False, chunks={})  # the arrays as they are now
    if COMMITTED_ARRAY not in ds.coords:  # stores made before it was a coordinate
        ds = ds.set_coords(COMMITTED_ARRAY)
    # the store's own verdict, not the raw array: a mark in a revoked range (made by a writer
    # after its lock was broken) does not count; the mask covers the slots ``committed``
    # stores (Store.committed_extent), and the rest of the arrays holds nothing committed
    mask = store.committed_mask()
    if committed_only:
        positions = np.flatnonzero(mask)
        if len(positions) != ds.sizes[SAMPLE_DIM]:
            ds = ds.isel(sample=positions)
        return ds.drop_vars(COMMITTED_ARRAY)
    complete = np.zeros(ds.sizes[SAMPLE_DIM], bool)
    complete[:len(mask)] = mask
    return ds.assign_coords({COMMITTED_ARRAY: ds[COMMITTED_ARRAY].copy(data=complete)})
