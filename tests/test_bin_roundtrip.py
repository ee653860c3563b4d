"""``ingest bin`` then ``export bin`` reproduces the ``.bin`` files byte for byte, and the Zarr
loader returns the same items as the reference ``BinaryDistillDataset``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BACKENDS, LAYOUTS, write_bin_dataset

from arraystore import Layout, ingest
from arraystore.converters.sa1b_bin.exporter import BinExporter
from arraystore.converters.sa1b_bin.source import BinDirectorySource
from arraystore.kinds.sa1b_bin import bin_files
from arraystore.loaders import BinaryDistillDataset, ZarrDistillDataset
from tests.conftest import assert_same_values


@pytest.mark.parametrize("layout", ["raw", "sharded+crc32c", "raw+zstd"])
@pytest.mark.parametrize("max_boxes", [1, 3])
def test_ingest_then_export_is_byte_identical(tmp_path, layout: str, max_boxes: int) -> None:
    config = {"model_type": "sam2.1_hiera_b+", "total_samples": 7, "max_boxes": max_boxes}
    original = write_bin_dataset(tmp_path / "bin", 7, seed=max_boxes, max_boxes=max_boxes,
                                 config=config)
    store = tmp_path / "s.zarr"
    ingest(BinDirectorySource(), [original], store, layout=LAYOUTS[layout], workers=2)
    exported = tmp_path / "exported"
    summary = BinExporter().export(store, exported)
    assert summary["samples"] == 7
    for spec in bin_files(max_boxes):
        assert (exported / spec.name).read_bytes() == (original / spec.name).read_bytes(), spec
    assert (exported / "keys.txt").read_text() == (original / "keys.txt").read_text()
    assert json.loads((exported / "config.json").read_text()) == config
    assert not list(exported.glob("*.partial"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zarr_loader_equals_reference_bin_loader(tmp_path, backend: str) -> None:
    original = write_bin_dataset(tmp_path / "bin", 6, seed=3)
    store = tmp_path / "s.zarr"
    ingest(BinDirectorySource(), [original], store, layout=Layout("sharded", shard_size=4),
           workers=1)
    reference, dataset = BinaryDistillDataset(original), ZarrDistillDataset(store, backend)
    assert len(reference) == len(dataset) == 6
    for index in range(6):
        assert_same_values(dataset[index], reference[index], str(index))


def test_reference_item_is_the_seed_contract(tmp_path) -> None:
    import torch

    item = BinaryDistillDataset(write_bin_dataset(tmp_path / "bin", 2))[0]
    n = item["num_bboxes"]
    expected = {
        "image": (torch.uint8, (3, 1024, 1024)),
        "teacher_features": (torch.float32, (256, 64, 64)),
        "edge_256x256": (torch.float32, (256, 256)),
        "fg_map": (torch.float32, (1, 64, 64)),
        "bg_map": (torch.float32, (1, 64, 64)),
        "edge_map": (torch.float32, (1, 64, 64)),
        "box_prompts_xyxy": (torch.float32, (n, 4)),
        "box_prompts_masks_orig": (torch.float32, (n, 256, 256)),
    }
    for key, (dtype, shape) in expected.items():
        assert item[key].dtype == dtype and tuple(item[key].shape) == shape, key
    assert [type(item[k]) for k in ("box_prompts_count", "box_prompts_flag",
                                    "geometry_color_flag", "num_bboxes")] == [int] * 4
    assert type(item["has_bbox"]) is bool and isinstance(item["box_prompts_meta"], list)
    assert item["image_shape"].dtype == np.int32 and item["image_shape"].shape == (3,)
    assert item["image_id"] == "sa_100" and item["geometry_color_flag"] == 0
    assert len(item) == 16
