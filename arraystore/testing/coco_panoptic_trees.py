"""Write a small COCO panoptic tree (``ROOT/{split}/``, ``ROOT/panoptic_{split}/``,
``ROOT/annotations/panoptic_{split}.json``) from scikit-image's photographs: for the tests and
the benchmark, the inverse of the ``coco-embeddings`` source.

Segment ids use all three channels of the PNG (``R + 256 G + 256^2 B``). The first image holds a
one-pixel segment and a segment listed in the JSON but absent from its PNG; the last image has
no segments at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from arraystore.converters.coco_panoptic.crops import segment_ids

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
ABSENT_SEGMENT = 0x0A0B0C  # listed, never painted


def _photo(name: str) -> np.ndarray:
    from skimage import data

    image = getattr(data, name)()
    return image if image.ndim == 3 else np.stack([image] * 3, axis=-1)


def _id_rgb(segment_id: int) -> tuple[int, int, int]:
    return segment_id % 256, segment_id // 256 % 256, segment_id // 65536


def _segments(rng: np.random.Generator, height: int, width: int,
              count: int) -> list[np.ndarray]:
    masks = []
    for n in range(count):
        mask = np.zeros((height, width), np.uint8)
        centre = (int(rng.integers(width // 5, 4 * width // 5)),
                  int(rng.integers(height // 5, 4 * height // 5)))
        axes = (int(rng.integers(width // 10, width // 4)),
                int(rng.integers(height // 10, height // 4)))
        if n % 2:
            cv2.rectangle(mask, (centre[0] - axes[0], centre[1] - axes[1]),
                          (centre[0] + axes[0], centre[1] + axes[1]), 1, -1)
        else:
            cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        masks.append(mask.astype(bool))
    return masks


def write_coco_panoptic(root: Path, split: str = "val2017", images: int = 4,
                        segments_per_image: int = 4, seed: int = 0) -> dict[str, Any]:
    """The tree at ``root``; returns the JSON document it wrote."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for folder in (split, f"panoptic_{split}", "annotations"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"images": [], "annotations": [], "categories": [
        {"id": c, "name": f"category {c}", "isthing": int(c < 90)}
        for c in (1, 18, 62, 92, 130)]}
    for n in range(images):
        photo = _photo(PHOTOS[n % len(PHOTOS)])
        height, width = photo.shape[:2]
        image_id = 397133 + 1000 * n
        stem = f"{image_id:012d}"
        cv2.imwrite(str(root / split / f"{stem}.jpg"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
        panoptic = np.zeros((height, width, 3), np.uint8)
        infos = []
        last = n == images - 1
        painted = np.zeros((height, width), bool)
        for k, mask in enumerate([] if last else _segments(rng, height, width,
                                                           segments_per_image)):
            free = mask & ~painted  # panoptic segments never overlap
            if not free.any():
                continue
            segment_id = (k + 1) * 65536 + (n + 1) * 256 + 7 * k + 1  # all three channels
            panoptic[free] = _id_rgb(segment_id)
            painted |= free
            infos.append(segment_id)
        if n == 0:
            one_pixel = 0x030201
            panoptic[height - 3, width - 5] = _id_rgb(one_pixel)
            infos += [one_pixel, ABSENT_SEGMENT]
        segments_info = []
        ids = segment_ids(panoptic)
        for segment_id in infos:
            ys, xs = np.nonzero(ids == segment_id)
            bbox = ([int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                     int(ys.max() - ys.min() + 1)] if len(xs) else [0, 0, 1, 1])
            segments_info.append({"id": int(segment_id),
                                  "category_id": int(rng.choice([1, 18, 62, 92, 130])),
                                  "area": len(xs), "bbox": bbox, "iscrowd": 0})
        cv2.imwrite(str(root / f"panoptic_{split}" / f"{stem}.png"),
                    cv2.cvtColor(panoptic, cv2.COLOR_RGB2BGR))
        doc["images"].append({"id": image_id, "file_name": f"{stem}.jpg", "height": height,
                              "width": width})
        doc["annotations"].append({"image_id": image_id, "file_name": f"{stem}.png",
                                   "segments_info": segments_info})
    (root / "annotations" / f"panoptic_{split}.json").write_text(json.dumps(doc))
    return doc
