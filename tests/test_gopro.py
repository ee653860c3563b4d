"""``arraystore ingest gopro``: the folder tree into a ``gopro_spike`` store, exact voxels, and
every broken input named (docs/formats.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from arraystore import SampleReader, ingest
from arraystore.converters.gopro.source import GoproSpikeSource, natural_key
from arraystore.errors import OptionError, SampleError, SourceError
from arraystore.testing.gopro_trees import write_gopro_tree
from tests.conftest import run_cli

IMAGE = (72, 128)
SPIKE = (10, 40, 64)
GEOMETRY = {"spike_height": SPIKE[1], "spike_width": SPIKE[2]}
SEQUENCES = {"train": {"GOPR0372_07_00": 6, "seq with spaces": 4}, "test": {"GOPR0384_11_00": 3}}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_gopro_tree(tmp_path_factory.mktemp("gopro") / "unified", SEQUENCES, IMAGE,
                            SPIKE, seed=3)


def reference_voxels(dat: Path, bins: int) -> np.ndarray:
    """Bin b = sum of frames [b*10/bins, (b+1)*10/bins), straight from the .dat bytes."""
    frames = np.fromfile(dat, np.uint8).reshape(SPIKE).astype(np.int64)
    per_bin = SPIKE[0] // bins
    return np.stack([frames[b * per_bin:(b + 1) * per_bin].sum(0) for b in range(bins)])


def test_every_frame_stored_with_exact_voxels(tmp_path, tree) -> None:
    out = tmp_path / "g.zarr"
    report = ingest(GoproSpikeSource(voxels="precompute", bins=5, **GEOMETRY), [tree], out,
                    workers=2)
    assert report.ingested == 13 and not report.skipped
    reader = SampleReader(out)
    assert reader.kind == "gopro_spike"
    ids = list(reader.sample_ids)
    assert ids[0] == "test/GOPR0384_11_00/000000"
    assert "train/seq with spaces/000003" in ids
    assert reader.schema["blur"].shape == (*IMAGE, 3)  # sizes from the data, not constants
    assert reader.schema["spike"].shape == SPIKE
    assert reader.schema["spike_vox"].dtype == "uint16"  # 2 frames x 255 cannot overflow
    for index, sample_id in enumerate(ids):
        split, sequence, stem = sample_id.split("/")
        folder = tree / split / sequence
        sample = reader.read(index)
        assert (sample["split"], sample["sequence"], sample["frame"]) == (split, sequence, stem)
        assert sample["frame_index"] == int(stem)
        np.testing.assert_array_equal(sample["spike"].reshape(-1),
                                      np.fromfile(folder / "spike" / f"{stem}.dat", np.uint8))
        np.testing.assert_array_equal(sample["spike_vox"],
                                      reference_voxels(folder / "spike" / f"{stem}.dat", 5))
        import cv2

        for role in ("blur", "sharp"):
            expected = cv2.cvtColor(cv2.imread(str(folder / role / f"{stem}.png")),
                                    cv2.COLOR_BGR2RGB)
            np.testing.assert_array_equal(sample[role], expected)


def test_split_option_and_jpeg_frames(tmp_path) -> None:
    root = write_gopro_tree(tmp_path / "jpg", {"train": {"a": 2}, "test": {"b": 2}}, IMAGE,
                            SPIKE, image_format="jpg")
    out = tmp_path / "train.zarr"
    ingest(GoproSpikeSource(split="train", **GEOMETRY), [root], out, workers=1)
    reader = SampleReader(out)
    assert list(reader.sample_ids) == ["train/a/000000", "train/a/000001"]
    assert "spike_vox" not in reader.schema  # --voxels none: only the stored spikes
    with pytest.raises(SourceError, match=r"no split folder 'val' \(found: test, train\)"):
        GoproSpikeSource(split="val").units([root])


def test_stems_sort_naturally() -> None:
    assert sorted(["frame10", "frame2", "frame1"], key=natural_key) == \
        ["frame1", "frame2", "frame10"]


def test_bins_must_divide_the_frames_before_anything_is_written(tmp_path, tree) -> None:
    out = tmp_path / "never.zarr"
    with pytest.raises(OptionError, match=r"bins=3 does not divide the 10 spike frames.*"
                                          r"\[1, 2, 5, 10\]"):
        ingest(GoproSpikeSource(voxels="precompute", bins=3, **GEOMETRY), [tree], out)
    assert not out.exists()
    result = run_cli("ingest", "gopro", str(tree), "--out", str(out), "--voxels", "precompute",
                 "--bins", "4")
    assert result.exit_code == 1 and "bins=4" in result.output and not out.exists()
    with pytest.raises(OptionError, match="--voxels 'always'"):
        ingest(GoproSpikeSource(voxels="always"), [tree], out)


@pytest.fixture
def broken_tree(tmp_path) -> Path:
    """One sequence of 6 frames: frame 1's .dat is short, frame 3 has no sharp image, frame 4's
    blur PNG is garbage; the others are sound."""
    root = write_gopro_tree(tmp_path / "broken", {"train": {"s": 6}}, IMAGE, SPIKE)
    folder = root / "train" / "s"
    (folder / "spike" / "000001.dat").write_bytes(b"\0" * 1000)
    (folder / "sharp" / "000003.png").unlink()
    (folder / "blur" / "000004.png").write_bytes(b"\x89PNG garbage")
    return root


def test_broken_frames_fail_with_the_file_named(tmp_path, broken_tree) -> None:
    out = tmp_path / "f.zarr"
    with pytest.raises(SampleError) as caught:
        ingest(GoproSpikeSource(**GEOMETRY), [broken_tree], out, workers=1)
    dat = broken_tree / "train" / "s" / "spike" / "000001.dat"
    assert str(caught.value).count(str(dat)) >= 1
    assert f"Cannot reshape spike data: {dat} is 1000 bytes, expected 25600" in str(caught.value)
    assert SampleReader(out).sample_ids[:] == ["train/s/000000"]  # the frame before is kept


def test_broken_frames_skipped_and_reported(tmp_path, broken_tree) -> None:
    out = tmp_path / "s.zarr"
    result = run_cli("ingest", "gopro", str(broken_tree), "--out", str(out), "--on-error", "skip",
                 "--spike-height", "40", "--spike-width", "64", "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "3 samples ingested" in result.output and "3 skipped" in result.output
    report = json.loads(next(Path(f"{out}.reports").glob("ingest-*.json")).read_text())
    reasons = {s["sample_id"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"train/s/000001", "train/s/000003", "train/s/000004"}
    assert "Cannot reshape spike data" in reasons["train/s/000001"]
    assert "no sharp file" in reasons["train/s/000003"]
    assert "not a decodable PNG or JPEG" in reasons["train/s/000004"]
    reader = SampleReader(out)
    assert list(reader.column("frame_index")) == [0, 2, 5]  # gaps where frames were left out


def test_fail_is_one_line(tmp_path, broken_tree) -> None:
    result = run_cli("ingest", "gopro", str(broken_tree), "--out", str(tmp_path / "o.zarr"),
                 "--spike-height", "40", "--spike-width", "64", "--workers", "1")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "000001.dat" in result.output and "Cannot reshape spike data" in result.output


def test_default_geometry_names_the_seed_size(tmp_path, tree) -> None:
    with pytest.raises(SampleError, match="is 25600 bytes, expected 2534400"):
        ingest(GoproSpikeSource(), [tree], tmp_path / "d.zarr", workers=1)


def test_frame_of_another_size_is_that_frames_error(tmp_path) -> None:
    root = write_gopro_tree(tmp_path / "sizes", {"train": {"s": 3}}, IMAGE, SPIKE)
    other = write_gopro_tree(tmp_path / "other", {"train": {"s": 3}}, (64, 128), SPIKE)
    (other / "train" / "s" / "blur" / "000002.png").replace(
        root / "train" / "s" / "blur" / "000002.png")
    report = ingest(GoproSpikeSource(**GEOMETRY), [root], tmp_path / "o.zarr", workers=1,
                    on_error="skip")
    assert report.ingested == 2
    assert "image of 64x128 pixels; the store's frames are 72x128" in report.skipped[0].reason


def test_rerun_skips_sequences_already_ingested(tmp_path, tree) -> None:
    out = tmp_path / "r.zarr"
    first = ingest(GoproSpikeSource(**GEOMETRY), [tree], out, workers=1)
    again = ingest(GoproSpikeSource(**GEOMETRY), [tree], out, workers=1)
    assert first.ingested == 13 and again.ingested == 0
    assert len(again.units_already_done) == 3
    assert run_cli("info", str(out)).output.count("gopro_spike") == 1
