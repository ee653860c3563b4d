"""The SAM2 teacher with a real ``sam2.1_hiera_t`` of seeded random weights, saved as a checkpoint
the way sam2 loads them: features at ingest and ``fix features`` equal a direct call of the image
encoder on the stored image; flags and provenance are set; a killed fix resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("sam2", reason="the sam2 extra is not installed")
import torch
from conftest import photo, rectangle
from sam2.build_sam import build_sam2

from arraystore import SampleReader, Store, ingest
from arraystore.converters.sa1b.fixes import fix_features
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.converters.sa1b.teacher import Sam2Teacher, TeacherError, file_sha256
from arraystore.testing.sa1b_shards import ShardSample, write_shard

pytestmark = pytest.mark.slow
MODEL, CONFIG = "sam2.1_hiera_t", "configs/sam2.1/sam2.1_hiera_t.yaml"
SCALP0 = ["++model.image_encoder.scalp=0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_sam2(CONFIG, None, "cpu", hydra_overrides_extra=SCALP0)
    path = tmp_path_factory.mktemp("weights") / "hiera_t_random.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def encoder(checkpoint):
    """The reference: sam2's own build from the checkpoint, called directly."""
    model = build_sam2(CONFIG, str(checkpoint), "cpu", hydra_overrides_extra=SCALP0)

    def encode(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        with torch.inference_mode():
            levels = model.image_encoder((x - mean) / std)["backbone_fpn"]
        return levels[2][0].numpy(), levels[3][0].numpy()
    return encode


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    rng = np.random.default_rng(5)
    samples = [ShardSample(f"t_{i}", photo(rng, 200, 300), [rectangle((200, 300), 20, 20, 90, 90)])
               for i in range(3)]
    return write_shard(tmp_path_factory.mktemp("three") / "three.tar", samples)


def assert_features_match(path, encode, only=None) -> None:
    reader = SampleReader(path)
    for index in range(len(reader)):
        sample = reader.read(index)
        if only is not None and reader.sample_ids[index] not in only:
            continue
        p4, p5 = encode(sample["image"])
        np.testing.assert_allclose(sample["P4_S16"], p4, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(sample["P5_S32"], p5, rtol=1e-4, atol=1e-4)
        assert sample["feature_flag"] == 1


def test_features_at_ingest(tmp_path, checkpoint, encoder, three) -> None:
    out = tmp_path / "s.zarr"
    ingest(Sa1bTarSource(teacher=MODEL, weights=str(checkpoint), batch_size=2), [three], out,
           workers=2)
    assert_features_match(out, encoder)
    teacher = Store.open(out).provenance["teacher"]
    assert teacher["teacher"] == MODEL and teacher["weights_sha256"] == file_sha256(checkpoint)


def test_fix_features_then_a_killed_fix_resumes(tmp_path, checkpoint, encoder, three) -> None:
    out = tmp_path / "s.zarr"
    ingest(Sa1bTarSource(), [three], out, layout=None, workers=1)
    teacher = Sam2Teacher(MODEL, checkpoint, batch_size=1)
    summary = fix_features(out, teacher, max_samples=1)
    assert summary["fixed"] == 1 and summary["left"] == 2
    flags = SampleReader(out, fields=("feature_flag",))
    assert [int(flags.read(i)["feature_flag"]) for i in range(3)] == [1, 0, 0]

    command = [sys.executable, "-m", "arraystore", "fix", "features", str(out), "--model", MODEL,
               "--weights", str(checkpoint), "--batch-size", "1", "--no-progress"]
    process = subprocess.Popen(command, start_new_session=True, stderr=subprocess.PIPE)
    time.sleep(float(np.random.default_rng(7).uniform(4.0, 7.0)))
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert list(SampleReader(out).sample_ids) == ["t_0", "t_1", "t_2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_features_match(out, encoder)
    fixes = Store.open(out).provenance["fixes"]
    assert fixes[-1]["fix"] == "features" and fixes[-1]["weights_sha256"] == file_sha256(
        checkpoint)
    again = fix_features(out, teacher)
    assert again["fixed"] == 0  # nothing left to do; --force would redo all


def test_teacher_errors(tmp_path, checkpoint, monkeypatch) -> None:
    with pytest.raises(TeacherError, match="unknown teacher model"):
        Sam2Teacher("sam2.1_hiera_xxl", checkpoint)
    with pytest.raises(TeacherError, match="not found"):
        Sam2Teacher(MODEL, tmp_path / "missing.pt")
    with pytest.raises(TeacherError, match=r"do not fit sam2\.1_hiera_s"):
        Sam2Teacher("sam2.1_hiera_s", checkpoint)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match="do not fit"):
        Sam2Teacher(MODEL, garbage)
    monkeypatch.setitem(sys.modules, "sam2.build_sam", None)
    with pytest.raises(TeacherError, match="pip install"):
        Sam2Teacher(MODEL, checkpoint)
