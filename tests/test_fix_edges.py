"""``fix edges``: Method B edges recomputed from the original annotations, flags and version set,
samples already at the version skipped, other kernel sizes versioned apart."""

from __future__ import annotations

import json
import tarfile

import numpy as np

from arraystore import SampleReader, Store, ingest
from arraystore.converters.sa1b.fixes import fix_edges
from arraystore.converters.sa1b.source import Sa1bTarSource
from tests.conftest import run_cli

EDGES = ("edge_256x256", "edge_64x64", "edge_32x32")


def stale_store(tmp_path, shard):
    """A store whose edges are as an old tool left them: zeros, no flag, no version."""
    out = tmp_path / "s.zarr"
    ingest(Sa1bTarSource(), [shard], out, workers=1)
    reader = SampleReader(out)
    expected = {reader.sample_ids[i]: {e: reader.read(i)[e] for e in EDGES}
                for i in range(len(reader))}
    store = Store.open(out, mode="r+")
    for name in EDGES:
        store.array(name)[:] = 0
    store.array("edge_flag")[:] = 0
    store.array("edge_version")[:] = np.array([""] * len(reader), dtype=str)
    return out, expected


def read_edges(out):
    reader = SampleReader(out)
    return {reader.sample_ids[i]: reader.read(i) for i in range(len(reader))}


def test_fix_edges_from_tar_restores_method_b(tmp_path, shard) -> None:
    out, expected = stale_store(tmp_path, shard)
    summary = fix_edges(out, [shard])
    assert summary["ok"] and summary["fixed"] == 5
    for sample_id, sample in read_edges(out).items():
        for name in EDGES:
            np.testing.assert_array_equal(sample[name], expected[sample_id][name], name)
        assert sample["edge_flag"] == 1 and sample["edge_version"] == "B_v1"
    assert fix_edges(out, [shard])["fixed"] == 0  # already at B_v1: skipped
    assert fix_edges(out, [shard], force=True)["fixed"] == 5
    assert Store.open(out).provenance["fixes"][-1]["version"] == "B_v1"


def test_fix_edges_from_json_folder_and_other_kernel(tmp_path, shard) -> None:
    out, expected = stale_store(tmp_path, shard)
    folder = tmp_path / "json"
    folder.mkdir()
    with tarfile.open(shard) as archive:
        for member in archive.getmembers():
            if member.name.endswith(".json") and member.name != "small.json":
                (folder / member.name).write_bytes(archive.extractfile(member).read())
    summary = fix_edges(out, [folder])
    assert not summary["ok"] and summary["fixed"] == 4
    assert "'small'" in summary["failures"][0]
    result = run_cli("fix", "edges", str(out), "--annotations", str(shard),
                                      "--kernel-size", "5")
    assert result.exit_code == 0, result.output
    wide = read_edges(out)
    assert {s["edge_version"] for s in wide.values()} == {"B_v1_k5"}
    big = wide["big"]["edge_256x256"]
    assert big.sum() >= expected["big"]["edge_256x256"].sum()  # a wider kernel, wider edges


def test_fix_edges_refuses_annotations_of_another_image(tmp_path, shard) -> None:
    out, _ = stale_store(tmp_path, shard)
    folder = tmp_path / "json"
    folder.mkdir()
    doc = {"image": {"image_id": 1, "width": 10, "height": 10, "file_name": "big.jpg"},
           "annotations": []}
    (folder / "big.json").write_text(json.dumps(doc))
    summary = fix_edges(out, [folder])
    assert not summary["ok"] and "disagree" in summary["failures"][0]
