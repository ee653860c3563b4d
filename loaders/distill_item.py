"""The item dict of ``BinaryDistillDataset`` (SEEDS.md 000), built from ``sa1b`` field values.

Both the Zarr dataset and the reference ``.bin`` reader build their items here, so they cannot
drift apart. Keys, dtypes and shapes are the contract the training code depends on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

# The store fields an item needs: P5, the other map sizes and the flags are not read.
DISTILL_FIELDS: tuple[str, ...] = (
    "image", "P4_S16", "edge_256x256", "edge_64x64", "fg_map_64", "bg_map_64",
    "bboxes", "masks", "metadata", "box_annotation_ids", "box_areas",
)


def distill_item(values: Mapping[str, np.ndarray], image_id: str) -> dict[str, Any]:
    """The training dict of one sample from its field values (arrays as the store holds them)."""
    metadata = values["metadata"]
    n, has_bbox = int(metadata[0]), int(metadata[1])
    ids, areas = values["box_annotation_ids"], values["box_areas"]
    return {
        "image": torch.from_numpy(values["image"]).permute(2, 0, 1),
        "teacher_features": torch.from_numpy(values["P4_S16"]),
        "edge_256x256": torch.from_numpy(values["edge_256x256"]).float(),
        "fg_map": torch.from_numpy(values["fg_map_64"]).unsqueeze(0),
        "bg_map": torch.from_numpy(values["bg_map_64"]).unsqueeze(0),
        "edge_map": torch.from_numpy(values["edge_64x64"]).float().unsqueeze(0),
        "box_prompts_xyxy": torch.from_numpy(values["bboxes"][:n]),
        "box_prompts_masks_orig": torch.from_numpy(values["masks"][:n]).float(),
        "box_prompts_count": n,
        "box_prompts_flag": has_bbox,
        "box_prompts_meta": [
            {"annotation_id": int(ids[i]), "area": float(areas[i])} for i in range(n)
        ],
        "geometry_color_flag": 0,
        "has_bbox": bool(has_bbox),
        "num_bboxes": n,
        "image_shape": np.array(metadata[2:5], dtype=np.int32),
        "image_id": image_id,
    }


_STACKED = ("image", "teacher_features", "edge_256x256", "fg_map", "bg_map", "edge_map")


def collate_distill(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch items: fixed-shape tensors stacked, per-item boxes, masks and meta kept as lists
    (their first dimension varies with the number of boxes), scalars as tensors."""
    batch: dict[str, Any] = {key: torch.stack([item[key] for item in items]) for key in _STACKED}
    for key in ("box_prompts_xyxy", "box_prompts_masks_orig", "box_prompts_meta", "image_id"):
        batch[key] = [item[key] for item in items]
    for key in ("box_prompts_count", "box_prompts_flag", "geometry_color_flag", "num_bboxes"):
        batch[key] = torch.tensor([item[key] for item in items], dtype=torch.int64)
    batch["has_bbox"] = torch.tensor([item["has_bbox"] for item in items], dtype=torch.bool)
    batch["image_shape"] = torch.from_numpy(np.stack([item["image_shape"] for item in items]))
    return batch
