"""Growing a store in place (``arraystore fields add|drop``): a new field's values by sample id
from NPZ files, another store or a model; nothing else rewritten; a killed add resumes; unknown
ids refused before anything is written; readers opened before keep working; appends, xarray,
``info`` and the loaders see the field; on every layout, on disk and in an object store."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import LAYOUTS, new_bucket, run_cli, s3_copy

from arraystore import ingest, open_xarray
from arraystore.converters.npz.source import NpzDirectorySource
from arraystore.errors import OptionError, SampleError, UnknownSampleError
from arraystore.field_values import ModelValues, NpzFolderValues, StoreValues
from arraystore.fields import add_field
from arraystore.info import store_info
from arraystore.loaders import StoreItems
from arraystore.reader import SampleReader
from arraystore.store import Store
from arraystore.testing.npz_examples import write_sav_pairs

COUNT = 7


def make_store(root: Path, layout: str = "raw", name: str = "s.zarr") -> Path:
    ingest(NpzDirectorySource(), [write_sav_pairs(root / f"{name}-npz", COUNT, size=16)],
           root / name, layout=LAYOUTS[layout], workers=1)
    return root / name


def write_values(folder: Path, ids, seed: int = 0, shape=(4, 5)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    values = {}
    for sample_id in ids:
        values[sample_id] = rng.standard_normal(shape).astype(np.float32)
        np.savez(folder / f"{sample_id}.npz", teacher=values[sample_id])
    return values


def files_of(store: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(store)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in store.rglob("*") if p.is_file()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_add_writes_only_the_new_field(tmp_path, layout) -> None:
    store = make_store(tmp_path, layout)
    before_reader = SampleReader(store)
    ids = list(before_reader.sample_ids)
    values = write_values(tmp_path / "teacher", ids[:5])
    before = files_of(store)
    summary = add_field(store, "teacher", NpzFolderValues(tmp_path / "teacher"))
    assert summary["written"] == 5 and summary["holding"] == 5
    after = files_of(store)
    changed = {k for k in after if before.get(k) != after[k]}
    assert {k.split("/")[0] for k in changed} <= {"teacher", "has_teacher", "zarr.json"}
    assert all(before[k] == after[k] for k in before if k.split("/")[0] not in ("zarr.json",))
    if layout == "raw":  # uncompressed: the field's bytes, one file per sample
        data = sum(after[k][0] for k in after if k.startswith("teacher/c/"))
        assert data == COUNT * 4 * 5 * 4
    reader = SampleReader(store)
    for n, sample_id in enumerate(ids):
        item = reader.read(n)
        expected = values.get(sample_id, np.zeros((4, 5), np.float32))
        np.testing.assert_array_equal(item["teacher"], expected)
        assert bool(item["has_teacher"]) == (sample_id in values)
    assert before_reader.fields == ("image1", "image2", "mask1", "mask2")
    np.testing.assert_array_equal(before_reader.read(0)["image1"], reader.read(0)["image1"])


def test_everything_sees_an_added_field_and_appends_leave_it_unset(tmp_path) -> None:
    store = make_store(tmp_path)
    ids = list(SampleReader(store).sample_ids)
    write_values(tmp_path / "teacher", ids)
    run_cli("fields", "add", store, "teacher", "--from", tmp_path / "teacher", check=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consolidated metadata kept current: no warning
        opened = xr.open_zarr(store)
    assert opened["teacher"].dims == ("sample", "teacher_0", "teacher_1")
    assert "teacher" in open_xarray(store).data_vars
    assert {"teacher", "has_teacher"} <= {a.name for a in store_info(store).arrays}
    assert "teacher" in StoreItems(store)[0]
    shown = run_cli("show", store, "--fields", "teacher", "-o", tmp_path / "look.png",
                    check=True)
    assert "samples drawn" in shown.output and (tmp_path / "look.png").stat().st_size > 0
    more = write_sav_pairs(tmp_path / "more", 2, size=16, seed=4)
    for path in more.iterdir():
        path.rename(path.with_name("z" + path.name))
    ingest(NpzDirectorySource(), [more], store, workers=1)  # the source has no 'teacher'
    reader = SampleReader(store)
    assert len(reader) == COUNT + 2
    assert not reader.read(COUNT)["has_teacher"] and not reader.read(COUNT)["teacher"].any()
    write_values(tmp_path / "more_teacher", [reader.sample_ids[COUNT]], seed=9)  # elsewhere
    result = run_cli("fields", "add", store, "teacher", "--from", tmp_path / "more_teacher",
                     check=True)
    assert "1 samples written; 8 of 9 committed samples hold a value" in result.output
    write_values(tmp_path / "teacher", [reader.sample_ids[COUNT]], seed=9)
    result = run_cli("fields", "add", store, "teacher", "--from", tmp_path / "teacher",
                     check=True)
    assert "0 samples written; 8 of 9 committed samples hold a value" in result.output


def test_unknown_ids_and_bad_values_are_refused_before_anything_is_written(tmp_path) -> None:
    store = make_store(tmp_path)
    ids = list(SampleReader(store).sample_ids)
    write_values(tmp_path / "teacher", [*ids[:2], "not_in_store"])
    before = files_of(store)
    with pytest.raises(UnknownSampleError, match=r"1 of its 3 sample ids.*'not_in_store'"):
        add_field(store, "teacher", NpzFolderValues(tmp_path / "teacher"))
    assert files_of(store) == before
    result = run_cli("fields", "add", store, "teacher", "--from", tmp_path / "teacher")
    assert result.exit_code == 1 and "not_in_store" in result.output
    (tmp_path / "teacher" / "not_in_store.npz").unlink()
    (tmp_path / "teacher" / f"{ids[1]}.npz").write_bytes(b"not a zip")
    with pytest.raises(SampleError, match=f"{ids[1]}.npz.*unreadable NPZ"):
        add_field(store, "teacher", NpzFolderValues(tmp_path / "teacher"))
    write_values(tmp_path / "teacher", [ids[1]], shape=(3,))
    with pytest.raises(OptionError, match=f"sample '{ids[1]}': a value of shape"):
        add_field(store, "teacher", NpzFolderValues(tmp_path / "teacher"))
    with pytest.raises(OptionError, match="already has a field 'image1'"):
        add_field(store, "image1", NpzFolderValues(tmp_path / "teacher", key="teacher"))
    assert SampleReader(store).fields == ("image1", "image2", "mask1", "mask2")


KILLED_ADD = """
import os, sys
import arraystore.fields as fields
from arraystore.field_values import NpzFolderValues

