"""Stores in an S3-compatible object store: moto's server on loopback, a real bucket, the standard
AWS variables. Every CLI command and both loaders give what the same ingest gives on a local
disk; the writer lock is an object with a heartbeat, broken only when stale and asked; crafted
stores are refused as they are locally."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import xarray as xr
from conftest import new_bucket, s3_copy
from crc32c import crc32c

from arraystore import SampleReader, Store, open_xarray
from arraystore.errors import StoreFormatError
from arraystore.loaders import ZarrDistillDataset
from arraystore.location import Location, parse_storage_options
from arraystore.lock import StoreLock, StoreLockedError
from arraystore.verify import verify
from tests.conftest import assert_same_values, run_cli

LAYOUT_OPTIONS = {"raw": ["--layout", "raw"],
                  "sharded": ["--layout", "sharded", "--shard-size", "2"]}


def assert_items_equal(a, b, where: str) -> None:
    """Every item of ``a`` equals the same item of ``b`` (Datasets or readers)."""
    assert len(a) == len(b), where
    for index in range(len(a)):
        assert_same_values(a[index], b[index], f"{where}[{index}]")


def ingest_to(shard: Path, layout: str, *outs: Path | str) -> None:
    """The same shard ingested by the CLI to each of ``outs`` (folders, bucket URLs)."""
    for out in outs:
        run_cli("ingest", "sa1b", shard, "--out", out, "--workers", "1",
                *LAYOUT_OPTIONS[layout], check=True)


@pytest.fixture(params=list(LAYOUT_OPTIONS))
def twins(request, tmp_path, shard, bucket) -> tuple[Path, str]:
    """The same shard ingested to a local folder and to the bucket, for a test that changes
    them."""
    local, url = tmp_path / "s.zarr", f"{bucket}/sa1b.zarr"
    ingest_to(shard, request.param, local, url)
    return local, url


@pytest.fixture(scope="module", params=list(LAYOUT_OPTIONS))
def read_only_twins(request, tmp_path_factory, shard, s3_endpoint) -> tuple[Path, str]:
    """:func:`twins` shared by the tests of this module that only read them."""
    local, url = tmp_path_factory.mktemp("twins") / "s.zarr", f"{new_bucket()}/sa1b.zarr"
    ingest_to(shard, request.param, local, url)
    return local, url


def test_every_command_and_loader_on_s3_equals_local(twins, tmp_path, shard) -> None:
    local, url = twins
    ours, theirs = (json.loads(run_cli("info", where, "--json", check=True).output)
                    for where in (url, local))
    assert ours["committed"] == theirs["committed"] == 5
    assert ours["files"] == theirs["files"] and ours["layout"] == theirs["layout"]
    assert [a["shape"] for a in ours["arrays"]] == [a["shape"] for a in theirs["arrays"]]
    assert "ok: 5 committed samples" in run_cli("verify", url, "--deep", check=True).output
    for backend in ("auto", "direct", "tensorstore", "zarr"):
        assert_items_equal(ZarrDistillDataset(local), ZarrDistillDataset(url, backend=backend),
                           f"ZarrDistillDataset {backend}")
    assert_items_equal(SampleReader(local), SampleReader(url), "SampleReader")
    xr.testing.assert_equal(open_xarray(url).load(), open_xarray(local).load())  # attrs: times
    run_cli("show", url, "-o", tmp_path / "s3.png", check=True)
    assert (tmp_path / "s3.png").stat().st_size > 0
    for where in (url, local):  # an in-place fix: read, rewrite whole files, set flags
        assert "recomputed" in run_cli("fix", "edges", where, "--annotations", shard, "--force",
                                       check=True).output
    np.testing.assert_array_equal(SampleReader(url).column("edge_flag"), 1)
    (tmp_path / "mix.toml").write_text(
        f'[[source]]\npath = "{url}"\ndataset_type = "sa1b"\nrepeats = 2\n')
    assert "epoch with repeats: 10 samples from 1 sources" in run_cli(
        "mix", "describe", tmp_path / "mix.toml", check=True).output
    run_cli("export", "bin", url, tmp_path / "from_s3", check=True)
    run_cli("export", "bin", local, tmp_path / "from_local", check=True)
    for exported in sorted((tmp_path / "from_local").iterdir()):
        assert (tmp_path / "from_s3" / exported.name).read_bytes() == exported.read_bytes()


def test_opening_fetches_every_array_metadata_at_once(read_only_twins, monkeypatch) -> None:
    """Opening checks each array's metadata: ``committed``'s, then the others' in one batch
    of concurrent GETs (a writer grows ``committed`` after them), no listing (which cost a
    request per array, one after another); the direct reader's fields then open from those
    bytes, without a GET each."""
    local, url = read_only_twins
    location = Location.of(url)
    batches: list[list[str]] = []
    real = location.read_many

    def recording(keys):
        batches.append(list(keys))
        return real(keys)

    monkeypatch.setattr(location, "read_many", recording)
    store = Store.open(location)
    arrays = [*store.schema.names, "sample"]
    assert batches == [["committed/zarr.json"], [f"{name}/zarr.json" for name in arrays]]
    assert store.array_metadata().keys() == Store.open(local).array_metadata().keys()
    reader = SampleReader(location, backend="direct")
    fetched: list[str] = []
    real_bytes = location.read_bytes
    monkeypatch.setattr(location, "read_bytes", lambda key: fetched.append(key) or
                        real_bytes(key))
    assert_items_equal(SampleReader(local), reader, "direct reads after one open")
    assert not [key for key in fetched if key.endswith("zarr.json")]  # fields reuse the open's


def test_plain_xarray_reads_the_s3_store_with_storage_options(read_only_twins,
                                                              s3_endpoint) -> None:
    local, url = read_only_twins
    options = {"endpoint_url": s3_endpoint, "key": "arraystore-test",
               "secret": "arraystore-test-secret"}
    plain = xr.open_zarr(url, storage_options=options, consolidated=False, zarr_format=3)
    np.testing.assert_array_equal(plain["image"].values,
                                  xr.open_zarr(local, consolidated=False)["image"].values)


def test_plain_xarray_opens_the_s3_store_from_one_metadata_request(read_only_twins,
                                                                     s3_endpoint,
                                                                     monkeypatch) -> None:
    """An ingest straight into the bucket leaves consolidated metadata: ``xarray.open_zarr``
    with its defaults opens without a warning and reads the root ``zarr.json`` only -- no
    array's own metadata -- before the data; ``committed`` marks the complete samples."""
    import warnings

    import s3fs

    _, url = read_only_twins
    fetched: list[str] = []
    real = s3fs.S3FileSystem._cat_file

    async def recording(self, path, *args, **kwargs):
        fetched.append(path)
        return await real(self, path, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", recording)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = xr.open_zarr(url, storage_options={"endpoint_url": s3_endpoint})
    metadata = [path for path in fetched if path.endswith("zarr.json")]
    assert metadata == [f"{url.removeprefix('s3://')}/zarr.json"], metadata
    assert plain["committed"].values.tolist() == [True] * 5 and "committed" in plain.coords


def test_storage_options_reach_the_client(read_only_twins, s3_endpoint) -> None:
    _, url = read_only_twins
    out = run_cli("info", url, "--storage-option", f"endpoint_url={s3_endpoint}",
                 "--storage-option", "client_kwargs.region_name=us-east-1", check=True).output
    assert "5 committed of 5" in out
    assert parse_storage_options(["a.b=1", "c=true", "d=x"]) == {"a": {"b": 1}, "c": True,
                                                                  "d": "x"}
    result = run_cli("info", url, "--storage-option", "nonsense")
    assert result.exit_code == 2 and "expected KEY=VALUE" in result.output


def test_direct_reads_are_ranged_gets_with_cached_shard_indexes(tmp_path, shard, bucket,
                                                                monkeypatch) -> None:
    url = f"{bucket}/s.zarr"
    run_cli("ingest", "sa1b", shard, "--out", url, "--workers", "1", *LAYOUT_OPTIONS["sharded"],
            check=True)
    reader = SampleReader(url, backend="direct", fields=("image", "masks"))
    location = reader.location
    calls: list[list[tuple[int, int | None]]] = []
    real = location.read_ranges

    def counting(keys, starts, stops, **options):
        calls.append(list(zip(starts, stops, strict=True)))
        return real(keys, starts, stops, **options)

    monkeypatch.setattr(location, "read_ranges", counting)
    reader.read(0)
    assert len(calls) == 2  # the two shard indexes at once (suffix ranges), then both chunks
    assert all(start < 0 and stop is None for start, stop in calls[0])
    reader.read(1)  # same shard: indexes cached, one round of two ranged GETs
    assert len(calls) == 3 and len(calls[2]) == 2
    crc = 4 if reader.layout.checksum else 0  # new stores carry a crc32c per chunk
    assert all(stop - start == reader.schema[n].nbytes + crc
               for (start, stop), n in zip(calls[2], ("image", "masks"), strict=True))


def put_lock(url: str, **record) -> None:
    fs, root = fsspec.url_to_fs(url)
    fs.pipe_file(f"{root}.lock", json.dumps(record).encode())


def ago(seconds: float) -> str:
    return (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)).isoformat()


