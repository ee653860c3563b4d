"""The fast derive (per-mask work confined to the mask's box, in pycocotools' transposed frame)
gives, bit for bit, what the plain full-frame definition of docs/format.md gives: on the bundled
sample, on SA-1B-like samples with many masks, and on masks touching every border."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from arraystore.converters.sa1b.derive import MaskAccumulator, derive_fields
from arraystore.converters.sa1b.members import decode_jpeg, parse_annotations
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.kinds.sa1b import MAP_SIZES
from arraystore.testing.sa1b_shards import ShardSample, write_shard
from benchmarks.data import sa1b_like
from benchmarks.derive import full_frame_derive

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "sa1b_sample.tar"


def records(shard: Path):
    source = Sa1bTarSource(max_boxes=3)
    (unit,) = source.units([shard])
    for record in source.records(unit):
        payload = record.payload
        rgb = decode_jpeg(payload["jpg"], "x", record.sample_id)
        yield rgb, parse_annotations(payload["json"], "x", record.sample_id, *rgb.shape[:2])


def border_masks(height: int, width: int) -> list[np.ndarray]:
    masks = []
    for y0, y1, x0, x1 in [(0, 40, 0, 50), (height - 30, height, width - 60, width),
                           (0, height, 100, 101), (height // 2, height // 2 + 1, 0, width),
                           (5, 6, 7, 8)]:
        mask = np.zeros((height, width), np.uint8)
        mask[y0:y1, x0:x1] = 1
        masks.append(mask)
    masks.append(np.zeros((height, width), np.uint8))  # empty
    return masks


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("floor")
    rng = np.random.default_rng(5)
    photo = rng.integers(0, 255, (301, 455, 3), np.uint8)
    return [SAMPLE, write_shard(root / "many.tar", sa1b_like(3, 60, seed=2)),
            write_shard(root / "borders.tar", [ShardSample("edges", photo,
                                                           border_masks(301, 455))])]


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_mask_maps_equal_the_full_frame_definition(shards, kernel_size) -> None:
    checked = 0
    for shard in shards:
        for rgb, anns in records(shard):
            accumulator = MaskAccumulator(rgb.shape[:2], kernel_size)
            for annotation in anns:
                accumulator.add_rle(annotation.rle)
            got = {**accumulator.edge_maps(), **accumulator.weight_maps()}
            expected = full_frame_derive(rgb, anns, 1, kernel_size)
            for name in ("edge_256x256", "edge_64x64", "edge_32x32", *(
                    f"{kind}_map_{s}" for s in MAP_SIZES for kind in ("fg", "bg"))):
                value = expected[name]
                assert got[name].dtype == value.dtype, name
                np.testing.assert_array_equal(got[name], value, err_msg=name)
            checked += 1
    assert checked >= 6 + 3 + 1


def test_every_field_equals_the_full_frame_derive(shards) -> None:
    for shard in shards:
        for rgb, anns in records(shard):
            got, expected = derive_fields(rgb, anns, 3), full_frame_derive(rgb, anns, 3)
            for name, value in expected.items():
                assert got[name].dtype == value.dtype, name
                np.testing.assert_array_equal(got[name], value, err_msg=name)
