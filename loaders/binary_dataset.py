"""``BinaryDistillDataset``: the reference reader of the raw ``.bin`` format (docs/formats.md).

Kept beside the Zarr dataset so tests can compare items and benchmarks can compare speed. Like
the original, each process opens its own file handles (lazily, reopened after a fork) and reads
sample ``i`` at ``i * item_size`` -- here with ``os.pread`` straight into the output arrays, and
only the parts the item needs, which makes it a strong baseline.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from arraystore.kinds.sa1b_bin import BinFile, BinFormatError, open_bin_directory
from arraystore.loaders.distill_item import DISTILL_FIELDS, distill_item
from arraystore.per_process import PerProcess


class BinaryDistillDataset(Dataset):
    """Items of a ``.bin`` dataset folder as the dicts of the ``.bin`` reader (docs/formats.md)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        directory = open_bin_directory(root)
        self.root = directory.root
        self.config = directory.config
        self.keys = directory.keys
        self.files: tuple[BinFile, ...] = directory.files
        self._parts = [
            (spec, part, spec.offset_of(part.field))
            for spec in self.files for part in spec.parts if part.field in DISTILL_FIELDS
        ]
        self._fds = PerProcess(dict, close=_close_all)  # file name -> descriptor

    def __len__(self) -> int:
        return len(self.keys)

    def _fd(self, name: str) -> int:
        fds = self._fds.get()
        if name not in fds:
            fds[name] = os.open(self.root / name, os.O_RDONLY)
        return fds[name]

    def read_fields(self, index: int) -> dict[str, np.ndarray]:
        """The raw field values of sample ``index`` (P4 without its leading axis of 1)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        values: dict[str, np.ndarray] = {}
        for spec, part, offset in self._parts:
            out = np.empty(part.shape, part.dtype)
            got = os.preadv(self._fd(spec.name), [memoryview(out.reshape(-1).view(np.uint8))],
                            index * spec.item_size + offset)
            if got != part.nbytes:
                raise BinFormatError(f"Failed to read {part.field} at index {index}: expected "
                                     f"{part.nbytes} bytes, got {got}")
            values[part.field] = out
        values["P4_S16"] = values["P4_S16"][0]
        k = values["bboxes"].shape[0]
        values["box_annotation_ids"] = np.full((k,), -1, np.int64)  # not in the .bin format
        values["box_areas"] = np.full((k,), -1.0, np.float64)
        return values

    def __getitem__(self, index: int) -> dict[str, Any]:
        return distill_item(self.read_fields(index), self.keys[index])


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)