def test_lock_refuses_a_second_writer_process(shard, bucket) -> None:
    url = f"{bucket}/s.zarr"
    with StoreLock(url):
        run = subprocess.run([sys.executable, "-m", "arraystore", "ingest", "sa1b", str(shard),
                              "--out", url, "--workers", "1"], capture_output=True, text=True)
    assert run.returncode == 1
    assert f"is being written by pid {__import__('os').getpid()}" in run.stderr
    assert not fsspec.url_to_fs(url)[0].exists(fsspec.url_to_fs(url)[1] + ".lock")


def test_stale_lock_is_taken_over_only_with_break_lock(shard, bucket) -> None:
    url = f"{bucket}/s.zarr"
    put_lock(url, pid=4242, host="gone", command="arraystore ingest", since=ago(3600),
             heartbeat=ago(3600), token="theirs")
    refused = run_cli("ingest", "sa1b", str(shard), "--out", url)
    assert refused.exit_code == 1
    assert "pid 4242 on gone" in refused.output and "--break-lock" in refused.output
    run_cli("ingest", "sa1b", shard, "--out", url, "--workers", "1", "--break-lock", check=True)
    assert Store.open(url).num_committed() == 5


def test_live_lock_is_never_broken(shard, bucket) -> None:
    url = f"{bucket}/s.zarr"
    put_lock(url, pid=4242, host="busy", heartbeat=ago(1), token="theirs")
    refused = run_cli("ingest", "sa1b", str(shard), "--out", url,
                                       "--break-lock")
    assert refused.exit_code == 1 and "last heartbeat 1 s ago" in refused.output


