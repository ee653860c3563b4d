"""Look up per-segment embeddings of a ``mask_embeddings`` store by ``(image_id, segment_id)``.

The map from a pair to its row is an open-addressing hash table (linear probing, Fibonacci
hashing, load at most 1/2) built from the two id arrays in NumPy rounds -- each round places
every pending key whose slot is free, so 10^6 rows take a handful of vectorised passes and no
per-row Python -- and ``get`` is one to a few probes: O(1). Rows of one image are found through
an argsort of the image ids. Embeddings are held in RAM when they fit ``in_memory`` (default: up
to 2 GiB), else read a block of rows at a time.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from arraystore.kinds.mask_embeddings import KIND
from arraystore.reader import SampleReader

SEGMENT_BITS = 24  # panoptic ids are R + 256 G + 256^2 B < 2^24
GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: Fibonacci hashing
IN_MEMORY_LIMIT = 2 << 30


def pair_keys(image_ids: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """One uint64 per pair: ``image_id << 24 | segment_id``."""
    image_ids, segment_ids = np.asarray(image_ids), np.asarray(segment_ids)
    if (segment_ids < 0).any() or (segment_ids >= 1 << SEGMENT_BITS).any() or (
            image_ids < 0).any() or (image_ids >= 1 << (63 - SEGMENT_BITS)).any():
        raise ValueError("ids out of range: segment ids are < 2^24, image ids < 2^39")
    return (image_ids.astype(np.uint64) << np.uint64(SEGMENT_BITS)) | segment_ids.astype(
        np.uint64)


def build_slots(keys: np.ndarray) -> tuple[np.ndarray, int]:
    """The hash table of ``keys``: slot -> row (-1 where empty), and its size in bits."""
    bits = max(1, int(2 * max(1, len(keys)) - 1).bit_length())
    size = 1 << bits
    slots = np.full(size, -1, np.int64)
    position = ((keys * np.uint64(GOLDEN)) >> np.uint64(64 - bits)).astype(np.int64)
    pending = np.arange(len(keys))
    while len(pending):
        wanted = position[pending]
        free_slots, first = np.unique(wanted, return_index=True)
        free = slots[free_slots] == -1
        slots[free_slots[free]] = pending[first[free]]
        placed = np.zeros(len(pending), bool)
        placed[first[free]] = True
        pending = pending[~placed]
        position[pending] = (position[pending] + 1) & (size - 1)
    return slots, bits


class EmbeddingTable:
    """``table.get(image_id, segment_id)`` -> (D,) float16; ``table.for_image(image_id)`` ->
    (segment ids, (K, D) embeddings); ``len(table)`` rows."""

    def __init__(self, path: str | os.PathLike[str], in_memory: bool | None = None,
                 backend: str = "auto") -> None:
        self.reader = SampleReader(path, backend=backend, fields=("embedding",), kind=KIND,
                                   user="EmbeddingTable")
        self.image_ids = self.reader.column("image_id")
        self.segment_ids = self.reader.column("segment_id")
        self._keys = pair_keys(self.image_ids, self.segment_ids)
        self._slots, self._bits = build_slots(self._keys)
        self._by_image = np.argsort(self.image_ids, kind="stable")
        self._sorted_images = self.image_ids[self._by_image]
        width = self.reader.schema["embedding"].nbytes
        if in_memory is None:
            in_memory = width * len(self.reader) <= IN_MEMORY_LIMIT
        self._embeddings = self.reader.column("embedding") if in_memory else None

    def __len__(self) -> int:
        return len(self.reader)

    def row(self, image_id: int, segment_id: int) -> int:
        """The row of a pair; :class:`KeyError` naming it when absent."""
        key = (int(image_id) << SEGMENT_BITS) | int(segment_id)
        mask = len(self._slots) - 1
        slot = ((key * GOLDEN) & ((1 << 64) - 1)) >> (64 - self._bits)
        while True:
            row = int(self._slots[slot])
            if row < 0:
                raise KeyError(f"no embedding for image {image_id}, segment {segment_id} in "
                               f"{self.reader.path}")
            if int(self._keys[row]) == key:
                return row
            slot = (slot + 1) & mask

    def _embedding(self, row: int) -> np.ndarray:
        if self._embeddings is not None:
            return self._embeddings[row]
        return self.reader.read(row, ("embedding",))["embedding"]

    def get(self, image_id: int, segment_id: int) -> np.ndarray:
        return self._embedding(self.row(image_id, segment_id))

    def for_image(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(segment ids, their embeddings) of every segment of one image, in row order."""
        low, high = np.searchsorted(self._sorted_images, [image_id, image_id + 1])
        rows = np.sort(self._by_image[low:high])
        embeddings = (self._embeddings[rows] if self._embeddings is not None else
                      np.stack([self._embedding(int(r)) for r in rows]) if len(rows) else
                      np.zeros((0, self.reader.schema["embedding"].shape[0]), np.float16))
        return self.segment_ids[rows], embeddings


class MaskEmbeddingDataset(Dataset):
    """Rows of a ``mask_embeddings`` store: ``embedding`` (float32 tensor), ``image_id``,
    ``segment_id``, ``category_id``, ``area`` (ints; -1 when unknown), ``bbox`` (the
    annotation's x y w h) and ``crop_box`` (the crop embedded: x0 y0 x1 y1, exclusive ends;
    -1 when unknown), both float32 tensors."""

    def __init__(self, path: str | os.PathLike[str], backend: str = "auto") -> None:
        self.reader = SampleReader(path, backend=backend, fields=(
            "embedding", "image_id", "segment_id", "category_id", "area", "bbox", "crop_box"),
            kind=KIND, user="MaskEmbeddingDataset")

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.reader.read(index)
        return {"embedding": torch.from_numpy(row["embedding"].astype(np.float32)),
                "image_id": int(row["image_id"]), "segment_id": int(row["segment_id"]),
                "category_id": int(row["category_id"]), "area": int(row["area"]),
                "bbox": torch.from_numpy(np.array(row["bbox"], np.float32)),
                "crop_box": torch.from_numpy(np.array(row["crop_box"], np.float32))}
