"""Crash safety: SIGKILL of the writer and its workers at seeded random moments, a full disk,
and readers running beside a writer. After each, the store reads consistently, ``verify`` passes
and re-running the same command gives a store equal, sample for sample, to an uninterrupted run.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr.storage._local as zarr_local
from conftest import photo, rectangle

from arraystore import Layout, SampleReader, ingest
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.errors import StoreWriteError, WorkerDiedError
from arraystore.lock import lock_path
from arraystore.store import is_store
from arraystore.testing.sa1b_shards import ShardSample, write_shard
from arraystore.verify import verify

LAYOUT = Layout("sharded", shard_size=2)
CLI_LAYOUT = ["--layout", "sharded", "--shard-size", "2"]


@pytest.fixture(scope="module")
def twelve(tmp_path_factory) -> tuple[Path, dict]:
    """A 12-sample shard and the values an uninterrupted ingest stores for it."""
    rng = np.random.default_rng(99)
    samples = [ShardSample(f"k_{i:02d}", photo(rng, 320, 480),
                           [rectangle((320, 480), 10 * i, 5, 10 * i + 100, 150)])
               for i in range(12)]
    root = tmp_path_factory.mktemp("twelve")
    shard = write_shard(root / "twelve.tar", samples)
    ingest(Sa1bTarSource(), [shard], root / "reference.zarr", layout=LAYOUT, workers=1)
    reader = SampleReader(root / "reference.zarr")
    return shard, {reader.sample_ids[i]: reader.read(i) for i in range(len(reader))}


def assert_committed_match(path: Path, reference: dict) -> int:
    """Every committed sample equals the reference; committed samples are a prefix in order."""
    reader = SampleReader(path)
    assert list(reader.sample_ids) == list(reference)[: len(reader)]
    for index, sample_id in enumerate(reader.sample_ids):
        for name, value in reader.read(index).items():
            np.testing.assert_array_equal(value, reference[sample_id][name], err_msg=name)
    return len(reader)


def cli(shard: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "arraystore", "ingest", "sa1b", str(shard), "--out", str(out),
            *CLI_LAYOUT, "--workers", "2", "--no-progress"]


def test_sigkill_at_random_moments_then_rerun(tmp_path, twelve) -> None:
    shard, reference = twelve
    out = tmp_path / "killed.zarr"
    rng = np.random.default_rng(20261122)
    progress = []
    for _ in range(6):
        process = subprocess.Popen(cli(shard, out), start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.3, 4.0))
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the writer and its worker processes
        process.wait()
        if is_store(out):
            try:
                progress.append(assert_committed_match(out, reference))
            except Exception as exc:  # a kill during creation leaves an uninitialised store
                assert "interrupted" in str(exc), exc
            report = verify(out)
            assert report.ok or "interrupted" in str(report.problems), report.problems
    final = subprocess.run(cli(shard, out), capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert assert_committed_match(out, reference) == 12
    assert verify(out, deep=True).ok
    assert not list(out.rglob("*.partial")) and not lock_path(out).exists()
    assert progress, "no kill landed after the store existed; widen the delays"


@pytest.mark.parametrize("writes_before_full", [8, 45, 90])
def test_disk_full_leaves_a_consistent_resumable_store(tmp_path, twelve, monkeypatch,
                                                       writes_before_full) -> None:
    shard, reference = twelve
    out = tmp_path / "full.zarr"
    real_put, calls, finished = zarr_local._put, [0], []

    def put_until_full(path, value, exclusive=False):
        calls[0] += 1
        if calls[0] > writes_before_full:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        time.sleep(0.02)  # slow writes: siblings are still in flight when one fails
        written = real_put(path, value, exclusive=exclusive)
        finished.append(time.monotonic())
        return written

    monkeypatch.setattr(zarr_local, "_put", put_until_full)
    with pytest.raises(OSError, match="No space left") as caught:
        ingest(Sa1bTarSource(), [shard], out, layout=LAYOUT, workers=1)
    stopped = time.monotonic()
    time.sleep(0.2)  # a write still in flight would land now
    monkeypatch.setattr(zarr_local, "_put", real_put)
    assert all(t <= stopped for t in finished), "a write landed after ingest had failed"
    if isinstance(caught.value, StoreWriteError):
        assert "re-run the same command" in str(caught.value)
        assert assert_committed_match(out, reference) < 12
        assert verify(out).ok
    assert not list(out.rglob("*.partial")) and not lock_path(out).exists()
    ingest(Sa1bTarSource(), [shard], out, layout=LAYOUT, workers=1)
    assert assert_committed_match(out, reference) == 12
    assert verify(out).ok


def test_readers_during_a_write_see_only_committed_whole_samples(tmp_path, twelve) -> None:
    shard, reference = twelve
    out = tmp_path / "live.zarr"
    process = subprocess.Popen(cli(shard, out), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    seen = set()
    while process.poll() is None:
        if is_store(out):
            try:
                seen.add(assert_committed_match(out, reference))
            except Exception as exc:
                if "interrupted" not in str(exc):  # creation not finished yet
                    raise
        time.sleep(0.05)
    assert process.returncode == 0, process.stderr.read()
    assert assert_committed_match(out, reference) == 12
    assert len(seen) >= 2, f"reads landed on too few states: {seen}"


class DyingSource(Sa1bTarSource):
    """A source whose worker process dies on one sample, as if the OS had killed it."""

    def derive(self, record):
        if record.sample_id == "k_05":
            os._exit(9)
        return super().derive(record)


def test_a_dead_worker_is_reported_not_waited_for(tmp_path, twelve) -> None:
    shard, reference = twelve
    out = tmp_path / "s.zarr"
    with pytest.raises(WorkerDiedError, match="k_05"):
        ingest(DyingSource(), [shard], out, layout=LAYOUT, workers=2)
    assert assert_committed_match(out, reference) <= 5
    assert not lock_path(out).exists()
    ingest(Sa1bTarSource(), [shard], out, layout=LAYOUT, workers=2)
    assert assert_committed_match(out, reference) == 12


def test_a_script_without_a_main_guard_gets_the_fix_in_the_error(tmp_path, twelve) -> None:
    """Spawned workers re-import the main module; a script that calls ingest() at top level
    makes each of them start an ingest of its own and die. The error says how to fix it."""
    shard, _ = twelve
    script = tmp_path / "convert.py"
    script.write_text(
        "from arraystore import ingest\n"
        "from arraystore.converters.sa1b.source import Sa1bTarSource\n"
        f"ingest(Sa1bTarSource(), [{str(shard)!r}], {str(tmp_path / 's.zarr')!r}, workers=2)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode != 0
    assert "WorkerDiedError" in done.stderr and 'if __name__ == "__main__":' in done.stderr
    assert not lock_path(tmp_path / "s.zarr").exists()