def test_heartbeat_runs_and_a_broken_lock_stops_its_writer(bucket) -> None:
    url = f"{bucket}/s.zarr"
    fs, root = fsspec.url_to_fs(url)
    lock = StoreLock(url, stale_after_s=2.0)  # a beat every 0.2 s
    lock.acquire()
    first = json.loads(fs.cat_file(f"{root}.lock"))["heartbeat"]
    time.sleep(1.5)
    assert json.loads(fs.cat_file(f"{root}.lock"))["heartbeat"] > first
    lock.ensure_held()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # broken and taken by another writer, which heartbeats
        put_lock(url, pid=4242, host="other", heartbeat=ago(0), token="theirs")
        time.sleep(0.5)
        try:
            lock.ensure_held()
        except StoreLockedError as lost:
            assert "lock was broken and taken by pid 4242" in str(lost)
            break
    else:
        pytest.fail("the writer never noticed that its lock was taken")
    lock.release()
    assert json.loads(fs.cat_file(f"{root}.lock"))["token"] == "theirs"  # theirs is left alone


def edit(url: str, key: str, change) -> None:
    fs, root = fsspec.url_to_fs(url)
    document = json.loads(fs.cat_file(f"{root}/{key}"))
    change(document)
    fs.pipe_file(f"{root}/{key}", json.dumps(document).encode())


