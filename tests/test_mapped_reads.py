"""Mapped shard reads (:mod:`arraystore.readers.mapped`): from their second read on, a sharded
store's inner chunks are handed out as private mappings of their own (a sample read on its
own) or copied out of a persistent mapping of their shard (into a batch buffer); they give
the same bytes as ``preadv``, still check crc32c, close with the shard's LRU entry (a private
mapping, with its last array), and can be switched off."""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from arraystore import Layout, SampleReader, ingest, private_mappings
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.errors import ChecksumMismatchError, StoreFormatError
from arraystore.loaders import BatchLoader, ZarrDistillDataset, collate_distill
from arraystore.private_mappings import private_chunk
from arraystore.readers import local_files
from arraystore.readers.mapped import ENV_SWITCH, MIN_MAPPED_CHUNK, MappedShard
from tests.conftest import BACKENDS, assert_same_values


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "crc32c"])
def sharded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
            shard: Path) -> Path:
    """The known shard ingested sharded two samples to a shard (several shards per field)."""
    out = tmp_path_factory.mktemp("mapped") / "store.zarr"
    ingest(Sa1bTarSource(max_boxes=2), [shard], out,
           layout=Layout("sharded", shard_size=2, checksum=request.param), workers=1)
    return out


def privately_mapped(array: np.ndarray) -> bool:
    """Whether ``array`` views a private chunk mapping (:func:`private_chunk`)."""
    base = array
    while base is not None and not isinstance(base, private_mappings.PrivateMapping):
        base = getattr(base, "base", None)
    return base is not None


