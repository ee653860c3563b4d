"""The benchmark's own tools: the profiler's shares, the no-I/O reader and the report. The
benchmark itself is run by hand (`make bench`); these keep its parts honest and working."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from arraystore.kinds.sa1b import sa1b_schema
from arraystore.loaders.distill_item import ALL_KEYS, DISTILL_FIELDS
from arraystore.machine import available_cores
from arraystore.readers.mapped import ENV_SWITCH, mapped_reads_enabled
from benchmarks.in_memory import InMemoryDataset
from benchmarks.page_cache import evict, preadv_only, resident_fraction
from benchmarks.profile import copy_share, time_shares
from benchmarks.report import BIN, DEFAULT, NO_IO, TAR, Results, write_report
from benchmarks.run import interleaved


def field_values(seed: int) -> dict[str, np.ndarray]:
    """Random values of the fields an item is built from, one box."""
    rng = np.random.default_rng(seed)
    schema = sa1b_schema()
    values = {name: rng.integers(0, 2, schema[name].shape).astype(schema[name].dtype)
              for name in DISTILL_FIELDS}
    values["metadata"] = np.array([1, 1, 1024, 1024, 3], np.int32)
    return values


def test_time_shares_find_the_copy(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(os.urandom(1 << 22))
    fd = os.open(path, os.O_RDONLY)
    try:
        buffer = bytearray(1 << 22)
        shares = time_shares(lambda: [os.preadv(fd, [buffer], 0) for _ in range(20)])
    finally:
        os.close(fd)
    labels = [label for label, _ in shares]
    assert "posix.preadv" in labels
    assert 0 < copy_share(shares) <= sum(share for _, share in shares) <= 1.0 + 1e-9
    source, target = torch.ones(1 << 22, dtype=torch.uint8), torch.empty(1 << 22,
                                                                        dtype=torch.uint8)
    shares = time_shares(lambda: [target.copy_(source) for _ in range(20)])  # mapped shards
    assert copy_share(shares) > 0, shares


def test_in_memory_items_are_fresh_copies() -> None:
    values = [field_values(0), field_values(1)]
    dataset = InMemoryDataset(values, ["a", "b"])
    first, again = dataset[1], dataset[1]
    assert set(first) == set(ALL_KEYS) and first["image_id"] == "b"
    assert torch.equal(first["image"], again["image"])
    assert first["image"].data_ptr() != again["image"].data_ptr()  # a new copy per read
    assert not np.shares_memory(values[1]["image"], first["image"].numpy())
    assert torch.equal(first["teacher_features"], torch.from_numpy(values[1]["P4_S16"]))


def test_in_memory_items_in_two_halves_equal_the_plain_ones() -> None:
    """The concurrent ceiling copies the fields in two halves (both non-empty) and builds the
    same item, from fresh copies."""
    values = [field_values(0), field_values(1)]
    plain, halves = InMemoryDataset(values, ["a", "b"]), InMemoryDataset(values, ["a", "b"],
                                                                          halves=True)
    assert available_cores() < 2 or (halves.split is not None and all(halves.split))
    got, expected = halves[1], plain[1]
    assert set(got) == set(expected) == set(ALL_KEYS)
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        elif isinstance(value, np.ndarray):
            assert np.array_equal(got[key], value), key
        else:
            assert got[key] == value, key
    assert not np.shares_memory(values[1]["P4_S16"], got["teacher_features"].numpy())


def test_report_has_targets_ceiling_and_profile(tmp_path: Path) -> None:
    readers = (BIN, TAR, DEFAULT, "raw / direct", NO_IO)
    single = dict(zip(readers, [(800.0, 0.2), (4.0, 0.1), (960.0, 0.3), (900.0, 0.2),
                                (1600.0, 0.2)], strict=True))
    loader = {BIN: (160.0, 0.1), DEFAULT: (150.0, 0.1), NO_IO: (165.0, 0.1), TAR: (6.0, 0.1)}
    busy_single = {name: (rate / 2, spread) for name, (rate, spread) in single.items()}
    busy_loader = {**loader, DEFAULT: (170.0, 0.1)}
    results = Results(args={"samples": 4, "masks": 2}, single=single, loader=loader,
                      busy_single=busy_single, busy_loader=busy_loader,
                      ingest={"1 worker": 3.0}, disk={".bin": (100, 9), "raw": (100, 50)},
                      item_bytes=8_000_000, batch_size=8,
                      profiles={DEFAULT: [("'copy_' of 'torch._C.TensorBase' objects", 0.6),
                                          ("posix.preadv", 0.15), ("x.py:1 f", 0.1)]})
    text = write_report(results, tmp_path / "report")
    assert "| defaults (sharded / auto), single process, idle | ≥ 1× | 1.20× | met |" in text
    assert "| defaults (sharded / auto), single process, busy | ≥ 1× | 1.20× | met |" in text
    assert ("| defaults (sharded / auto), DataLoader 2 workers, idle | ≥ 1× | 0.94× | "
            "**missed by 6%** |") in text  # 150 / 160
    assert "| defaults (sharded / auto), DataLoader 2 workers, busy | ≥ 1× | 1.06× | met |" in text
    assert "| sharded / auto | 960.0 | 480.0 |" in text  # idle and busy columns
    assert "## Where the time goes" in text and "mapped shards) is 75% of the time" in text
    assert "runs at 0.50× of that" in text  # .bin against the no-I/O ceiling
    assert (tmp_path / "report.md").read_text() == text
    assert (tmp_path / "report.png").stat().st_size > 0


def test_peers_flat_file_and_byte_check(tmp_path: Path) -> None:
    """The peers benchmark's floor reader returns the items it was written from, also after
    pickling (LitData's workers), and its byte check refuses an item that differs."""
    import pickle

    import pytest

    from benchmarks.batches import random_columns
    from benchmarks.peers import FlatFile, check_same, numeric_fields

    names = numeric_fields()
    columns = random_columns(3, seed=5)
    flat = FlatFile(tmp_path / "items.flat", columns, names)
    check_same("flat", flat, columns, names)
    check_same("flat, pickled", pickle.loads(pickle.dumps(flat)), columns, names)
    assert flat.stride == sum(columns[n][0].nbytes for n in names)
    columns["image"][1, 0, 0, 0] ^= 1
    with pytest.raises(AssertionError, match="item 1, field 'image'"):
        check_same("flat", flat, columns, names)


def _file_system_of(path: Path) -> str:
    """The type of the file system ``path`` is on (the longest mount point above it)."""
    mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    return max(((point, kind) for point, kind in mounts
                if str(path).startswith(point.rstrip("/") + "/") or str(path) == point),
               key=lambda found: len(found[0]))[1]


def test_a_store_read_from_the_disk_has_its_pages_dropped_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    (store / "a").mkdir(parents=True)
    (store / "a" / "c0").write_bytes(os.urandom(1 << 21))
    (store / "zarr.json").write_bytes(b"{}")
    (store / "empty").write_bytes(b"")  # mincore cannot map it: skipped
    os.sync()
    for path in store.rglob("*"):
        if path.is_file():
            path.read_bytes()
    assert resident_fraction(store) == 1.0
    if _file_system_of(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is in memory: its pages are the files and cannot be dropped")
    evict(store)
    assert resident_fraction(store) < 0.05
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    assert mapped_reads_enabled()
    preadv_only(0)  # what the disk rows' DataLoader workers run first
    assert not mapped_reads_enabled()


def test_interleaved_runs_what_comes_before_a_turn_untimed() -> None:
    calls: list[str] = []

    def slow_preparation() -> None:
        calls.append("before")
        time.sleep(0.2)

    def run() -> int:
        calls.append("run")
        return 10

    rates = interleaved({"a": run, "b": run}, rounds=2, seed=0,
                        before={"a": slow_preparation})
    assert calls.count("before") == 2 and calls.count("run") == 4
    assert rates["a"][0] > 1000  # 10 items in far less than the 0.2 s before each turn