class Dying(NpzFolderValues):
    calls = 0
    def read(self, ids, positions):
        Dying.calls += 1
        if Dying.calls == 4:
            os._exit(9)  # killed mid-add, between two files
        return super().read(ids, positions)

fields.RECORD_EVERY_SECONDS = 0
fields.add_field(sys.argv[1], "teacher", Dying(sys.argv[2]))
"""


def test_a_killed_add_leaves_no_half_field_and_resumes(tmp_path) -> None:
    store = make_store(tmp_path)
    ids = list(SampleReader(store).sample_ids)
    values = write_values(tmp_path / "teacher", ids)
    killed = subprocess.run([sys.executable, "-c", KILLED_ADD, str(store),
                             str(tmp_path / "teacher")], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    opened = Store.open(store)  # a sound store, without the field
    assert "teacher" not in opened.schema and opened.meta["adding"]["teacher"]["files_done"] == 3
    assert SampleReader(store).fields == ("image1", "image2", "mask1", "mask2")

    class Counting(NpzFolderValues):
        reads = 0

        def read(self, ids, positions):
            Counting.reads += 1
            return super().read(ids, positions)

    add_field(store, "teacher", Counting(tmp_path / "teacher"))
    assert Counting.reads == COUNT - 3  # resumed after the files recorded as done
    reader = SampleReader(store)
    for n, sample_id in enumerate(ids):
        np.testing.assert_array_equal(reader.read(n)["teacher"], values[sample_id])
    assert "adding" not in Store.open(store).meta


def test_from_another_store_by_sample_id(tmp_path) -> None:
    store = make_store(tmp_path)
    other = make_store(tmp_path, "sharded", name="other.zarr")
    source_ids = list(SampleReader(other).sample_ids)
    summary = add_field(store, "second_image", StoreValues(other, "image1"))
    assert summary["holding"] == COUNT
    mine, theirs = SampleReader(store), SampleReader(other)
    assert mine.schema["second_image"].dims == theirs.schema["image1"].dims
    for n, sample_id in enumerate(mine.sample_ids):
        np.testing.assert_array_equal(mine.read(n)["second_image"],
                                      theirs.read(source_ids.index(sample_id))["image1"])


class TinyTeacher:
    """A random-weight convolution standing in for a new teacher model."""

    batch_size = 3

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Conv2d(3, 2, 4, stride=4)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        return self.net(pixels).numpy()

    def describe(self) -> dict:
        return {"model": "tiny-conv", "weights": "random"}


def test_from_a_model_on_a_stored_field(tmp_path) -> None:
    store = make_store(tmp_path, "sharded+zstd")
    teacher = TinyTeacher()
    add_field(store, "features", ModelValues(teacher, "image1"))
    reader = SampleReader(store)
    images = np.stack([reader.read(n)["image1"] for n in range(COUNT)])
    expected = teacher(images)
    got = np.stack([reader.read(n)["features"] for n in range(COUNT)])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    provenance = Store.open(store).provenance["fields"][-1]
    assert provenance["from"] == "model" and provenance["model"] == "tiny-conv"


TEACHER_FILE = """
import numpy as np


