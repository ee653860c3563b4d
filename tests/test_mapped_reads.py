"""Mapped shard reads (:mod:`arraystore.readers.mapped`): a sharded store's inner chunks come
out of a persistent mapping of their shard from their second read on, give the same bytes as
``preadv``, still check crc32c, close with the shard's LRU entry, and can be switched off."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from arraystore import Layout, SampleReader, ingest
from arraystore.errors import ChecksumMismatchError, StoreFormatError
from arraystore.readers import direct
from arraystore.readers.mapped import ENV_SWITCH, MIN_MAPPED_CHUNK
from converters.sa1b.source import Sa1bTarSource
from loaders import ZarrDistillDataset, collate_distill


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "crc32c"])
def sharded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            shard: Path) -> Path:
    """The known shard ingested sharded two samples to a shard (several shards per field)."""
    out = tmp_path_factory.mktemp("mapped") / "store.zarr"
    ingest(Sa1bTarSource(max_boxes=2), [shard], out,
           layout=Layout("sharded", shard_size=2, checksum=request.param), workers=1)
    return out


def counting_preadv(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the ``preadv`` calls of the direct reader (the real call still runs)."""
    calls: list[int] = []
    real = os.preadv

    def preadv(fd: int, buffers, offset: int) -> int:
        calls.append(offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(direct.os, "preadv", preadv)
    return calls


def test_second_reads_come_from_the_mapping_and_equal_preadv(
        sharded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = SampleReader(sharded, backend="zarr")
    reader = SampleReader(sharded, backend="direct")
    large = ("image", "P4_S16", "P5_S32", "masks")  # masks: 2 boxes, 128 KiB a chunk
    small = ("edge_256x256", "fg_map_64")  # under MIN_MAPPED_CHUNK: always preadv
    fields = large + small
    assert all(reader.schema[n].nbytes >= MIN_MAPPED_CHUNK for n in large)
    assert all(reader.schema[n].nbytes < MIN_MAPPED_CHUNK for n in small)
    calls = counting_preadv(monkeypatch)
    first = [reader.read(i, fields) for i in range(len(reader))]
    assert len(calls) == len(fields) * len(reader)  # the first read of each chunk: preadv
    calls.clear()
    again = [reader.read(i, fields) for i in reversed(range(len(reader)))][::-1]
    assert len(calls) == len(small) * len(reader)  # the large chunks: out of the mapping
    for name in fields:
        handles = reader.field_reader(name)[0]._open.values()
        assert all((handle.mapped is None) == (name in small) for handle in handles), name
    monkeypatch.setenv(ENV_SWITCH, "0")
    unmapped = SampleReader(sharded, backend="direct")
    counts = []
    for _ in range(2):
        calls.clear()
        [unmapped.read(i, fields) for i in range(len(reader))]
        counts.append(len(calls))
    assert counts == [len(fields) * len(reader)] * 2  # switched off: preadv every time
    for i in range(len(reader)):
        expected = reference.read(i, fields)
        for name in fields:
            np.testing.assert_array_equal(first[i][name], expected[name], name)
            np.testing.assert_array_equal(again[i][name], expected[name], name)
            assert again[i][name].dtype == expected[name].dtype


def test_switched_off_by_the_environment(sharded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_SWITCH, "0")
    reader = SampleReader(sharded, backend="direct")
    calls = counting_preadv(monkeypatch)
    for _ in range(2):
        reader.read(0, ("image",))
    assert len(calls) == 2
    field_reader = reader.field_reader("image")[0]
    assert all(handle.mapped is None for handle in field_reader._open.values())


def test_a_chunk_corrupted_after_mapping_is_caught_by_a_new_reader_and_verify(
        tmp_path: Path, shard: Path) -> None:
    """A reader checks a chunk's crc32c on its first read, from the disk; re-reads out of
    the mapping copy the bytes checked then (checking again halved the item rate), so a byte
    flipped in place afterwards is caught by the next reader and by ``verify``."""
    from arraystore.verify import verify

    out = tmp_path / "store.zarr"
    ingest(Sa1bTarSource(max_boxes=2), [shard], out,
           layout=Layout("sharded", shard_size=2, checksum=True), workers=1)
    reader = SampleReader(out, backend="direct")
    reader.read(0, ("image",))  # maps the shard
    shard_file = out / "image" / "c" / "0" / "0" / "0" / "0"
    with open(shard_file, "r+b") as f:  # in place: the mapping sees the same page cache
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    reader.read(0, ("image",))  # out of the mapping: not checked again
    with pytest.raises(ChecksumMismatchError, match=r"'image', sample 0"):
        SampleReader(out, backend="direct").read(0, ("image",))
    assert any("crc32c mismatch" in p.message for p in verify(out).problems)


def test_a_shard_truncated_in_place_is_an_error_not_a_crash(tmp_path: Path,
                                                            shard: Path) -> None:
    out = tmp_path / "store.zarr"
    ingest(Sa1bTarSource(max_boxes=2), [shard], out, layout=Layout("sharded", shard_size=8),
           workers=1)
    reader = SampleReader(out, backend="direct")
    for _ in range(2):  # mapped, and read from the mapping once
        reader.read(4, ("image",))
    shard_file = out / "image" / "c" / "0" / "0" / "0" / "0"
    os.truncate(shard_file, 1000)  # in place, under the mapping: a copy would be SIGBUS
    with pytest.raises(StoreFormatError, match=r"'image', sample 4: shard .* ends inside"):
        reader.read(4, ("image",))


def test_evicted_shards_unmap(sharded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct, "OPEN_SHARDS", 1)
    reference = SampleReader(sharded, backend="zarr")
    reader = SampleReader(sharded, backend="direct")
    field_reader = reader.field_reader("image")[0]
    mappings = []
    for _ in range(3):
        for i in range(len(reader)):
            np.testing.assert_array_equal(reader.read(i, ("image",))["image"],
                                          reference.read(i, ("image",))["image"])
            mappings.extend(handle.mapped for handle in field_reader._open.values())
    assert len(field_reader._open) == 1
    live = {id(handle.mapped) for handle in field_reader._open.values()}
    closed = [m for m in mappings if id(m) not in live]
    assert closed and all(m._map.closed for m in closed)


@pytest.mark.parametrize("context", ["fork", "forkserver"])
def test_dataloader_workers_after_the_parent_mapped(sharded: Path, context: str) -> None:
    dataset = ZarrDistillDataset(sharded)
    for _ in range(2):  # the parent maps every shard before the workers start
        parent = [dataset[i] for i in range(len(dataset))]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2,
                                         multiprocessing_context=context,
                                         collate_fn=collate_distill, persistent_workers=True)
    # forked workers start with the parent's mappings; under forkserver the workers open
    # their own, which their second epoch reads through
    for _ in range(2):
        rows = 0
        for batch in loader:
            for row, image in enumerate(batch["image"]):
                np.testing.assert_array_equal(image, parent[rows + row]["image"])
            rows += len(batch["image"])
        assert rows == len(dataset)

