"""Broken inputs: each a typed error naming the file, member and sample in ``fail`` mode (the good
samples before it stay committed), or a skip listed with its reason in ``skip`` mode."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import photo, rectangle, write_bin_dataset

from arraystore import SampleReader, ingest
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.converters.sa1b_bin.source import BinDirectorySource
from arraystore.errors import SampleError, SourceError
from arraystore.testing.sa1b_shards import (
    ShardSample,
    npz_bytes,
    sample_members,
    write_members,
)

RNG = np.random.default_rng(7)
GOOD = [ShardSample(f"ok_{i}", photo(RNG, 300, 400), [rectangle((300, 400), 10, 10, 90, 90)])
        for i in range(3)]


def members_with(bad: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """good sample, the bad members, two more good samples"""
    out = sample_members(GOOD[0], 1) + bad
    for n, sample in enumerate(GOOD[1:], 2):
        out += sample_members(sample, n)
    return out


def bad_sample_members(**changes) -> list[tuple[str, bytes]]:
    members = dict(sample_members(ShardSample("bad", photo(RNG, 300, 400),
                                              [rectangle((300, 400), 5, 5, 50, 50)]), 9))
    for name, data in changes.items():
        name = name.replace("_", ".", 1)
        if data is None:
            members.pop(name)
        else:
            members[name] = data
    return list(members.items())


def json_with(edit) -> bytes:
    doc = json.loads(dict(bad_sample_members())["bad.json"])
    edit(doc)
    return json.dumps(doc).encode()


CASES = {
    "corrupt JPEG": (bad_sample_members(bad_jpg=b"\xff\xd8 not really a jpeg"), "JPEG"),
    "malformed JSON": (bad_sample_members(bad_json=b"{'image': oops"), "malformed JSON"),
    "RLE size differs from image": (bad_sample_members(bad_json=json_with(
        lambda d: d["annotations"][0]["segmentation"].update(size=[100, 100]))), "RLE size"),
    "JSON size differs from JPEG": (bad_sample_members(bad_json=json_with(
        lambda d: d["image"].update(height=999))), "disagree"),
    "JPEG without JSON": (bad_sample_members(bad_json=None), "JSON member missing"),
    "JSON without JPEG": (bad_sample_members(bad_jpg=None), "JPG member missing"),
    "duplicate key": ([("README.txt", b"not a sample"), ("ok_0.json", b"{}")], "duplicate key"),
    "member without a key": ([(name[name.index("."):], data) for name, data in
                              bad_sample_members()], "no sample key"),
    "climbing member name": ([("../evil.jpg", b"x"), ("../evil.json", b"{}")], "'..'"),
    "absolute member name": ([("/etc/evil.jpg", b"x")], "absolute"),
    "NPZ with object array": ([*bad_sample_members(), ("bad_features.npz", npz_bytes(
        {"P4_S16": np.array([None], object), "P5_S32": np.zeros(1)}))], "NPZ refused"),
    "NPZ with wrong shapes": ([*bad_sample_members(), ("bad_features.npz", npz_bytes(
        {"P4_S16": np.zeros((256, 32, 32), np.float32),
         "P5_S32": np.zeros((256, 32, 32), np.float32)}))], "expected float"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_sample(tmp_path, case: str) -> None:
    bad, message = CASES[case]
    shard = write_members(tmp_path / "shard.tar", members_with(bad))
    with pytest.raises(SampleError, match=message) as caught:
        ingest(Sa1bTarSource(), [shard], tmp_path / "fail.zarr", workers=1)
    assert str(shard) in str(caught.value)
    assert list(SampleReader(tmp_path / "fail.zarr").sample_ids) == ["ok_0"]  # nothing lost

    report = ingest(Sa1bTarSource(), [shard], tmp_path / "skip.zarr", workers=2,
                    on_error="skip")
    assert list(SampleReader(tmp_path / "skip.zarr").sample_ids) == ["ok_0", "ok_1", "ok_2"]
    assert report.skipped and all(message.lower() in s.reason.lower() or message.lower() in
                                  s.where.lower() for s in report.skipped[:1])
    written = json.loads(Path(report.report_path).read_text())
    assert len(written["skipped"]) == len(report.skipped)
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path.parent / "evil.jpg").exists()


class NulIdSource(Sa1bTarSource):
    """A source (of any kind) that yields a sample id no store can hold."""

    def records(self, unit):
        for record in super().records(unit):
            if getattr(record, "sample_id", "") == "ok_1":
                record = dataclasses.replace(record, sample_id="ok\0_1")
            yield record


def test_unusable_sample_ids_from_any_source_are_refused(tmp_path) -> None:
    shard = write_members(tmp_path / "shard.tar", members_with([]))
    with pytest.raises(SampleError, match="without NUL"):
        ingest(NulIdSource(), [shard], tmp_path / "fail.zarr", workers=1)
    report = ingest(NulIdSource(), [shard], tmp_path / "skip.zarr", workers=1, on_error="skip")
    assert [s.sample_id for s in report.skipped] == ["ok\0_1"]
    assert list(SampleReader(tmp_path / "skip.zarr").sample_ids) == ["ok_0", "ok_2"]


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                                  tarfile.FIFOTYPE])
def test_links_and_devices_are_never_followed(tmp_path, kind) -> None:
    shard = tmp_path / "links.tar"
    with tarfile.open(shard, "w") as archive:
        for name, data in sample_members(GOOD[0], 1):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        odd = tarfile.TarInfo("sneaky.jpg")
        odd.type, odd.linkname = kind, "/etc/passwd"
        archive.addfile(odd)
    with pytest.raises(SampleError, match="not a regular file"):
        ingest(Sa1bTarSource(), [shard], tmp_path / "s.zarr", workers=1)
    assert list(SampleReader(tmp_path / "s.zarr").sample_ids) == ["ok_0"]


@pytest.mark.parametrize("cut", ["inside a member", "at a member boundary"])
def test_truncated_tar(tmp_path, cut: str) -> None:
    whole = write_members(tmp_path / "whole.tar", members_with([]))
    data = whole.read_bytes()
    with tarfile.open(whole) as archive:
        last = archive.getmembers()[-1]
    size = last.offset_data + 10 if cut == "inside a member" else last.offset
    (tmp_path / "cut.tar").write_bytes(data[:size])
    with pytest.raises(SourceError, match=r"truncated|unreadable") as caught:
        ingest(Sa1bTarSource(), [tmp_path / "cut.tar"], tmp_path / "s.zarr", workers=1)
    assert "cut.tar" in str(caught.value)
    report = ingest(Sa1bTarSource(), [tmp_path / "cut.tar"], tmp_path / "k.zarr", workers=1,
                    on_error="skip")
    assert report.skipped[-1].sample_id == "*"


def test_empty_shard(tmp_path) -> None:
    empty = write_members(tmp_path / "empty.tar", [])
    with pytest.raises(SourceError, match="empty shard"):
        ingest(Sa1bTarSource(), [empty], tmp_path / "s.zarr", workers=1)


def test_bin_folder_problems(tmp_path) -> None:
    root = write_bin_dataset(tmp_path / "bin", 3)
    (root / "config.json").unlink()
    with pytest.raises(SourceError, match="Config not found at"):
        ingest(BinDirectorySource(), [root], tmp_path / "a.zarr")
    root = write_bin_dataset(tmp_path / "bin2", 3)
    with open(root / "images.bin", "ab") as handle:
        handle.write(b"\0" * 100)
    with pytest.raises(SourceError, match="not a multiple of the item size 3145728"):
        ingest(BinDirectorySource(), [root], tmp_path / "b.zarr")
