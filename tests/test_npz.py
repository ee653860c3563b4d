"""``ingest npz``: fields inferred from the first file, every other file checked against them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from arraystore import SampleReader, Store, ingest, open_xarray
from arraystore.converters.npz.source import NpzDirectorySource
from arraystore.errors import SampleError


def npz_folder(root, count=4, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for i in range(count):
        arrays = {"feat": rng.normal(size=(16, 8, 8)).astype(np.float32),
                  "label": np.int64(i), "name": np.str_(f"item {i}"),
                  "box": rng.integers(0, 9, (4,)).astype(np.int16)}
        np.savez(root / f"s{i:02d}.npz", **arrays)
        expected[f"s{i:02d}"] = arrays
    return expected


def test_fields_inferred_and_values_kept(tmp_path) -> None:
    expected = npz_folder(tmp_path / "in")
    ingest(NpzDirectorySource(), [tmp_path / "in"], tmp_path / "s.zarr", workers=2)
    store = Store.open(tmp_path / "s.zarr")
    assert store.kind == "npz"
    assert store.schema["feat"].shape == (16, 8, 8) and store.schema["feat"].chunking == "sample"
    assert store.schema["label"].chunking == "block" and store.schema["name"].is_string
    assert store.schema["feat"].dims == ("n16", "n8", "n8_1")
    reader = SampleReader(tmp_path / "s.zarr")
    assert list(reader.sample_ids) == list(expected)
    for i, arrays in enumerate(expected.values()):
        got = reader.read(i)
        np.testing.assert_array_equal(got["feat"], arrays["feat"])
        assert got["label"] == arrays["label"] and got["name"] == str(arrays["name"])
    assert open_xarray(tmp_path / "s.zarr")["feat"].dims == ("sample", "n16", "n8", "n8_1")


@pytest.mark.parametrize("problem, arrays, message", [
    ("shape", {"feat": np.zeros((16, 8, 9), np.float32)}, "shape"),
    ("missing key", {"feat": None}, "keys"),
    ("object array", {"box": np.array([{"a": 1}], dtype=object)}, "pickle"),
])
def test_bad_files_fail_or_are_skipped(tmp_path, problem, arrays, message) -> None:
    npz_folder(tmp_path / "in")
    good = dict(np.load(tmp_path / "in" / "s00.npz"))
    for key, value in arrays.items():
        if value is None:
            good.pop(key)
        else:
            good[key] = value
    np.savez(tmp_path / "in" / "s02.npz", **good)
    with pytest.raises(SampleError, match=message) as caught:
        ingest(NpzDirectorySource(), [tmp_path / "in"], tmp_path / "a.zarr", workers=1)
    assert "s02.npz" in str(caught.value)
    assert list(SampleReader(tmp_path / "a.zarr").sample_ids) == ["s00", "s01"]  # kept, committed

    report = ingest(NpzDirectorySource(), [tmp_path / "in"], tmp_path / "b.zarr", workers=2,
                    on_error="skip")
    assert report.ingested == 3 and [s.sample_id for s in report.skipped] == ["s02"]
    written = json.loads(Path(report.report_path).read_text())
    assert message in written["skipped"][0]["reason"].lower()