class Halves:
    batch_size = 2

    def __call__(self, images):
        return images.astype(np.float32)[:, ::2, ::2, 0] / 2

    def describe(self):
        return {"model": "halves"}


def make():
    return Halves()
"""


def test_from_a_model_file_on_the_command_line(tmp_path) -> None:
    store = make_store(tmp_path)
    (tmp_path / "teacher.py").write_text(TEACHER_FILE)
    run_cli("fields", "add", store, "halves", "--from", f"model:{tmp_path}/teacher.py:make",
            "--input", "image1", check=True)
    reader = SampleReader(store)
    image = reader.read(3)["image1"]
    np.testing.assert_array_equal(reader.read(3)["halves"],
                                  image.astype(np.float32)[::2, ::2, 0] / 2)
    for args, message in (
            (["--from", f"model:{tmp_path}/teacher.py:make"], "needs --input"),
            (["--from", f"model:{tmp_path}/teacher.py:nothing", "--input", "image1"],
             "has no function 'nothing'"),
            (["--from", f"model:{tmp_path}/absent.py:make", "--input", "image1"],
             "no such Python file"),
            (["--from", str(tmp_path), "--input", "image1"], "--input names the field")):
        result = run_cli("fields", "add", store, "other", *args)
        assert result.exit_code == 1 and message in result.output, result.output


def test_drop_only_added_fields(tmp_path) -> None:
    store = make_store(tmp_path)
    write_values(tmp_path / "teacher", list(SampleReader(store).sample_ids))
    add_field(store, "teacher", NpzFolderValues(tmp_path / "teacher"))
    result = run_cli("fields", "drop", store, "image1")
    assert result.exit_code == 1 and "not a field added in place" in result.output
    run_cli("fields", "drop", store, "teacher", check=True)
    assert not (store / "teacher").exists() and not (store / "has_teacher").exists()
    assert SampleReader(store).fields == ("image1", "image2", "mask1", "mask2")
    add_field(store, "teacher", NpzFolderValues(tmp_path / "teacher"))  # added again
    assert SampleReader(store).read(0)["has_teacher"]
    run_cli("verify", store, "--deep", check=True)


def test_add_to_a_store_in_an_object_store(tmp_path, s3_endpoint) -> None:
    local = make_store(tmp_path, "sharded+crc32c")
    url = s3_copy(local, f"{new_bucket()}/s.zarr")
    values = write_values(tmp_path / "teacher", list(SampleReader(local).sample_ids)[::2])
    run_cli("fields", "add", url, "teacher", "--from", tmp_path / "teacher", check=True)
    reader = SampleReader(url)
    for n, sample_id in enumerate(reader.sample_ids):
        assert bool(reader.read(n)["has_teacher"]) == (sample_id in values)
        if sample_id in values:
            np.testing.assert_array_equal(reader.read(n)["teacher"], values[sample_id])
    run_cli("fields", "drop", url, "teacher", check=True)
    assert "teacher" not in SampleReader(url).fields
    assert os.environ["AWS_ENDPOINT_URL"] == s3_endpoint
