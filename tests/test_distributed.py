"""Ingest on Dask: a real ``LocalCluster`` of two worker processes ingests three TAR shards into
a local store and into S3, equal sample for sample to the single-process ingest; a worker killed
mid-run is replaced and its shard redone; a driver killed mid-run resumes on re-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from arraystore import Layout, SampleReader, Store, ingest, open_xarray
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.distributed import ingest_distributed
from arraystore.errors import SampleError
from arraystore.info import store_info
from arraystore.testing.sa1b_shards import (
    ShardSample,
    sample_members,
    write_members,
    write_shard,
)
from arraystore.verify import verify
from tests.conftest import assert_same_values

LAYOUT = Layout("sharded", shard_size=2)


@pytest.fixture(scope="module")
def cluster(s3_endpoint) -> str:
    """Two worker processes, started with the AWS variables set (as a cluster's workers are
    configured with access to the bucket)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as local:
        yield local.scheduler_address


@pytest.fixture(scope="module")
def shards(tmp_path_factory, samples: list[ShardSample]) -> list[Path]:
    """Three shards of the known samples (5, 4 and 3 of them), ids unique across shards."""
    folder = tmp_path_factory.mktemp("shards")
    return [write_shard(folder / f"shard_{k}.tar",
                        [ShardSample(f"s{k}_{s.key}", s.rgb, s.masks, s.features)
                         for s in samples[: 5 - k]])
            for k in range(3)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards) -> Path:
    out = tmp_path_factory.mktemp("reference") / "single.zarr"
    ingest(Sa1bTarSource(), shards, out, layout=LAYOUT, workers=1)
    return out


def assert_same_samples(got: str | Path, expected: Path) -> None:
    a, b = SampleReader(got), SampleReader(expected)
    assert list(a.sample_ids) == list(b.sample_ids)
    for index in range(len(b)):
        assert_same_values(a.read(index), b.read(index), str(index))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_dask_ingest_equals_single_process_ingest(where, cluster, shards, reference, tmp_path,
                                                  request) -> None:
    out = tmp_path / "dask.zarr" if where == "local" else \
        f"{request.getfixturevalue('bucket')}/dask.zarr"
    report = ingest_distributed(Sa1bTarSource(), shards, out, layout=LAYOUT, address=cluster)
    assert report.ingested == 12 and len(report.units_ingested) == 3
    assert_same_samples(out, reference)
    info = store_info(out)
    assert info.committed == 12 and info.samples == 14 and info.reserved == 0  # regions 6+4+4
    assert verify(out).ok
    assert list(open_xarray(out)["sample"].values) == list(SampleReader(reference).sample_ids)
    regions = [entry["region"] for entry in Store.open(out).provenance["sources"]]
    assert sorted(regions) == [[0, 5], [6, 10], [10, 13]]
    again = ingest_distributed(Sa1bTarSource(), shards, out, address=cluster)
    assert again.ingested == 0 and len(again.units_already_done) == 3


def test_a_killed_worker_is_replaced_and_its_shard_redone(cluster, shards, reference,
                                                          tmp_path) -> None:
    killed: list[int] = []
    pids: dict[str, int] = {}

    def on_client(client) -> None:
        pids.update(client.run(os.getpid))

    def on_progress(board, report, left) -> None:
        if not killed and board.samples >= 1:  # the first report: kill the worker that sent it
            # (busy with its next shard, or holding a result not fetched yet: either is redone)
            worker = next(iter(board.workers))
            killed.append(pids[worker])
            os.kill(pids[worker], signal.SIGKILL)

    out = tmp_path / "dask.zarr"
    report = ingest_distributed(Sa1bTarSource(), shards, out, layout=LAYOUT, address=cluster,
                                on_client=on_client, on_progress=on_progress)
    assert killed and report.ingested == 12
    assert_same_samples(out, reference)
    assert verify(out).ok


def test_a_killed_driver_resumes_on_rerun(shards, reference, tmp_path) -> None:
    out = tmp_path / "dask.zarr"
    command = [sys.executable, "-m", "arraystore", "ingest", "sa1b", *map(str, shards),
               "--out", str(out), "--layout", "sharded", "--shard-size", "2",
               "--scheduler", "dask", "--workers", "2"]
    driver = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        try:
            if Store.open(out).provenance.get("sources"):
                break  # one shard committed
        except Exception:  # not created yet
            pass
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver, its cluster and workers: a lost machine
    driver.wait()
    done = len(Store.open(out).provenance["sources"])
    assert 1 <= done < 3, "the kill came too late to test a resume"
    assert store_info(out).reserved > 0  # the unfinished shards' regions are recorded
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{3 - done} inputs already ingested" not in rerun.stdout
    assert f"{done} inputs already ingested" in rerun.stdout
    assert_same_samples(out, reference)
    assert verify(out).ok and store_info(out).reserved == 0


def test_progress_events_reach_the_driver(cluster, shards, tmp_path) -> None:
    seen = threading.Event()
    boards = []

    def on_progress(board, report, left) -> None:
        boards.append((board.samples, board.nbytes, board.rates()))
        seen.set()

    ingest_distributed(Sa1bTarSource(), shards, tmp_path / "p.zarr", layout=LAYOUT,
                       address=cluster, on_progress=on_progress)
    assert seen.is_set()
    samples, nbytes, rates = boards[-1]
    assert samples == 12 and 0 < nbytes <= sum(p.stat().st_size for p in shards)
    assert "/s" in rates


def test_a_broken_sample_fails_or_is_skipped(cluster, shards, tmp_path) -> None:
    broken = write_members(tmp_path / "broken.tar", [("lonely.jpg", b"not even a JPEG")])
    with pytest.raises(SampleError, match="lonely"):
        ingest_distributed(Sa1bTarSource(), [shards[1], broken], tmp_path / "fail.zarr",
                           layout=LAYOUT, address=cluster)
    report = ingest_distributed(Sa1bTarSource(), [shards[1], broken], tmp_path / "skip.zarr",
                                layout=LAYOUT, address=cluster, on_error="skip")
    assert report.ingested == 4 and [s.sample_id for s in report.skipped] == ["lonely"]
    assert Path(report.report_path).is_file()



@pytest.mark.parametrize("scheduler", ["local", "dask"])
def test_ids_already_stored_are_skipped_before_decoding(scheduler, cluster, samples,
                                                        tmp_path) -> None:
    """Both ingest loops skip a sample the store holds before decoding it: the stored copy of
    the first sample is good, the shard's copy of it is not a JPEG, and ``on_error="fail"``
    still ingests the rest of the shard."""
    kept, rest = samples[0], samples[1:3]
    out = tmp_path / "store.zarr"
    ingest(Sa1bTarSource(), [write_shard(tmp_path / "kept.tar", [kept])], out, layout=LAYOUT,
           workers=1)
    broken = [(name, b"not a jpeg" if name.endswith(".jpg") else data)
              for name, data in sample_members(kept, 1)]
    shard = write_members(tmp_path / "again.tar", broken + [
        member for number, sample in enumerate(rest, 2)
        for member in sample_members(sample, number)])
    if scheduler == "local":
        report = ingest(Sa1bTarSource(), [shard], out, workers=1, on_error="fail")
    else:
        report = ingest_distributed(Sa1bTarSource(), [shard], out, address=cluster,
                                    on_error="fail")
    assert (report.already_stored, report.ingested) == (1, 2)
    assert sorted(SampleReader(out).sample_ids) == sorted(s.key for s in samples[:3])
    assert verify(out).ok
