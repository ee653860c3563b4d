"""The raw fixed-stride ``.bin`` layout of ``sa1b`` samples (docs/formats.md), which
``BinaryDistillDataset`` reads.

One file per group of fields; sample ``i`` of a file sits at byte ``i * item_size``; within an
item the fields follow one another in a fixed order, little-endian, C order. ``config.json``
holds the global configuration and ``keys.txt`` the sample ids, one per line. This module is the
single statement of that layout: the reference reader, the ``bin`` source and the ``bin`` exporter
all use it. It needs only NumPy. Its sizes are the ``sa1b`` kind's (:mod:`.sa1b`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from arraystore.errors import ArrayStoreError
from arraystore.kinds.sa1b import DEFAULT_MAX_BOXES, EDGE_SIZES, IMAGE_SIZE, MAP_SIZES, MASK_SIZE

CONFIG_FILE = "config.json"
KEYS_FILE = "keys.txt"


class BinConfigNotFoundError(ArrayStoreError, FileNotFoundError):
    """A ``.bin`` dataset directory without its ``config.json``."""


class BinFormatError(ArrayStoreError, OSError):
    """A ``.bin`` file whose size or contents disagree with the format."""


@dataclass(frozen=True)
class BinPart:
    """One field inside a ``.bin`` item: its name in the store and its stored shape and dtype."""

    field: str
    shape: tuple[int, ...]
    dtype: str  # explicit byte order, e.g. "<f4"

    @cached_property  # read paths ask for it on every item
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class BinFile:
    """One ``.bin`` file: its name and the parts of each fixed-size item, in order."""

    name: str
    parts: tuple[BinPart, ...]

    @cached_property
    def item_size(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def offset_of(self, field: str) -> int:
        """Byte offset of ``field`` inside one item."""
        offset = 0
        for part in self.parts:
            if part.field == field:
                return offset
            offset += part.nbytes
        raise KeyError(f"{self.name} holds no field {field!r}")


def bin_files(max_boxes: int = DEFAULT_MAX_BOXES) -> tuple[BinFile, ...]:
    """The files of a ``.bin`` dataset with ``max_boxes`` boxes per sample (usually 1)."""
    k = max_boxes
    maps = tuple(
        BinPart(f"{kind}_map_{s}", (s, s), "<f4") for s in MAP_SIZES for kind in ("fg", "bg")
    )
    return (
        BinFile("images.bin", (BinPart("image", (IMAGE_SIZE, IMAGE_SIZE, 3), "|u1"),)),
        BinFile("features.bin", (BinPart("P4_S16", (1, 256, 64, 64), "<f4"),
                                 BinPart("P5_S32", (1, 256, 32, 32), "<f4"))),
        BinFile("edge_maps.bin", tuple(BinPart(f"edge_{s}x{s}", (s, s), "|u1")
                                       for s in EDGE_SIZES)),
        BinFile("weight_maps.bin", maps),
        BinFile("bboxes.bin", (BinPart("bboxes", (k, 4), "<f4"),)),
        BinFile("masks.bin", (BinPart("masks", (k, MASK_SIZE, MASK_SIZE), "|u1"),)),
        BinFile("metadata.bin", (BinPart("metadata", (5,), "<i4"),)),
    )


def read_config(root: Path) -> dict[str, Any]:
    """``config.json`` of a ``.bin`` directory (the seed's error message when it is missing)."""
    path = Path(root) / CONFIG_FILE
    if not path.is_file():
        raise BinConfigNotFoundError(f"Config not found at {path}")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BinFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise BinFormatError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def max_boxes_of(config: dict[str, Any]) -> int:
    value = config.get("max_boxes", DEFAULT_MAX_BOXES)
    if not isinstance(value, int) or value < 1:
        raise BinFormatError(f"{CONFIG_FILE}: max_boxes must be a positive integer, got {value!r}")
    return value


def read_keys(root: Path) -> list[str]:
    """Sample ids from ``keys.txt`` (one per line)."""
    path = Path(root) / KEYS_FILE
    if not path.is_file():
        raise BinFormatError(f"{path}: keys file missing; it lists the sample ids, one per line")
    return [line for line in path.read_text().splitlines() if line]


def check_sizes(root: Path, files: tuple[BinFile, ...], num_samples: int) -> None:
    """Every file must hold exactly ``num_samples`` items; name the first that does not."""
    for spec in files:
        path = Path(root) / spec.name
        if not path.is_file():
            raise BinFormatError(f"{path}: missing (expected {num_samples} items of "
                                 f"{spec.item_size} bytes)")
        size = path.stat().st_size
        if size % spec.item_size:
            raise BinFormatError(
                f"{path}: size {size} bytes is not a multiple of the item size "
                f"{spec.item_size} (expected {spec.item_size} bytes per sample, got "
                f"{size % spec.item_size} bytes past the last whole item): truncated or "
                f"written with another format"
            )
        if size // spec.item_size != num_samples:
            raise BinFormatError(
                f"{path}: holds {size // spec.item_size} items but {KEYS_FILE} lists "
                f"{num_samples} samples"
            )


@dataclass(frozen=True)
class BinDirectory:
    """A checked ``.bin`` folder: its config, sample ids and file layout."""

    root: Path
    config: dict[str, Any]
    keys: list[str]
    files: tuple[BinFile, ...]


def open_bin_directory(root: str | Path) -> BinDirectory:
    """Read and check a ``.bin`` folder: config present, ids unique, every file whole."""
    root = Path(root)
    config = read_config(root)
    keys = read_keys(root)
    files = bin_files(max_boxes_of(config))
    check_sizes(root, files, len(keys))
    duplicated = sorted(k for k, n in Counter(keys).items() if n > 1)
    if duplicated:
        raise BinFormatError(f"{root / KEYS_FILE}: duplicated sample ids {duplicated[:5]}")
    return BinDirectory(root, config, keys, files)
