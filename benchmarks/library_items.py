"""The reference of a row that reads through a library: the library itself, with no arraystore
code between it and the store.

A ``ZarrDistillDataset`` row whose fields go through TensorStore or zarr-python (``/ tensorstore``
and ``/ zarr`` rows, and the compressed layouts, whose chunks the direct backend cannot read) is
bound by that library's cost per read and, for zstd, by decompression: far below the `.bin`
reader on any code. What arraystore adds on top is its ratio to :class:`LibraryItems`: the same
store, the same fields through the same library as plain ``array[i]`` reads, the same item
dict. The benchmark reports both ratios; the busy target (no row below 0.5× its reference)
takes this one for such rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from arraystore.loaders import ZarrDistillDataset
from arraystore.loaders.distill_item import distill_item

LIBRARIES = {"tensorstore": "TensorStore", "zarr": "zarr-python"}


def library_of(dataset: ZarrDistillDataset) -> str | None:
    """The library that reads ``dataset``'s per-sample numeric fields (the bulk of an item),
    or None where arraystore reads them itself."""
    reader = dataset.reader
    used = {reader.backend_of(name) for name in reader.fields
            if reader.schema[name].chunking == "sample" and not reader.schema[name].is_string}
    found = used & set(LIBRARIES)
    return next(iter(found)) if found else None


class LibraryItems:
    """Items of ``like`` with every field it reads through ``library`` read by that library
    itself (TensorStore's ``zarr3`` driver, or ``zarr.open_array``), one ``array[i]`` per
    field; its other fields (strings, block-chunked ids) through ``like``'s own reader, as
    the row reads them. Arrays are opened on the first read, in the reading process
    (TensorStore, once used, must not be forked)."""

    def __init__(self, like: ZarrDistillDataset, library: str) -> None:
        reader = like.reader
        self.like, self.library = like, library
        self.through = [n for n in reader.fields if reader.backend_of(n) == library]
        self.others = [n for n in reader.fields if n not in self.through]
        self._arrays: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.like)

    def _open(self) -> dict[str, Any]:
        root = Path(self.like.reader.path)
        if self.library == "tensorstore":
            import tensorstore as ts

            return {name: ts.open({"driver": "zarr3", "kvstore": {
                "driver": "file", "path": str(root / name)}}, read=True).result()
                for name in self.through}
        return {name: zarr.open_array(str(root), path=name, mode="r", zarr_format=3)
                for name in self.through}

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._arrays is None:
            self._arrays = self._open()
        reader = self.like.reader
        position = reader.position(index)
        values = reader.read(index, self.others) if self.others else {}
        for name, array in self._arrays.items():
            values[name] = (array[position].read().result() if self.library == "tensorstore"
                            else np.asarray(array[position]))
        return distill_item(values, self.like.sample_ids[index], self.like.keys)
