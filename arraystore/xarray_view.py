"""The store as a lazy ``xarray.Dataset``: named dimensions, ``sample`` ids as the index."""

from __future__ import annotations

import os

import numpy as np
import xarray as xr

from arraystore.store import COMMITTED_ARRAY, Store


def open_xarray(path: str | os.PathLike[str], *, committed_only: bool = True) -> xr.Dataset:
    """Open the store at ``path`` lazily (dask arrays, one dask chunk per Zarr chunk).

    Nothing is read but metadata, ``sample`` and ``committed``. With ``committed_only`` (the
    default) samples whose data is incomplete are left out, as every reader does.
    ``ds.sel(sample="sa_1")`` selects by id.
    """
    store = Store.open(path)
    ds = xr.open_zarr(os.fspath(path), zarr_format=3, consolidated=False, chunks={})
    if committed_only:
        mask = store.committed_mask()
        if not mask.all():
            ds = ds.isel(sample=np.flatnonzero(mask))
        ds = ds.drop_vars(COMMITTED_ARRAY)
    return ds