def file_mapped_at(address: int) -> str:
    """The file this process has mapped at ``address`` (``/proc/self/maps``), or ''."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, _, _, _, _, *path = line.split()
            low, high = (int(a, 16) for a in span.split("-"))
            if low <= address < high:
                return path[0] if path else ""
    return ""


def counting_preadv(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the ``preadv`` calls of the direct reader (the real call still runs)."""
    calls: list[int] = []
    real = os.preadv

    def preadv(fd: int, buffers, offset: int) -> int:
        calls.append(offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(local_files.os, "preadv", preadv)
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
        assert not any(privately_mapped(item[name]) for item in first), name
        assert all(privately_mapped(item[name]) == (name in large) for item in again), name
    monkeypatch.setenv(ENV_SWITCH, "0")
    unmapped = SampleReader(sharded, backend="direct")
    counts = []
    for _ in range(2):
        calls.clear()
        [unmapped.read(i, fields) for i in range(len(reader))]
        counts.append(len(calls))
    assert counts == [len(fields) * len(reader)] * 2  # switched off: preadv every time
    assert not privately_mapped(unmapped.read(0, ("image",))["image"])
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
    monkeypatch.setattr(local_files, "OPEN_SHARDS", 1)
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



@pytest.mark.parametrize("backend", BACKENDS)
def test_items_read_again_equal_their_first_read(layout_store, backend: str,
                                                 torch_threads: int) -> None:
    """Every item read three times (from the second read on, a sharded item's chunks come out
    of its mappings) equals zarr-python's read, on every layout and backend, whatever torch's
    thread count."""
    layout, path = layout_store
    reference = SampleReader(path, backend="zarr")
    reader = SampleReader(path, backend=backend)
    for _ in range(3):
        for i in range(len(reader)):
            assert_same_values(reader.read(i), reference.read(i), f"{layout}, sample {i}")


def test_items_and_batches_read_again_build_the_same_dicts(layout_store) -> None:
    """Items read again, and a BatchLoader's threads reading samples again, build what the
    first reads built."""
    layout, path = layout_store
    dataset = ZarrDistillDataset(path)
    first = [dataset[i] for i in range(len(dataset))]
    for i in range(len(dataset)):
        assert_same_values(dataset[i], first[i], f"{layout}, item {i}")
    order = list(range(len(dataset))) * 3
    got = list(BatchLoader(dataset, 2, sampler=order, threads=2, copy=True))
    for k, batch in enumerate(got):
        assert_same_values(batch, collate_distill([first[i] for i in order[2 * k:2 * k + 2]]))


def test_mapped_memory_stays_read_only(tmp_path: Path) -> None:
    """What a mapping serves is read-only and shown as such: nothing writes through it."""
    path = tmp_path / "shard"
    path.write_bytes(bytes(range(256)) * 2048)
    fd = os.open(path, os.O_RDONLY)
    try:
        shard = MappedShard.open(fd, 2, MIN_MAPPED_CHUNK)
        assert shard is not None and shard.chunk(1, MIN_MAPPED_CHUNK, MIN_MAPPED_CHUNK) is None
        served = shard.chunk(1, MIN_MAPPED_CHUNK, MIN_MAPPED_CHUNK)  # read before: mapped
        assert served is not None and not served.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            served[0] = 1
        del served  # no view outlives a copy (the readers copy at once)
        shard.close()
    finally:
        os.close(fd)


def test_items_read_again_are_writable_and_private(sharded: Path) -> None:
    """A second read hands out a mapping made for it alone: writable without a warning, and
    what one caller writes reaches neither another read of the sample nor the store."""
    reference = SampleReader(sharded, backend="zarr").read(1, ("image", "P4_S16"))
    dataset = ZarrDistillDataset(sharded)
    dataset[1]  # the first read: preadv, crc32c checked
    items = [dataset[1] for _ in range(2)]
    assert all(file_mapped_at(item["image"].data_ptr()).startswith(str(sharded))
               for item in items)  # the shard's pages, not a copy
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        items[0]["image"].zero_()  # in place, as an augmentation might
        items[0]["teacher_features"].mul_(-1.0)
    for got in (items[1], dataset[1], ZarrDistillDataset(sharded)[1]):
        np.testing.assert_array_equal(got["image"].permute(1, 2, 0), reference["image"])
        np.testing.assert_array_equal(got["teacher_features"], reference["P4_S16"])
    assert not items[0]["image"].any()


def test_private_mappings_outlive_the_shard_lru_and_go_with_their_arrays(
        sharded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_files, "OPEN_SHARDS", 1)
    reference = SampleReader(sharded, backend="zarr")
    reader = SampleReader(sharded, backend="direct")
    gc.collect()
    before = private_mappings._out
    held = []
    for i in range(len(reader)):
        reader.read(i, ("image",))  # the first read (the shard stays open for the second)
        held.append(reader.read(i, ("image",))["image"])
    assert all(map(privately_mapped, held))
    assert private_mappings._out == before + len(held)
    assert len(reader.field_reader("image")[0]._open) == 1  # the other shards closed
    for i, image in enumerate(held):
        np.testing.assert_array_equal(image, reference.read(i, ("image",))["image"])
    del held, image
    gc.collect()
    assert private_mappings._out == before


def test_reads_copy_past_the_limit_of_mappings(sharded: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    reader = SampleReader(sharded, backend="direct")
    first = reader.read(0, ("image",))["image"]
    limit = private_mappings._out + 1  # room for one more
    monkeypatch.setattr(private_mappings, "_private_limit", lambda: limit)
    held = reader.read(0, ("image",))["image"]
    copied = reader.read(0, ("image",))["image"]  # the limit reached: a copy
    assert privately_mapped(held) and not privately_mapped(copied)
    np.testing.assert_array_equal(copied, first)
    np.testing.assert_array_equal(held, first)


def test_private_chunk_is_the_files_bytes_and_keeps_writes_to_itself(tmp_path: Path) -> None:
    path = tmp_path / "chunks"
    stored = np.random.default_rng(0).random(3 * MIN_MAPPED_CHUNK // 4, np.float32)
    path.write_bytes(stored.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 4100  # inside the second page: the mapping starts at the page before it
        got = private_chunk(fd, offset, MIN_MAPPED_CHUNK, np.dtype("<f4"))
        assert got is not None and got.flags.writeable and got.dtype == np.float32
        np.testing.assert_array_equal(got, stored[offset // 4:(offset + MIN_MAPPED_CHUNK) // 4])
        got[:] = 0
        again = private_chunk(fd, offset, MIN_MAPPED_CHUNK, np.dtype("<f4"))
        np.testing.assert_array_equal(again, stored[offset // 4:(offset + MIN_MAPPED_CHUNK) // 4])
        assert private_chunk(fd, offset + 2, 16, np.dtype("<f4")) is None  # misaligned
    finally:
        os.close(fd)
    assert path.read_bytes() == stored.tobytes()


def test_a_raw_stores_chunk_files_read_again_are_mapped(tmp_path: Path, shard: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The raw layout: a sample's chunk file read (its crc32c checked) before is mapped on
    its next reads, not read with ``preadv``; a file truncated since is an error, no crash."""
    out = tmp_path / "raw.zarr"
    ingest(Sa1bTarSource(max_boxes=2), [shard], out, layout=Layout("raw", checksum=True),
           workers=1)
    reference = SampleReader(out, backend="zarr")
    reader = SampleReader(out, backend="direct")
    fields = ("image", "P4_S16", "edge_256x256")
    first = [reader.read(i, fields) for i in range(len(reader))]
    calls = counting_preadv(monkeypatch)
    again = [reader.read(i, fields) for i in range(len(reader))]
    assert len(calls) == len(reader)  # edge_256x256 only: under MIN_MAPPED_CHUNK
    for i in range(len(reader)):
        expected = reference.read(i, fields)
        assert not privately_mapped(first[i]["image"])
        assert privately_mapped(again[i]["image"]) and privately_mapped(again[i]["P4_S16"])
        assert_same_values(again[i], expected, f"sample {i}")
    os.truncate(out / "image" / "c" / "1" / "0" / "0" / "0", 1000)
    with pytest.raises(StoreFormatError, match=r"'image', chunk 1, .* 1000 bytes"):
        reader.read(1, ("image",))