@pytest.mark.parametrize("layout", list(LAYOUT_OPTIONS))
def test_crafted_stores_on_s3_are_refused(layout, shard, bucket) -> None:
    url = f"{bucket}/sa1b.zarr"
    ingest_to(shard, layout, url)

    def absurd(doc):
        doc["attributes"]["arraystore"]["schema"]["fields"]["image"]["shape"] = [
            1_000_000, 1_000_000, 3]
    edit(url, "zarr.json", absurd)
    with pytest.raises(StoreFormatError, match="array 'image' disagrees"):
        ZarrDistillDataset(url)
    result = run_cli("verify", url)
    assert result.exit_code == 1 and "shape" in result.output

    def climbing(doc):
        fields = doc["attributes"]["arraystore"]["schema"]["fields"]
        fields["../escape"] = fields.pop("image")
    edit(url, "zarr.json", climbing)
    with pytest.raises(StoreFormatError, match=r"malformed .*not a valid identifier"):
        Store.open(url)


def test_shard_index_asking_for_a_huge_chunk_is_refused_on_s3(tmp_path, shard, bucket) -> None:
    url = f"{bucket}/s.zarr"
    run_cli("ingest", "sa1b", shard, "--out", url, "--workers", "1", *LAYOUT_OPTIONS["sharded"],
            check=True)
    fs, root = fsspec.url_to_fs(url)
    key = f"{root}/image/c/0/0/0/0"
    data = bytearray(fs.cat_file(key))  # ends with the index (2 x 2 uint64) and its crc32c
    index = np.frombuffer(data, "<u8", 4, len(data) - 36).copy().reshape(2, 2)
    index[0, 1] = 2**40  # nbytes of sample 0
    data[-36:] = index.tobytes() + crc32c(index.tobytes()).to_bytes(4, "little")
    fs.pipe_file(key, bytes(data))
    reader = SampleReader(url, backend="direct", fields=("image",))
    with pytest.raises(StoreFormatError, match="inner chunk of 1099511627776 bytes, expected"):
        reader.read(0)


