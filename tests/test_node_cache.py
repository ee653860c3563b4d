"""The node-local cache (``arraystore.node_cache``) over a simulated cloud region: a warm cache
serves every range without a GET and equals the local store, on every uncompressed layout; an
object rewritten in the store is fetched again, a damaged entry is replaced, the limit holds by
evicting the least recently used, files the cache did not write survive, processes sharing the
cache download each range once, a cache that cannot write reads through with one warning, and
``arraystore cache info|clear`` report and empty it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    UNCOMPRESSED,
    _layout_store,
    assert_same_values,
    copy_store,
    per_sample_fields,
    run_cli,
    served,
    url,
)

from arraystore import SampleReader, node_cache
from arraystore.errors import OptionError
from arraystore.loaders import ZarrDistillDataset, collate_distill
from arraystore.node_cache import ENV_DIR, MARKER, CacheWarning, NodeCache, parse_size


def cached_reader(region, name: str, cache: Path, **options) -> SampleReader:
    reader = SampleReader(url(name), storage_options=region.storage_options(), cache_dir=cache,
                          **options)
    return SampleReader(url(name), storage_options=region.storage_options(), cache_dir=cache,
                        fields=per_sample_fields(reader), **options)


def read_all(reader: SampleReader, indices=None) -> list[dict]:
    return [reader[i] for i in (range(len(reader)) if indices is None else indices)]


@pytest.mark.parametrize("layout", UNCOMPRESSED)
def test_a_warm_cache_serves_every_range_and_equals_the_local_store(
        region, layout, tmp_path, tmp_path_factory, shard) -> None:
    cache = tmp_path / "cache"
    cold = cached_reader(region, layout, cache)
    local = SampleReader(_layout_store(layout, tmp_path_factory, shard), fields=cold.fields)
    got: list[dict] = []
    first = served(region, lambda: got.extend(read_all(cold)))
    assert first["gets"] > 0
    for index, sample in enumerate(got):
        assert_same_values(sample, local[index], f"{layout} cold {index}")
    warm = cached_reader(region, layout, cache)  # another process's view: versions asked again
    again: list[dict] = []
    second = served(region, lambda: again.extend(read_all(warm)))
    assert second["gets"] == 0
    objects = len(cold.fields) * (len(cold) if layout.startswith("raw")
                                  else -(-len(cold) // cold.layout.shard_size))
    assert second["heads"] == objects  # one HEAD per object and process validates its entries
    for index, sample in enumerate(again):
        assert_same_values(sample, local[index], f"{layout} warm {index}")
    held = NodeCache(cache).usage()
    assert held.stores == (url(layout),) and held.entries > 0 and held.bytes > 0


def test_a_rewritten_object_is_fetched_again(region, tmp_path, tmp_path_factory,
                                             shard) -> None:
    copy_store(region, "sharded+crc32c", "rewritten", tmp_path_factory, shard)
    cache = tmp_path / "cache"
    local = SampleReader(_layout_store("sharded+crc32c", tmp_path_factory, shard))
    read_all(cached_reader(region, "rewritten", cache))
    folder = region.root / "stores" / "rewritten.zarr" / "image" / "c"
    first, second = sorted(p for p in folder.rglob("*") if p.is_file())[:2]
    shutil.copyfile(second, first)  # shard 0 now holds shard 1's samples (a new ETag)
    reader = cached_reader(region, "rewritten", cache)
    again = served(region, lambda: reader.read(0, ["image"]))
    assert again["gets"] > 0
    np.testing.assert_array_equal(reader.read(0, ["image"])["image"],
                                  local[reader.layout.shard_size]["image"])


def test_a_damaged_entry_is_fetched_again_and_replaced(region, tmp_path) -> None:
    cache = tmp_path / "cache"
    expected = read_all(cached_reader(region, "raw+crc32c", cache))
    entries = sorted(p for p in (cache / "objects").rglob("*") if p.name[0].isdigit())
    damaged = max(entries, key=lambda p: p.stat().st_size)
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    reader = cached_reader(region, "raw+crc32c", cache)
    got: list[dict] = []
    with pytest.warns(CacheWarning, match="damaged"):
        again = served(region, lambda: got.extend(read_all(reader)))
    assert again["gets"] == 1  # the damaged entry only
    for index, sample in enumerate(got):
        assert_same_values(sample, expected[index], f"sample {index}")
    assert damaged.read_bytes() != bytes(raw)


@pytest.mark.parametrize("layout", ["sharded", "sharded+crc32c"])
def test_a_damaged_entry_read_into_a_batch_is_fetched_again(region, layout, tmp_path) -> None:
    """The batch path reads entries straight into the batch's buffers: a damaged one is
    caught there (by the entry's crc32c, or the chunk's own) and read from the store."""
    cache = tmp_path / "cache"
    dataset = ZarrDistillDataset(url(layout), storage_options=region.storage_options(),
                                 cache_dir=cache)
    indices = list(range(len(dataset)))
    expected = collate_distill(dataset.__getitems__(indices))
    entries = [p for p in (cache / "objects").rglob("*") if p.name[0].isdigit()]
    damaged = max(entries, key=lambda p: p.stat().st_size)
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    damaged.write_bytes(bytes(raw))
    again = ZarrDistillDataset(url(layout), storage_options=region.storage_options(),
                               cache_dir=cache)
    got: list = []
    with pytest.warns(CacheWarning, match="damaged"):
        refetched = served(region, lambda: got.append(collate_distill(
            again.__getitems__(indices))))
    assert refetched["gets"] == 1
    assert_same_values(got[0], expected)
    assert damaged.read_bytes() != bytes(raw)


def test_a_cache_folder_of_garbage_is_rebuilt_with_a_warning_naming_it(region,
                                                                     tmp_path) -> None:
    """Entries truncated or overwritten (another format, garbage) and object records that do
    not parse: detected, deleted and fetched again; the warning names the folder."""
    cache = tmp_path / "cache"
    expected = read_all(cached_reader(region, "sharded+crc32c", cache))
    rng = np.random.default_rng(5)
    for number, path in enumerate(sorted((cache / "objects").rglob("*"))):
        if not path.is_file():
            continue
        if path.name == "object":
            path.write_text("{not json")
        elif number % 2:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            path.write_bytes(rng.bytes(path.stat().st_size))
    reader = cached_reader(region, "sharded+crc32c", cache)
    with pytest.warns(CacheWarning, match=str(cache)):
        got = read_all(reader)
    for index, sample in enumerate(got):
        assert_same_values(sample, expected[index], f"sample {index}")
    rebuilt = cached_reader(region, "sharded+crc32c", cache)
    assert served(region, lambda: read_all(rebuilt))["gets"] == 0


def test_what_a_killed_writer_leaves_is_never_served_and_clear_removes_it(region,
                                                                        tmp_path) -> None:
    """An entry is written to a temporary file and renamed into place: a process killed
    mid-write leaves only the temporary file, which no reader takes for the entry."""
    cache = tmp_path / "cache"
    expected = read_all(cached_reader(region, "raw", cache))
    entry = max((p for p in (cache / "objects").rglob("*") if p.name[0].isdigit()),
                key=lambda p: p.stat().st_size)
    leftover = entry.with_name(f".{entry.name}.4242.tmp")
    leftover.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # a half-written one
    entry.unlink()
    reader = cached_reader(region, "raw", cache)
    got: list[dict] = []
    assert served(region, lambda: got.extend(read_all(reader)))["gets"] == 1
    for index, sample in enumerate(got):
        assert_same_values(sample, expected[index], f"sample {index}")
    assert entry.exists() and leftover.exists()
    run_cli("cache", "clear", cache, check=True)
    assert not leftover.exists()


def test_the_limit_holds_least_recently_used_go_first_and_foreign_files_stay(
        region, tmp_path) -> None:
    cache = tmp_path / "cache"
    probe = cached_reader(region, "raw", cache)
    sample_bytes = sum(probe.schema[name].nbytes for name in probe.fields)
    limit = int(2.5 * sample_bytes)
    reader = cached_reader(region, "raw", cache, cache_limit=limit)
    foreign = [cache / "notes.txt", cache / "objects" / "ab" / "notes.txt"]
    for path in foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not the cache's")
    count = len(reader)
    read_all(reader)
    assert NodeCache(cache).usage().bytes <= limit
    assert served(region, lambda: reader[count - 1])["gets"] == 0  # the most recent: kept
    assert served(region, lambda: reader[0])["gets"] > 0  # the least recent: evicted
    cleared = run_cli("cache", "clear", cache, check=True)
    assert "deleted" in cleared.output
    assert NodeCache(cache).usage().entries == 0
    assert all(path.read_text() == "not the cache's" for path in foreign)


READ_IMAGES = """
import json, resource, signal, sys, warnings
import numpy as np
from arraystore import SampleReader
url, options, cache, cannot_write = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
if cannot_write == "yes":  # the OS refuses writes past 1000 bytes, as a full disk would
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    reader = SampleReader(url, storage_options=options, cache_dir=cache, fields=["image"])
    sums = [float(np.sum(reader[i]["image"], dtype=np.float64)) for i in range(len(reader))]
