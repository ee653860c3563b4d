"""Derive every ``sa1b`` field from one decoded sample, exactly as docs/format.md defines them.

Pure functions of NumPy arrays (OpenCV and pycocotools do the pixel work); no I/O. Masks are
decoded one annotation at a time so a 100-annotation, 1500x2250 image never holds more than one
full-resolution mask besides the two accumulators, and the work per mask is confined to its box
(see :class:`MaskAccumulator`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from arraystore.kinds.sa1b import (
    EDGE_SIZES,
    EDGE_VERSION,
    IMAGE_SIZE,
    MAP_SIZES,
    MASK_SIZE,
)


@dataclass(frozen=True)
class Annotation:
    """The parts of one SA-1B annotation the fields use."""

    id: int
    rle: dict[str, Any]
    area: float
    bbox: tuple[float, float, float, float]  # x, y, w, h at H x W


def resize_image(rgb: np.ndarray) -> np.ndarray:
    """``cv2.resize`` to 1024x1024: INTER_AREA if H >= 1024 and W >= 1024, else INTER_LINEAR."""
    h, w = rgb.shape[:2]
    interpolation = cv2.INTER_AREA if h >= IMAGE_SIZE and w >= IMAGE_SIZE else cv2.INTER_LINEAR
    return cv2.resize(rgb, (IMAGE_SIZE, IMAGE_SIZE), interpolation=interpolation)


def encoded_rle(rle: dict[str, Any]) -> dict[str, Any]:
    """A COCO RLE with compressed counts (uncompressed list counts are encoded first)."""
    if isinstance(rle.get("counts"), list):
        h, w = rle["size"]
        return mask_utils.frPyObjects(rle, h, w)
    return rle


class MaskAccumulator:
    """Masks added one at a time at H x W: their union and their Method B edge.

    Method B ORs each mask's own morphological gradient (``MORPH_GRADIENT``, a ``kernel_size``
    square of ones), which differs from the gradient of the union where masks overlap.

    The work per mask is local and copies nothing: masks are taken in the transposed (W, H)
    frame pycocotools decodes into, and the gradient, the union and the OR are computed on the
    mask's box (from the RLE, without decoding) grown by the kernel's radius. That is exact:
    outside that margin a mask's gradient is zero, and inside it OpenCV's default border for
    erosion and dilation never binds (a pixel whose neighbourhood leaves the margin lies outside
    the box, so it is 0 and the erosion there is 0 either way); a square kernel commutes with
    the transpose. The full image is transposed back once, for the resizes.
    """

    def __init__(self, shape: tuple[int, int], kernel_size: int = 3) -> None:
        height, width = shape
        self.union_t = np.zeros((width, height), np.uint8)
        self.edge_t = np.zeros((width, height), dtype=bool)
        self._kernel = np.ones((kernel_size, kernel_size), np.uint8)
        self._radius = kernel_size // 2

    def add_rle(self, rle: dict[str, Any]) -> np.ndarray:
        """Decode one annotation's mask, add it, and return it (transposed, (W, H))."""
        encoded = encoded_rle(rle)
        mask_t = mask_utils.decode(encoded).T
        x, y, w, h = (round(float(v)) for v in mask_utils.toBbox(encoded))
        if w and h:
            r = self._radius
            rows = slice(max(0, x - r), min(mask_t.shape[0], x + w + r))
            columns = slice(max(0, y - r), min(mask_t.shape[1], y + h + r))
            local = mask_t[rows, columns]
            self.union_t[rows, columns] |= local
            self.edge_t[rows, columns] |= cv2.morphologyEx(local, cv2.MORPH_GRADIENT,
                                                           self._kernel) > 0
        return mask_t

    def edge_maps(self) -> dict[str, np.ndarray]:
        """``resize(edge as float32, (s, s), INTER_AREA) > 0`` as uint8 for s in 256, 64, 32.

        Resized in the transposed frame and the small result transposed: an area average of a
        non-negative image is > 0 exactly where some covered pixel is, whatever the order of
        its sums, so this is the same test without turning the whole image around."""
        edge_t = self.edge_t.astype(np.float32)
        return {
            f"edge_{s}x{s}": np.ascontiguousarray(
                (cv2.resize(edge_t, (s, s), interpolation=cv2.INTER_AREA) > 0).T
            ).astype(np.uint8)
            for s in EDGE_SIZES
        }

    def weight_maps(self) -> dict[str, np.ndarray]:
        """fg maps: the union as float32 resized with INTER_AREA; bg maps: 1 - fg."""
        union = np.ascontiguousarray(self.union_t.T, dtype=np.float32)
        out: dict[str, np.ndarray] = {}
        for s in MAP_SIZES:
            fg = cv2.resize(union, (s, s), interpolation=cv2.INTER_AREA)
            out[f"fg_map_{s}"] = fg
            out[f"bg_map_{s}"] = (1.0 - fg).astype(np.float32)
        return out


def largest(annotations: Sequence[Annotation], k: int) -> list[int]:
    """Indices of the ``k`` annotations of largest area, ties broken by input order."""
    order = sorted(range(len(annotations)), key=lambda i: -annotations[i].area)
    return order[:k]


def box_fields(
    annotations: Sequence[Annotation], chosen: Sequence[int], chosen_masks: Sequence[np.ndarray],
    height: int, width: int, k: int,
) -> dict[str, np.ndarray]:
    """bboxes (xyxy scaled to 1024), masks (INTER_NEAREST to 256), ids and areas of the chosen."""
    bboxes = np.zeros((k, 4), np.float32)
    masks = np.zeros((k, MASK_SIZE, MASK_SIZE), np.uint8)
    ids = np.full((k,), -1, np.int64)
    areas = np.full((k,), -1.0, np.float64)
    sx, sy = IMAGE_SIZE / width, IMAGE_SIZE / height
    for row, (i, mask) in enumerate(zip(chosen, chosen_masks, strict=True)):
        x, y, w, h = annotations[i].bbox
        bboxes[row] = np.array([x * sx, y * sy, (x + w) * sx, (y + h) * sy], np.float64)
        masks[row] = cv2.resize(mask, (MASK_SIZE, MASK_SIZE), interpolation=cv2.INTER_NEAREST)
        ids[row] = annotations[i].id
        areas[row] = annotations[i].area
    return {"bboxes": bboxes, "masks": masks, "box_annotation_ids": ids, "box_areas": areas}


def derive_fields(
    rgb: np.ndarray, annotations: Sequence[Annotation], max_boxes: int, kernel_size: int = 3
) -> dict[str, np.ndarray]:
    """Every mask-derived and image field of one sample (features and ids excluded)."""
    height, width = rgb.shape[:2]
    chosen = largest(annotations, max_boxes)
    masks = MaskAccumulator((height, width), kernel_size)
    chosen_masks: dict[int, np.ndarray] = {}
    for i, ann in enumerate(annotations):  # each mask decoded once, used for all its fields
        mask_t = masks.add_rle(ann.rle)
        if i in chosen:
            chosen_masks[i] = np.ascontiguousarray(mask_t.T)
    n = len(chosen)
    return {
        "image": resize_image(rgb),
        **masks.edge_maps(),
        "edge_flag": np.uint8(1),
        "edge_version": EDGE_VERSION,
        **masks.weight_maps(),
        **box_fields(annotations, chosen, [chosen_masks[i] for i in chosen], height, width,
                     max_boxes),
        "metadata": np.array([n, int(n > 0), height, width, 3], np.int32),
    }
