"""Decode and validate the members of one SA-1B sample: JPEG, annotation JSON, features NPZ.

Every problem becomes a :class:`SampleError` that names the member and says what was expected.
NPZ files are loaded with ``allow_pickle=False``: object arrays are refused, never unpickled.
"""

from __future__ import annotations

import io
import json
import zipfile
from numbers import Real
from typing import Any

import cv2
import numpy as np

from arraystore.converters.sa1b.derive import Annotation
from arraystore.errors import SampleError

P4_SHAPE, P5_SHAPE = (256, 64, 64), (256, 32, 32)
P4_KEYS = ("P4_S16", "IMAGE_EMB_S16")  # IMAGE_EMB_S16 is the seeds' alias of P4


def decode_jpeg(data: bytes, where: str, sample_id: str) -> np.ndarray:
    """RGB uint8 (H, W, 3); a corrupt or non-image member is a :class:`SampleError`."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.ndim != 3 or image.shape[2] != 3:
        raise SampleError(where, sample_id, f"not a decodable JPEG ({len(data)} bytes)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _number(value: Any, what: str, where: str, sample_id: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise SampleError(where, sample_id, f"{what} must be a number, got {value!r}")
    return float(value)


def parse_annotations(
    data: bytes, where: str, sample_id: str, height: int, width: int
) -> list[Annotation]:
    """The annotations of an SA-1B JSON member, checked against the decoded image size."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SampleError(where, sample_id, f"malformed JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("image"), dict):
        raise SampleError(where, sample_id, "expected an object with an 'image' object "
                                            "(SA-1B schema: image, annotations)")
    image = doc["image"]
    declared = (image.get("height"), image.get("width"))
    if declared != (height, width):
        raise SampleError(where, sample_id, f"image.height/width {declared} disagree with the "
                                            f"JPEG's size {(height, width)}")
    raw = doc.get("annotations", [])
    if not isinstance(raw, list):
        raise SampleError(where, sample_id, "'annotations' must be a list")
    return [_annotation(a, n, where, sample_id, height, width) for n, a in enumerate(raw)]


def _annotation(
    raw: Any, n: int, where: str, sample_id: str, height: int, width: int
) -> Annotation:
    what = f"annotations[{n}]"
    if not isinstance(raw, dict):
        raise SampleError(where, sample_id, f"{what} must be an object")
    rle = raw.get("segmentation")
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise SampleError(where, sample_id, f"{what}.segmentation must be a COCO RLE "
                                            f"{{size, counts}}")
    if list(rle["size"]) != [height, width]:
        raise SampleError(where, sample_id, f"{what}: RLE size {rle['size']} disagrees with the "
                                            f"image size {[height, width]}")
    if not isinstance(rle["counts"], str | list):
        raise SampleError(where, sample_id, f"{what}: RLE counts must be a string or a list")
    bbox = raw.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise SampleError(where, sample_id, f"{what}.bbox must be [x, y, w, h], got {bbox!r}")
    ann_id = raw.get("id", -1)
    if isinstance(ann_id, bool) or not isinstance(ann_id, int):
        raise SampleError(where, sample_id, f"{what}.id must be an integer, got {ann_id!r}")
    return Annotation(
        id=ann_id,
        rle=rle,
        area=_number(raw.get("area"), f"{what}.area", where, sample_id),
        bbox=tuple(_number(v, f"{what}.bbox", where, sample_id) for v in bbox),
    )


def load_features(data: bytes, where: str, sample_id: str) -> tuple[np.ndarray, np.ndarray, int]:
    """P4 (256,64,64), P5 (256,32,32) float32 and the feature flag from a features NPZ.

    Accepts a leading batch axis of 1 and float16/float64 (cast to float32). An NPZ with its own
    ``feature_flag`` of 0 keeps that flag (its features are known to be stale).
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except ValueError as exc:  # object arrays need pickle, which is never allowed
        raise SampleError(where, sample_id, f"NPZ refused: {exc}") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise SampleError(where, sample_id, f"not a readable NPZ: {exc}") from exc
    p4_key = next((k for k in P4_KEYS if k in arrays), None)
    if p4_key is None or "P5_S32" not in arrays:
        raise SampleError(where, sample_id, f"features NPZ must hold P4_S16 (or IMAGE_EMB_S16) "
                                            f"and P5_S32; it holds {sorted(arrays)}")
    p4 = _feature(arrays[p4_key], P4_SHAPE, p4_key, where, sample_id)
    p5 = _feature(arrays["P5_S32"], P5_SHAPE, "P5_S32", where, sample_id)
    flag = int(arrays["feature_flag"]) if "feature_flag" in arrays else 1
    return p4, p5, int(flag != 0)


def _feature(
    value: np.ndarray, shape: tuple[int, ...], key: str, where: str, sample_id: str
) -> np.ndarray:
    if value.shape == (1, *shape):
        value = value[0]
    if value.shape != shape or value.dtype.kind != "f":
        raise SampleError(where, sample_id, f"{key}: shape {value.shape} dtype {value.dtype}, "
                                            f"expected float {shape} (or (1, {shape}))")
    return np.ascontiguousarray(value, dtype=np.float32)
