"""Every sa1b field against its definition in docs/format.md, recomputed here independently.

The masks are generated with known geometry (rectangles, disks); edges are recomputed with a NumPy
3x3 window (max != min), INTER_AREA at whole-number factors is a block mean, boxes come from mask
extents and areas from pixel counts. Where a factor is fractional the definition *is* the named
``cv2.resize`` call, applied here to the independently computed full-resolution map.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from arraystore import SampleReader, ingest
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.testing.sa1b_shards import ShardSample

MAX_BOXES = 2


def gradient_edge(mask: np.ndarray) -> np.ndarray:
    """Morphological gradient > 0 with a 3x3 square: the in-image 3x3 window holds 0 and 1."""
    padded = np.pad(mask, 1, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3))
    return windows.max(axis=(2, 3)) != windows.min(axis=(2, 3))


def block_mean(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape
    return image.reshape(size, h // size, size, w // size).mean(axis=(1, 3))


def area_resize(image: np.ndarray, size: int) -> np.ndarray:
    """INTER_AREA: a block mean where the factor is whole, else the cv2 call itself."""
    h, w = image.shape
    if h % size == 0 and w % size == 0:
        return block_mean(image.astype(np.float64), size)
    return cv2.resize(image.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)


def extent_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1


def decoded_jpegs(shard: Path) -> dict[str, np.ndarray]:
    with tarfile.open(shard) as archive:
        return {
            m.name[:-4]: cv2.cvtColor(cv2.imdecode(np.frombuffer(
                archive.extractfile(m).read(), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            for m in archive.getmembers() if m.name.endswith(".jpg")
        }


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory, shard: Path) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("fields") / "sa1b.zarr"
    ingest(Sa1bTarSource(max_boxes=MAX_BOXES), [shard], out, workers=2)
    reader = SampleReader(out, backend="zarr")
    return {reader.sample_ids[i]: reader.read(i) for i in range(len(reader))}


def test_all_samples_stored_in_shard_order(stored: dict, samples: list[ShardSample]) -> None:
    assert list(stored) == [s.key for s in samples]


@pytest.mark.parametrize("key", ["big", "small", "tall", "empty", "ties"])
def test_fields_match_their_definitions(
    key: str, stored: dict, samples: list[ShardSample], shard: Path
) -> None:
    sample = next(s for s in samples if s.key == key)
    got = stored[key]
    h, w = sample.rgb.shape[:2]
    masks = list(sample.masks)

    # image: cv2.resize to 1024, INTER_AREA only when both sides >= 1024
    rgb = decoded_jpegs(shard)[key]
    interpolation = cv2.INTER_AREA if h >= 1024 and w >= 1024 else cv2.INTER_LINEAR
    np.testing.assert_array_equal(
        got["image"], cv2.resize(rgb, (1024, 1024), interpolation=interpolation))

    # edges: OR of per-mask gradients at H x W, INTER_AREA of the float map, > 0
    edge = np.zeros((h, w), bool)
    for mask in masks:
        edge |= gradient_edge(mask)
    for s in (256, 64, 32):
        expected = (area_resize(edge.astype(np.float32), s) > 0).astype(np.uint8)
        np.testing.assert_array_equal(got[f"edge_{s}x{s}"], expected, err_msg=f"edge_{s}")
    assert got["edge_flag"] == 1 and got["edge_version"] == "B_v1"

    # weight maps: the union of masks as float, INTER_AREA; bg = 1 - fg
    union = np.zeros((h, w), np.float32)
    for mask in masks:
        union = np.maximum(union, mask)
    for s in (128, 64, 32):
        fg = area_resize(union, s)
        np.testing.assert_allclose(got[f"fg_map_{s}"], fg, atol=1e-6, err_msg=f"fg_{s}")
        np.testing.assert_allclose(got[f"bg_map_{s}"], 1 - fg, atol=1e-6, err_msg=f"bg_{s}")
        assert got[f"fg_map_{s}"].dtype == np.float32

    # boxes: the K largest areas (ties: earlier first), xyxy scaled to 1024
    areas = [int(m.sum()) for m in masks]
    chosen = sorted(range(len(masks)), key=lambda i: (-areas[i], i))[:MAX_BOXES]
    n = len(chosen)
    expected_boxes = np.zeros((MAX_BOXES, 4), np.float32)
    expected_masks = np.zeros((MAX_BOXES, 256, 256), np.uint8)
    for row, i in enumerate(chosen):
        x, y, bw, bh = extent_bbox(masks[i])
        expected_boxes[row] = [x * 1024 / w, y * 1024 / h, (x + bw) * 1024 / w,
                               (y + bh) * 1024 / h]
        expected_masks[row] = cv2.resize(masks[i], (256, 256), interpolation=cv2.INTER_NEAREST)
        if h % 256 == 0 and w % 256 == 0:  # whole factors: nearest is a strided pick
            np.testing.assert_array_equal(expected_masks[row], masks[i][:: h // 256, :: w // 256])
    np.testing.assert_allclose(got["bboxes"], expected_boxes, rtol=1e-6)
    np.testing.assert_array_equal(got["masks"], expected_masks)
    np.testing.assert_array_equal(got["box_areas"][:n], [areas[i] for i in chosen])
    position = [s.key for s in samples].index(key) + 1  # sa1b_shards: id = 1000 * image_id + n
    np.testing.assert_array_equal(got["box_annotation_ids"][:n], [1000 * position + i
                                                                  for i in chosen])
    assert (got["box_areas"][n:] == -1).all() and (got["box_annotation_ids"][n:] == -1).all()
    np.testing.assert_array_equal(got["metadata"], [n, int(n > 0), h, w, 3])
    assert got["metadata"].dtype == np.int32

    # features: from the NPZ where present (flag 1), zeros otherwise (flag 0)
    if sample.features is not None:
        np.testing.assert_array_equal(got["P4_S16"], sample.features[0])
        np.testing.assert_array_equal(got["P5_S32"], sample.features[1])
        assert got["feature_flag"] == 1
    else:
        assert not got["P4_S16"].any() and not got["P5_S32"].any()
        assert got["feature_flag"] == 0
    assert got["image_id"] == key


def test_special_cases(stored: dict) -> None:
    empty = stored["empty"]
    for s in (256, 64, 32):
        assert not empty[f"edge_{s}x{s}"].any()
    for s in (128, 64, 32):
        assert not empty[f"fg_map_{s}"].any() and (empty[f"bg_map_{s}"] == 1).all()
    assert list(empty["metadata"][:2]) == [0, 0] and not empty["bboxes"].any()
    # ties: equal areas keep input order
    ties = stored["ties"]
    np.testing.assert_allclose(ties["bboxes"][0], [0, 0, 100, 100 * 1024 / 768], rtol=1e-6)
    assert ties["bboxes"][1][0] == 500
    # the overlap: edges of both masks survive inside the union (Method B, not union gradient)
    big = stored["big"]
    assert big["edge_256x256"].sum() > 0 and 0 < big["fg_map_128"].max() <= 1
    # the image chose INTER_AREA for big, and that differs from INTER_LINEAR
    assert big["metadata"][2] >= 1024 and big["metadata"][3] >= 1024