print(json.dumps({"sums": sums, "warnings": [str(w.message) for w in caught
                                             if w.category.__name__ == "CacheWarning"]}))
"""


def read_images_elsewhere(region, name: str, cache: Path,
                          cannot_write: bool = False) -> subprocess.Popen:
    """A process reading every sample's image of store ``name`` through ``cache``; prints
    the images' sums and the cache warnings it got, as JSON."""
    return subprocess.Popen([sys.executable, "-c", READ_IMAGES, url(name),
                             json.dumps(region.storage_options()), str(cache),
                             "yes" if cannot_write else "no"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return json.loads(out)


def image_sums(region, name: str) -> list[float]:
    reader = SampleReader(url(name), storage_options=region.storage_options(), fields=["image"])
    return [float(np.sum(reader[i]["image"], dtype=np.float64)) for i in range(len(reader))]


def test_processes_sharing_a_cache_download_each_range_once(region, tmp_path) -> None:
    solo = served(region, lambda: finished(read_images_elsewhere(region, "sharded",
                                                                 tmp_path / "solo")))
    # the same again, warm: what opening the store costs a process
    opening = served(region, lambda: finished(read_images_elsewhere(region, "sharded",
                                                                    tmp_path / "solo")))
    results: list[dict] = []

    def together() -> None:
        running = [read_images_elsewhere(region, "sharded", tmp_path / "shared")
                   for _ in range(3)]
        results.extend(finished(process) for process in running)

    shared = served(region, together)
    assert opening["bytes"] < solo["bytes"] / 10
    assert shared["bytes"] <= solo["bytes"] + 2 * opening["bytes"]  # the ranges once
    expected = image_sums(region, "sharded")
    assert all(result["sums"] == expected for result in results)


def test_a_cache_that_cannot_write_reads_through_with_one_warning(region, tmp_path) -> None:
    result = finished(read_images_elsewhere(region, "raw", tmp_path / "cache", True))
    assert result["sums"] == image_sums(region, "raw")
    assert len(result["warnings"]) == 1 and "reads go through" in result["warnings"][0]


def test_a_dataloader_over_a_warm_cache(region, tmp_path) -> None:
    cache = tmp_path / "cache"
    dataset = ZarrDistillDataset(url("sharded+crc32c"), storage_options=region.storage_options(),
                                 cache_dir=cache)
    def epoch(out: list) -> None:
        out.extend(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2,
                                               collate_fn=collate_distill))

    first: list = []
    second: list = []
    cold = served(region, lambda: epoch(first))
    warm = served(region, lambda: epoch(second))
    assert cold["gets"] > 0 and warm["gets"] == 0  # per-sample chunks and blocks (ids, flags)
    for got, expected in zip(second, first, strict=True):
        assert_same_values(got, expected)


def test_the_environment_names_the_cache_and_an_empty_dir_turns_it_off(
        region, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "from-env"))
    read_all(SampleReader(url("raw"), storage_options=region.storage_options(),
                          fields=["image"]))
    assert NodeCache(tmp_path / "from-env").usage().entries > 0
    read_all(SampleReader(url("sharded"), storage_options=region.storage_options(),
                          fields=["image"], cache_dir=""))
    assert NodeCache(tmp_path / "from-env").usage().stores == (url("raw"),)


