"""Write SA-1B-style TAR shards: JPEG + annotation JSON (real COCO RLE) [+ features NPZ].

The inverse of the ``sa1b`` source, for the bundled sample, the tests and the benchmarks. The
JSON follows the SA-1B schema (``image`` + ``annotations`` with ``segmentation {size, counts}``,
``area``, ``bbox``, ``predicted_iou``, ``stability_score``, ``crop_box``, ``point_coords``).
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

FIXED_MTIME = 1_700_000_000  # reproducible archives


@dataclass
class ShardSample:
    """One sample to write: key, RGB image, instance masks at the image size, optional P4/P5."""

    key: str
    rgb: np.ndarray
    masks: Sequence[np.ndarray] = ()
    features: tuple[np.ndarray, np.ndarray] | None = None
    annotation_ids: Sequence[int] | None = None
    jpeg_quality: int = 92
    extra: dict[str, bytes] = field(default_factory=dict)  # more members: name -> bytes


def annotation_document(sample: ShardSample, image_id: int) -> dict[str, Any]:
    height, width = sample.rgb.shape[:2]
    ids = sample.annotation_ids or [1000 * image_id + n for n in range(len(sample.masks))]
    annotations = []
    for ann_id, mask in zip(ids, sample.masks, strict=True):
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        x, y, w, h = (float(v) for v in mask_utils.toBbox(encoded))
        rle = {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode()}
        annotations.append({
            "id": int(ann_id),
            "segmentation": rle,
            "area": int(mask.astype(bool).sum()),
            "bbox": [x, y, w, h],
            "predicted_iou": 0.9,
            "stability_score": 0.95,
            "crop_box": [0.0, 0.0, float(width), float(height)],
            "point_coords": [[x + w / 2, y + h / 2]],
        })
    return {
        "image": {"image_id": image_id, "width": width, "height": height,
                  "file_name": f"{sample.key}.jpg"},
        "annotations": annotations,
    }


def jpeg_bytes(rgb: np.ndarray, quality: int = 92) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()


def npz_bytes(arrays: dict[str, np.ndarray], compressed: bool = True) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def sample_members(sample: ShardSample, image_id: int) -> list[tuple[str, bytes]]:
    """The TAR members of one sample, in WebDataset order."""
    members = [
        (f"{sample.key}.jpg", jpeg_bytes(sample.rgb, sample.jpeg_quality)),
        (f"{sample.key}.json", json.dumps(annotation_document(sample, image_id)).encode()),
    ]
    if sample.features is not None:
        p4, p5 = sample.features
        members.append((f"{sample.key}_features.npz",
                        npz_bytes({"P4_S16": p4, "P5_S32": p5, "IMAGE_EMB_S16": p4})))
    members.extend(sample.extra.items())
    return members


def write_members(path: Path, members: Iterable[tuple[str, bytes]]) -> Path:
    """A plain TAR of ``(name, bytes)`` members with fixed metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), FIXED_MTIME, 0o644
            archive.addfile(info, io.BytesIO(data))
    return path


def write_shard(path: Path, samples: Iterable[ShardSample]) -> Path:
    """Write ``samples`` as one SA-1B-style shard at ``path``."""
    return write_members(path, (m for n, s in enumerate(samples, 1)
                                for m in sample_members(s, n)))


def random_masks(rng: np.random.Generator, height: int, width: int, count: int) -> list[np.ndarray]:
    """``count`` filled ellipses and polygons, placed so that several overlap."""
    masks = []
    for n in range(count):
        mask = np.zeros((height, width), np.uint8)
        cx, cy = int(rng.integers(width // 5, 4 * width // 5)), int(
            rng.integers(height // 5, 4 * height // 5))
        if n % 2 == 0:
            axes = (int(rng.integers(width // 12, width // 4)),
                    int(rng.integers(height // 12, height // 4)))
            cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:
            radius = min(height, width) // 5
            angles = np.sort(rng.uniform(0, 2 * np.pi, 6))
            points = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1)
            cv2.fillPoly(mask, [points.astype(np.int32)], 1)
        masks.append(mask)
    return masks