def test_a_paused_writer_whose_lock_is_broken_changes_nothing_committed(bucket, tmp_path) -> None:
    """Fencing, with real processes: writer A is frozen (SIGSTOP) mid-ingest until its lock
    goes stale; writer B breaks it and ingests the same input; A is resumed. A stops at its
    next check of the lock; B's samples are all there, each equal to a local ingest of the
    same input, under a unique id, and ``verify`` finds nothing wrong."""
    import os
    import signal

    from conftest import photo, rectangle

    from arraystore.testing.sa1b_shards import ShardSample, write_shard

    rng = np.random.default_rng(3)
    shard = write_shard(tmp_path / "many.tar", [
        ShardSample(f"s{i:02d}", photo(rng, 600, 800), [rectangle((600, 800), 10, 10, 300, 400)])
        for i in range(24)])
    local = tmp_path / "local.zarr"
    run_cli("ingest", "sa1b", shard, "--out", local, "--workers", "1", check=True)
    url = f"{bucket}/s.zarr"
    env = {**os.environ, "ARRAYSTORE_LOCK_STALE_S": "2"}
    command = [sys.executable, "-m", "arraystore", "ingest", "sa1b", str(shard), "--out", url,
               "--workers", "1", "--layout", "sharded", "--shard-size", "2"]
    writer_a = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # A has committed some samples, not all
        try:
            if Store.open(url).num_committed() >= 4:
                break
        except Exception:  # not created yet
            pass
        time.sleep(0.05)
    os.kill(writer_a.pid, signal.SIGSTOP)
    try:
        paused_at = Store.open(url).num_committed()
        assert 4 <= paused_at < 24, "A must be paused mid-ingest"
        time.sleep(3)  # A's heartbeat is silent: its lock goes stale
        writer_b = subprocess.run([*command, "--break-lock"], env=env, capture_output=True,
                                  text=True, timeout=300)
        assert writer_b.returncode == 0, writer_b.stderr
    finally:
        os.kill(writer_a.pid, signal.SIGCONT)
    _, a_errors = writer_a.communicate(timeout=300)
    assert writer_a.returncode != 0 and "lock was broken" in a_errors, a_errors
    reader, expected = SampleReader(url), SampleReader(local)
    ids = list(reader.sample_ids)
    assert sorted(ids) == sorted(expected.sample_ids) and len(set(ids)) == 24
    by_id = {sample_id: i for i, sample_id in enumerate(expected.sample_ids)}
    for index, sample_id in enumerate(ids):
        got, want = reader.read(index), expected.read(by_id[sample_id])
        for key, value in want.items():
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value),
                                          err_msg=f"{sample_id}: {key}")
    report = verify(url)
    assert report.ok, report.problems


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_taken_over_store_fences_the_metadata_and_late_commits_of_its_former_writer(
        where, tmp_path, shard, request) -> None:
    """The window the lock check leaves: a writer frozen after its last check wakes after
    another took the store over. Its metadata write is refused (the store records the new
    holder's token, checked in the same conditional rewrite), and the slots it marks
    committed then were revoked by the taking over: no reader counts them."""
    local = tmp_path / "s.zarr"
    ingest_to(shard, "raw", local)
    target = local if where == "local" else s3_copy(
        local, f"{request.getfixturevalue('bucket')}/s.zarr")
    committed = Store.open(target).num_committed()
    former = Store.open(target, "r+")
    former.claim("former-token")
    arrays = former.grow([*former.schema.names, "sample", "committed"], committed + 4)
    holder = Store.open(target, "r+")
    holder.claim("holder-token", revoke=[(committed, committed + 4)])
    with pytest.raises(StoreLockedError, match="lock was broken and another writer took"):
        former.save_meta()
    arrays["committed"][committed:committed + 4] = True  # the former writer's late commit
    assert Store.open(target).num_committed() == committed
    assert len(SampleReader(target)) == committed
    assert len(open_xarray(target).sample) == committed
    assert int(open_xarray(target, committed_only=False)["committed"].sum()) == committed
    report = verify(target)
    assert report.ok, report.problems
    assert any("after its lock was broken" in note for note in report.notes), report.notes
    holder.save_meta()
    assert Store.open(target).revoked() == [(committed, committed + 4)]
    assert Store.open(target).meta["writer"] == "holder-token"


def test_a_conditional_rewrite_that_lost_a_race_is_tried_again(bucket) -> None:
    """``Location.update`` on S3: another writer rewrites the object between our GET and our
    conditional PUT; the PUT gets 412 (recognised by S3's error code, not its text) and the
    change is made again on the other writer's bytes, never over them."""
    import boto3

    location = Location.of(f"{bucket}/s.zarr")
    key = location.key_path("k")
    location.fs.pipe_file(key, b"0")
    other_writer = boto3.client("s3")
    seen = []

    def change(current: bytes) -> bytes:
        seen.append(current)
        if len(seen) == 1:  # another writer, in between
            other_writer.put_object(Bucket=bucket.removeprefix("s3://"), Key="s.zarr/k",
                                    Body=b"other")
        return current + b"+"

    location.update("k", change)
    assert seen == [b"0", b"other"]
    location.fs.invalidate_cache()
    assert location.fs.cat_file(key) == b"other+"
