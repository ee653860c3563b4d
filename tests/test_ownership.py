"""Nothing lost through paths: one lock per store whatever path spells it, no command writes its
output into a store it only reads, ``--overwrite`` never deletes its own inputs, and readers
of the wrong kind and messages with brackets fail cleanly."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import known_samples

from arraystore import SampleReader, ingest
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.converters.sa1b_bin.exporter import BinExporter
from arraystore.errors import IncompatibleStoreError, OptionError
from arraystore.loaders import (
    EmbeddingTable,
    MaskEmbeddingDataset,
    SpikeClipDataset,
    ZarrDistillDataset,
)
from arraystore.lock import StoreLock, lock_path
from arraystore.show import show
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def store(tmp_path_factory, shard) -> Path:
    out = tmp_path_factory.mktemp("owned") / "data" / "s.zarr"
    ingest(Sa1bTarSource(), [shard], out, workers=1)
    return out


def spellings(store: Path, root: Path) -> dict[str, Path]:
    """Other paths of ``store``: a link to it, a link to its folder, and ``..``."""
    (root / "alias.zarr").symlink_to(store)
    (root / "folder").symlink_to(store.parent)
    (store.parent / "sub").mkdir(exist_ok=True)
    return {"link to the store": root / "alias.zarr",
            "link to its folder": root / "folder" / store.name,
            "dot-dot": store.parent / "sub" / ".." / store.name}


def lock_from_another_process(path: Path) -> int:
    code = ("import sys\nfrom arraystore.lock import StoreLock\n"
            "try:\n    StoreLock(sys.argv[1]).acquire()\n"
            "except BlockingIOError:\n    sys.exit(3)\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], timeout=60,
                          env={"PYTHONPATH": str(REPO), "PATH": ""}).returncode


def test_every_spelling_of_a_store_shares_its_lock(store, tmp_path) -> None:
    for name, other in spellings(store, tmp_path).items():
        assert lock_path(other) == lock_path(store), name
        with StoreLock(store):
            assert lock_from_another_process(other) == 3, name  # refused: the same store
        with StoreLock(other):
            assert lock_from_another_process(store) == 3, name


def test_two_writers_through_two_spellings_race(tmp_path, shard) -> None:
    """Two ingest processes, one through a link: one writes, the other is refused naming
    it; the store holds each sample once, and verify passes."""
    real = tmp_path / "real" / "s.zarr"
    real.parent.mkdir()
    (tmp_path / "alias").symlink_to(real.parent)
    shards = [shard] + [shutil.copy(shard, tmp_path / f"copy{n}.tar") for n in range(3)]
    command = [sys.executable, "-m", "arraystore", "ingest", "sa1b", *map(str, shards),
               "--workers", "1", "--on-error", "skip", "--out"]
    runs = [subprocess.Popen([*command, str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for out in (real, tmp_path / "alias" / "s.zarr")]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    refused = [text for code, text in results if code == 1]
    assert codes in ([0, 0], [0, 1]), results
    assert all("is being written by" in text for text in refused), results
    reader = SampleReader(real)
    ids = list(reader.sample_ids)
    assert len(ids) == len(set(ids)) == 5
    verified = run_cli("verify", str(real), "--deep")
    assert verified.exit_code == 0, verified.output


@pytest.mark.parametrize("inside", ["zarr.json", "image/zarr.json", "new.png", "."])
def test_show_never_writes_into_a_store(store, inside) -> None:
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    target = store / inside
    with pytest.raises(OptionError, match="inside the store"):
        show(store, out=target)
    result = run_cli("show", str(store), "-o", str(target))
    assert result.exit_code == 1 and "inside the store" in result.output
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before


def test_show_through_a_link_into_the_store_is_refused(store, tmp_path) -> None:
    (tmp_path / "look").symlink_to(store)
    with pytest.raises(OptionError, match="inside the store"):
        show(store, out=tmp_path / "look" / "zarr.json")
    assert SampleReader(store).kind == "sa1b"


def test_export_never_writes_into_a_store(store) -> None:
    with pytest.raises(OptionError, match="inside the store"):
        BinExporter().export(store, store / "bin")
    result = run_cli("export", "bin", str(store), str(store / "image"))
    assert result.exit_code == 1 and "inside the store" in result.output
    assert not (store / "bin").exists()


def test_overwrite_refuses_to_delete_its_own_inputs(tmp_path, shard) -> None:
    out = tmp_path / "s.zarr"
    ingest(Sa1bTarSource(), [shard], out, workers=1)
    kept = shutil.copy(shard, out / "shard.tar")
    result = run_cli("ingest", "sa1b", str(kept), "--out", str(out),
                                      "--overwrite", "--workers", "1")
    assert result.exit_code == 1 and "would delete the input" in result.output, result.output
    assert Path(kept).is_file() and len(SampleReader(out)) == 5
    again = run_cli("ingest", "sa1b", str(shard), "--out", str(out),
                                     "--overwrite", "--workers", "1")
    assert again.exit_code == 0, again.output  # an input outside it: replaced as asked


@pytest.mark.parametrize("reader", [EmbeddingTable, MaskEmbeddingDataset, SpikeClipDataset])
def test_readers_of_another_kind_say_so(store, reader) -> None:
    with pytest.raises(IncompatibleStoreError, match="holds kind 'sa1b'"):
        reader(store)


def test_export_tsv_of_an_sa1b_store_says_so(store, tmp_path) -> None:
    result = run_cli("export", "tsv", str(store), str(tmp_path / "out"))
    assert result.exit_code == 1 and "holds kind 'sa1b'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_zarr_distill_dataset_on_another_kind(tmp_path) -> None:
    from arraystore import Field, Layout, Schema, Store

    Store.create(tmp_path / "t.zarr", Schema("toy", (Field("x", (), "int64", (), "block"),)),
                 Layout())
    with pytest.raises(IncompatibleStoreError, match="ZarrDistillDataset reads 'sa1b'"):
        ZarrDistillDataset(tmp_path / "t.zarr")


def test_messages_keep_their_brackets(tmp_path) -> None:
    """Rich would read ``[bold]`` or ``[x]`` in a path as markup and drop it; a read-only
    command does not claim that committed samples were kept."""
    odd = tmp_path / "[bold]odd[x].zarr"
    result = run_cli("info", str(odd))
    assert result.exit_code == 1 and "[bold]odd[x].zarr" in result.output
    assert "committed samples are kept" not in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["fix", "features", "{store}", "--model", "sam2.1_hiera_t", "--weights", "w.pt",
      "--batch-size", "0"], "--batch-size"),
    (["fix", "features", "{store}", "--model", "sam2.1_hiera_t", "--weights", "w.pt",
      "--max-samples", "-1"], "--max-samples"),
    (["ingest", "sa1b", "{shard}", "--out", "{tmp}/x.zarr", "--max-boxes", "0"],
     "--max-boxes"),
])
def test_sizes_below_their_minimum_are_refused_where_parsed(store, shard, tmp_path, args,
                                                            message) -> None:
    """(``--max-samples -1`` had meant all samples but one.)"""
    filled = [a.format(store=store, shard=shard, tmp=tmp_path) for a in args]
    result = run_cli(*filled)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.zarr").exists()
    with pytest.raises(OptionError, match="--max-boxes must be an integer >= 1"):
        Sa1bTarSource(max_boxes=0)


@pytest.mark.parametrize(("args", "code", "message"), [
    (["ingest", "sa1b", "{shard}", "--out", "/"], 1, "the root folder cannot hold a store"),
    (["ingest", "sa1b", "{shard}", "--out", ""], 1, "an empty path names no store"),
    (["ingest", "sa1b", "{shard}", "--out", "."], 1, "is not an arraystore store"),
    (["info", "foo://bucket/s.zarr"], 1, "unknown URL scheme 'foo'"),
    (["info", "{store}", "--storage-option", "key=k"], 1, "--storage-option is for "
                                                          "object-store URLs"),
    (["fix", "features", "{store}", "--model", "sam2.1_hiera_t", "--weights", "w.pt",
      "--device", "quantum:7"], 2, "--device 'quantum:7' is not a torch device"),
    (["ingest", "sa1b", "{shard}", "--out", "{tmp}/x.zarr", "--teacher", "sam2.1_hiera_t",
      "--weights", "w.pt", "--device", "cuda:7"], 2, "--device 'cuda:7' names a GPU"),
    (["fix", "edges", "{store}", "--annotations", "{shard}", "--kernel-size", "4"], 2,
     "--kernel-size 4 must be an odd positive integer"),
    (["ingest", "sa1b", "{shard}", "--out", "{tmp}/x.zarr", "--shard-size", "100000000"], 2,
     "100000000 is not in the range 1<=x<=4096"),
    (["ingest", "sa1b", "{shard}", "--out", "{tmp}/x.zarr", "--scheduler", "dask",
      "--dask-address", "notaurl"], 1, "notaurl"),
])
def test_bad_options_are_one_line_errors(store, shard, tmp_path, monkeypatch, args, code,
                                         message) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "occupied.txt").write_text("not a store")  # so that "." is not empty
    filled = [a.format(store=store, shard=shard, tmp=tmp_path) for a in args]
    result = run_cli(*filled)
    assert result.exit_code == code and message in result.output, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "x.zarr").exists() and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(("options", "unset"), [
    ({"endpoint_url": "http://127.0.0.1:9"}, ()),  # no server
    ({"client_kwargs": {"region_name": "eu-north-1"}},  # no credentials
     ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE")),
], ids=["no server", "no credentials"])
def test_an_unreachable_object_store_is_a_typed_error(s3_endpoint, shard, monkeypatch, options,
                                                      unset) -> None:
    """A StoreAccessError naming the URL and what to check, for a read and for an ingest
    (whose lock is its first request). Options unlike any other test's: fsspec caches a
    client per set of options, and one made without credentials must serve no other test."""
    from arraystore.errors import StoreAccessError

    options = {**options, "config_kwargs": {"retries": {"max_attempts": 1}}}
    for key in unset:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    url = "s3://nowhere-bucket/s.zarr"
    with pytest.raises(StoreAccessError, match=r"s3://nowhere-bucket/s.zarr: the object store "
                                               r"could not be reached .*check the credentials"):
        SampleReader(url, storage_options=options)
    flags = [f"--storage-option={k}={v}" for k, v in options.items() if isinstance(v, str)]
    if flags:
        result = run_cli("ingest", "sa1b", str(shard), "--out", url, *flags)
        assert result.exit_code == 1 and "could not be reached" in result.output, result.output
        assert "committed samples are kept" not in result.output


def test_a_garbage_lock_file_is_a_holder_that_says_nothing(tmp_path, shard) -> None:
    out = tmp_path / "s.zarr"
    lock_path(out).write_bytes(b"[1, 2, 3]\xff garbage")
    ingest(Sa1bTarSource(), [shard], out, workers=1)  # no live holder: taken over
    assert len(SampleReader(out)) == len(known_samples())


def test_malformed_schema_or_layout_metadata_is_refused(store, tmp_path) -> None:
    import json

    for part, value in [("layout", {"name": "sharded", "shard_size": "16"}),
                        ("layout", {"bogus": 1}), ("schema", {"kind": "sa1b", "fields": 5}),
                        ("layout", {"name": "sharded", "shard_size": 10**8})]:
        copy = tmp_path / f"{part}{len(list(tmp_path.iterdir()))}.zarr"
        shutil.copytree(store, copy)
        document = json.loads((copy / "zarr.json").read_text())
        document["attributes"]["arraystore"][part] = value
        (copy / "zarr.json").write_text(json.dumps(document))
        result = run_cli("info", str(copy))
        assert result.exit_code == 1, result.output
        assert "the schema or layout in the store's zarr.json is malformed" in result.output
        assert "Traceback" not in result.output
