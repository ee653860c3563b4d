"""The exact crop of one panoptic segment (docs/formats.md).

Pure NumPy, no model: segment ids from the PNG's RGB (``R + 256 G + 256^2 B``), the segment's
tight box, the padded crop clipped to the image, and the background faded toward black.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def segment_ids(rgb: np.ndarray) -> np.ndarray:
    """(H, W) int64 ids of a panoptic PNG decoded as RGB uint8."""
    channels = rgb.astype(np.int64)
    return channels[..., 0] + 256 * channels[..., 1] + 256 * 256 * channels[..., 2]


@dataclass(frozen=True)
class SegmentCrop:
    """The faded crop of one segment, its box (x0, y0, x1, y1 with exclusive ends) and area."""

    pixels: np.ndarray  # (h, w, 3) uint8
    crop_box: tuple[int, int, int, int]
    area: int


def crop_segment(image: np.ndarray, mask: np.ndarray, pad_ratio: float,
                 bg_alpha: float) -> SegmentCrop | None:
    """The crop of the segment ``mask`` (bool, H x W) of ``image`` (RGB uint8), or None when the
    mask is empty.

    Tight box ``x0..x1``, ``y0..y1`` (inclusive); padding ``px = round(pad_ratio * (x1 - x0 +
    1))``, ``py = round(pad_ratio * (y1 - y0 + 1))`` (Python's ``round``: halves to even); crop
    ``[y0 - py, y1 + py] x [x0 - px, x1 + px]`` clipped to the image; inside it, pixels of the
    segment keep their RGB and the others become ``round(bg_alpha * value)`` (NumPy's
    ``round``, halves to even).
    """
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(columns[0]), int(columns[-1])
    px, py = round(pad_ratio * (x1 - x0 + 1)), round(pad_ratio * (y1 - y0 + 1))
    height, width = mask.shape
    top, bottom = max(0, y0 - py), min(height - 1, y1 + py)
    left, right = max(0, x0 - px), min(width - 1, x1 + px)
    window = (slice(top, bottom + 1), slice(left, right + 1))
    faded = np.round(bg_alpha * image[window].astype(np.float64)).astype(np.uint8)
    inside = mask[window]
    faded[inside] = image[window][inside]
    return SegmentCrop(faded, (left, top, right + 1, bottom + 1), int(mask.sum()))