def test_cache_info_and_clear(region, tmp_path) -> None:
    cache = tmp_path / "cache"
    read_all(cached_reader(region, "raw", cache))
    info = run_cli("cache", "info", cache, check=True).output
    assert url("raw") in info and "entries" in info
    held = json.loads(run_cli("cache", "info", cache, "--json", check=True).output)
    assert held["entries"] > 0 and held["bytes"] > 0 and held["stores"] == [url("raw")]
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "keep.txt").write_text("mine")
    refused = run_cli("cache", "clear", tmp_path / "plain")
    assert refused.exit_code != 0 and MARKER in refused.output
    assert (tmp_path / "plain" / "keep.txt").exists()


@pytest.mark.parametrize(("value", "size"), [(1000, 1000), ("50GB", 50 * 10**9),
                                             ("1.5 GiB", int(1.5 * 2**30)), ("800M", 8 * 10**8),
                                             ("123", 123)])
def test_sizes(value, size) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["lots", "-5GB", "0", "5 parsecs"])
def test_bad_sizes_are_option_errors(value) -> None:
    with pytest.raises(OptionError, match="cache limit"):
        parse_size(value)


def test_a_cache_pickles_as_its_folder_and_limit(tmp_path) -> None:
    import pickle

    cache = NodeCache(tmp_path, "2GB")
    assert pickle.loads(pickle.dumps(cache)) == cache


