"""Reader backends, selectable by name: ``direct``, ``tensorstore``, ``zarr``, or ``auto``.

Each backend opens one field of a store and reads a range of samples. A name stands for a chain
of backends tried field by field: a field the first cannot read (compressed data for ``direct``,
strings for ``tensorstore``) falls back to the next.
"""

from __future__ import annotations

from arraystore.errors import UnknownPluginError
from arraystore.readers.base import Backend, FieldReader
from arraystore.readers.direct import DirectBackend
from arraystore.readers.tensorstore import TensorStoreBackend
from arraystore.readers.zarr import ZarrBackend

BACKENDS: dict[str, type[Backend]] = {
    b.name: b for b in (DirectBackend, TensorStoreBackend, ZarrBackend)
}
CHAINS: dict[str, tuple[str, ...]] = {
    "auto": ("direct", "tensorstore", "zarr"),
    "direct": ("direct", "tensorstore", "zarr"),
    "tensorstore": ("tensorstore", "zarr"),
    "zarr": ("zarr",),
}
BACKEND_NAMES: tuple[str, ...] = tuple(CHAINS)


def backend_chain(name: str) -> tuple[type[Backend], ...]:
    """The backends tried, in order, for the backend name ``name``."""
    if name not in CHAINS:
        raise UnknownPluginError(f"unknown reader backend {name!r}; choose one of {BACKEND_NAMES}")
    return tuple(BACKENDS[n] for n in CHAINS[name])


__all__ = ["BACKEND_NAMES", "Backend", "FieldReader", "backend_chain"]
