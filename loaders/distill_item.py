"""The item dict of ``BinaryDistillDataset`` (docs/formats.md), built from ``sa1b`` field values.

Both the Zarr dataset and the reference ``.bin`` reader build their items here, so they cannot
drift apart. Keys, dtypes and shapes are the contract the training code depends on. Each key is
built from the store fields listed beside it, so a caller asking for some keys reads only those
fields.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from arraystore.loaders.batched import Batched, Slot

Values = Mapping[str, np.ndarray]


def box_count(v: Values) -> int:
    """``num_bboxes`` of a sample's stored values (its ``metadata``)."""
    return int(v["metadata"][0])


def _box_meta(v: Values) -> list[dict[str, Any]]:
    ids, areas = v["box_annotation_ids"], v["box_areas"]
    return [{"annotation_id": int(ids[i]), "area": float(areas[i])} for i in range(box_count(v))]


def _float(values: np.ndarray) -> torch.Tensor:
    """uint8 maps as float32 tensors, converted by NumPy: torch's ``.float()`` hands a 256²
    map to its intra-op threads, which cost ~10× the conversion itself outside DataLoader
    workers (measured: 380 µs against ~30 µs per call on 2 cores)."""
    return torch.from_numpy(values.astype(np.float32))


# item key -> (store fields it needs, how it is built from them)
ITEM_KEYS: dict[str, tuple[tuple[str, ...], Callable[[Values], Any]]] = {
    "image": (("image",), lambda v: torch.from_numpy(v["image"]).permute(2, 0, 1)),
    "teacher_features": (("P4_S16",), lambda v: torch.from_numpy(v["P4_S16"])),
    "edge_256x256": (("edge_256x256",), lambda v: _float(v["edge_256x256"])),
    "fg_map": (("fg_map_64",), lambda v: torch.from_numpy(v["fg_map_64"]).unsqueeze(0)),
    "bg_map": (("bg_map_64",), lambda v: torch.from_numpy(v["bg_map_64"]).unsqueeze(0)),
    "edge_map": (("edge_64x64",), lambda v: _float(v["edge_64x64"]).unsqueeze(0)),
    "box_prompts_xyxy": (("bboxes", "metadata"),
                         lambda v: torch.from_numpy(v["bboxes"][: box_count(v)])),
    "box_prompts_masks_orig": (("masks", "metadata"),
                               lambda v: _float(v["masks"][: box_count(v)])),
    "box_prompts_count": (("metadata",), box_count),
    "box_prompts_flag": (("metadata",), lambda v: int(v["metadata"][1])),
    "box_prompts_meta": (("metadata", "box_annotation_ids", "box_areas"), _box_meta),
    "geometry_color_flag": ((), lambda v: 0),
    "has_bbox": (("metadata",), lambda v: bool(v["metadata"][1])),
    "num_bboxes": (("metadata",), box_count),
    "image_shape": (("metadata",), lambda v: np.array(v["metadata"][2:5], dtype=np.int32)),
}
ALL_KEYS: tuple[str, ...] = (*ITEM_KEYS, "image_id")


def fields_for(keys: Iterable[str]) -> tuple[str, ...]:
    """The store fields the item keys ``keys`` are built from, in a stable order."""
    unknown = sorted(set(keys) - set(ALL_KEYS))
    if unknown:
        raise KeyError(f"unknown item keys {unknown}; the item has {list(ALL_KEYS)}")
    wanted = set(keys)
    ordered: list[str] = []
    for key, (fields, _) in ITEM_KEYS.items():
        if key in wanted:
            ordered.extend(f for f in fields if f not in ordered)
    return tuple(ordered)


DISTILL_FIELDS: tuple[str, ...] = fields_for(ALL_KEYS)


def distill_item(values: Values, image_id: str, keys: Sequence[str] = ALL_KEYS) -> dict[str, Any]:
    """The training dict of one sample (or its ``keys`` only) from the stored field values."""
    item = {key: ITEM_KEYS[key][1](values) for key in keys if key in ITEM_KEYS}
    if "image_id" in keys:
        item["image_id"] = image_id
    return item


_STACKED = ("image", "teacher_features", "edge_256x256", "fg_map", "bg_map", "edge_map")
# the stacked keys as slots of a batch buffer: the same values as stacking the items' tensors
STACKED_SLOTS: dict[str, Slot] = {
    "image": Slot("image", "image", torch.uint8, lambda t: t.permute(0, 3, 1, 2)),
    "teacher_features": Slot("teacher_features", "P4_S16", torch.float32),
    "edge_256x256": Slot("edge_256x256", "edge_256x256", torch.float32),
    "fg_map": Slot("fg_map", "fg_map_64", torch.float32, lambda t: t.unsqueeze(1)),
    "bg_map": Slot("bg_map", "bg_map_64", torch.float32, lambda t: t.unsqueeze(1)),
    "edge_map": Slot("edge_map", "edge_64x64", torch.float32, lambda t: t.unsqueeze(1)),
}
# the boxes' masks, listed per item (their count varies), are read into a slot of the batch
# buffer too, all max_boxes rows of each sample converted to float32: each item's masks are
# then a view of its first num_bboxes rows, and cross from a DataLoader worker in its segment
# (as one item's own tensors they were pickled into the queue, 256 KiB a box)
MASKS_SLOT = Slot("box_prompts_masks_orig", "masks", torch.float32)
_LISTED = ("box_prompts_xyxy", "box_prompts_masks_orig", "box_prompts_meta", "image_id")
_COUNTS = ("box_prompts_count", "box_prompts_flag", "geometry_color_flag", "num_bboxes")


def collate_distill(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch items: fixed-shape tensors stacked, per-item boxes, masks and meta kept as lists
    (their first dimension varies with the number of boxes), scalars as tensors.

    Stacking goes through ``default_collate``, which in a DataLoader worker stacks straight into
    shared memory: the batch then crosses to the main process without another copy. A batch
    that ``ZarrDistillDataset.__getitems__`` already read into one buffer is returned as is.
    """
    if isinstance(items, Batched):
        return items.collated()
    present = items[0].keys()
    batch: dict[str, Any] = {k: default_collate([i[k] for i in items]) for k in _STACKED
                             if k in present}
    batch.update({k: [i[k] for i in items] for k in _LISTED if k in present})
    batch.update({k: torch.tensor([i[k] for i in items], dtype=torch.int64) for k in _COUNTS
                  if k in present})
    if "has_bbox" in present:
        batch["has_bbox"] = torch.tensor([i["has_bbox"] for i in items], dtype=torch.bool)
    if "image_shape" in present:
        batch["image_shape"] = torch.from_numpy(np.stack([i["image_shape"] for i in items]))
    return batch