@pytest.mark.parametrize("layout", ["sharded", "sharded+crc32c"])
def test_entries_read_again_while_held_are_checked_once_and_hold_no_descriptor(
        region, layout, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process maps the entries it reads: a second pass through them copies out of the
    mappings, checks no crc32c again (the entry's, or the chunk's own), opens no file and
    keeps none open; the batches stay equal."""
    import crc32c as crc_module

    from arraystore.readers import ranged

    dataset = ZarrDistillDataset(url(layout), storage_options=region.storage_options(),
                                 cache_dir=tmp_path / "cache")
    indices = list(range(len(dataset)))
    collate_distill(dataset.__getitems__(indices))  # fetched and kept
    first = collate_distill(dataset.__getitems__(indices))  # read and checked once
    checks: list[int] = []
    real_crc, real_matches = crc_module.crc32c, ranged.crc_matches
    monkeypatch.setattr(crc_module, "crc32c", lambda *a: checks.append(1) or real_crc(*a))
    monkeypatch.setattr(ranged, "crc_matches", lambda *a: checks.append(1) or real_matches(*a))
    descriptors = len(os.listdir("/proc/self/fd"))
    again: list = []
    requests = served(region, lambda: again.append(collate_distill(
        dataset.__getitems__(indices))))
    assert not checks and requests["gets"] == 0
    assert len(os.listdir("/proc/self/fd")) <= descriptors
    assert_same_values(again[0], first)


def test_what_a_process_holds_mapped_is_bounded_in_bytes(region, tmp_path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_cache, "HELD_BYTES", 1 << 20)
    dataset = ZarrDistillDataset(url("sharded"), storage_options=region.storage_options(),
                                 cache_dir=tmp_path / "cache")
    indices = list(range(len(dataset)))
    expected = collate_distill(dataset.__getitems__(indices))
    for _ in range(2):  # entries of 3 MB and more: read, never held
        assert_same_values(collate_distill(dataset.__getitems__(indices)), expected)
        state = dataset.reader.location.cache._state.get()
        assert 0 < state.held_bytes <= 1 << 20
        assert state.held_bytes == sum(len(e.data) for e in state.opened.values())
