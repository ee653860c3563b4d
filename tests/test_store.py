"""Store creation modes, append checks, resume, and the writer's validation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from arraystore import Field, Layout, SampleReader, Schema, Store, StoreWriter, ingest
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.errors import (
    DuplicateSampleError,
    IncompatibleStoreError,
    NotAStoreError,
    SampleValidationError,
    SchemaError,
    StoreExistsError,
)
from arraystore.location import LocalLocation
from arraystore.sample_ids import SampleIds
from arraystore.store import open_for_writing

TOY = Schema("toy", (Field("x", (2, 3), "float32", ("a2", "b3")),
                     Field("flag", (), "uint8", (), "block"),
                     Field("name", (), "str", (), "block")))


def toy_sample(i: int) -> dict:
    return {"x": np.full((2, 3), i, np.float32), "flag": np.uint8(i % 2), "name": f"n{i}"}


def test_schema_round_trips_and_validates() -> None:
    assert Schema.from_json(TOY.to_json()) == TOY
    with pytest.raises(SchemaError, match="reserved"):
        Schema("k", (Field("committed", (), "uint8", ()),))
    with pytest.raises(SchemaError, match="dimension names"):
        Field("x", (2, 3), "float32", ("a",))
    with pytest.raises(SchemaError, match="size"):
        Schema("k", (Field("a", (2,), "uint8", ("n",)), Field("b", (3,), "uint8", ("n",))))
    with pytest.raises(SchemaError, match="not supported"):
        Field("c", (2,), "complex64", ("n",))


def test_writer_commits_and_validates(tmp_path) -> None:
    store = Store.create(tmp_path / "t.zarr", TOY, Layout("sharded", shard_size=4))
    with StoreWriter(store) as writer:
        for i in range(6):
            writer.append(f"s{i}", toy_sample(i))
        with pytest.raises(DuplicateSampleError):
            writer.append("s1", toy_sample(1))
        with pytest.raises(SampleValidationError, match=r"'x'.*float64"):
            writer.append("bad", {**toy_sample(0), "x": np.zeros((2, 3))})
        for bad_id in ("", "a\0b", 7):
            with pytest.raises(SampleValidationError, match="sample id"):
                writer.append(bad_id, toy_sample(0))
        with pytest.raises(SampleValidationError, match="missing"):
            writer.append("bad", {"x": np.zeros((2, 3), np.float32)})
    reader = SampleReader(tmp_path / "t.zarr")
    assert len(reader) == 6 and list(reader.sample_ids) == [f"s{i}" for i in range(6)]
    assert reader.read(5)["name"] == "n5" and reader.read(5)["x"][0, 0] == 5


def test_a_store_growing_while_it_is_opened_is_not_taken_for_damaged(tmp_path,
                                                                      monkeypatch) -> None:
    """A writer grows every array (``committed`` last) between an opening reader's reads of
    the arrays' metadata: the reader reads ``committed`` first, so it never sees it longer
    than an array it covers, and opens the live store (read in the other order, it refused
    it as damaged: a failure seen under a running ingest)."""
    path = tmp_path / "live.zarr"
    with StoreWriter(Store.create(path, TOY, Layout("sharded", shard_size=4))) as writer:
        for i in range(3):
            writer.append(f"s{i}", toy_sample(i))
    reads: list[list[str]] = []  # the reader's, in order
    read_many = LocalLocation.read_many
    writing = [False]

    def a_writer_grows_it_after_the_first(location, keys):
        got = read_many(location, keys)
        if not writing[0]:
            reads.append(list(keys))
            if len(reads) == 1:
                writing[0] = True
                grown = Store.open(path, mode="r+")
                grown.grow((*TOY.names, "sample", "committed"), len(grown) + 16)
                writing[0] = False
        return got

    rewrites: list[list[str]] = []  # the writer's metadata rewrites, in order
    update_each = LocalLocation.update_each

    def recorded(location, keys, change):
        rewrites.append(list(keys))
        return update_each(location, keys, change)

    monkeypatch.setattr(LocalLocation, "read_many", a_writer_grows_it_after_the_first)
    monkeypatch.setattr(LocalLocation, "update_each", recorded)
    reader = SampleReader(path)
    assert reads[0] == ["committed/zarr.json"] and len(reads[1]) == len(TOY.names) + 1
    assert rewrites[-1] == ["committed/zarr.json"] and len(rewrites[-2]) == len(TOY.names) + 1
    assert len(reader) == 3 and reader.read(2)["name"] == "n2"


def test_sample_ids_are_packed_and_unicode_safe(tmp_path) -> None:
    ids = ["s0", "bild_ä", "画像_2", "a much longer id than the others"]
    store = Store.create(tmp_path / "u.zarr", TOY, Layout("raw"))
    with StoreWriter(store) as writer:
        for i, sample_id in enumerate(ids):
            writer.append(sample_id, toy_sample(i))
    reader = pickle.loads(pickle.dumps(SampleReader(tmp_path / "u.zarr")))
    assert isinstance(reader.sample_ids, SampleIds) and list(reader.sample_ids) == ids
    assert reader.sample_ids[-1] == ids[-1] and reader.sample_ids[1:3] == ids[1:3]
    assert reader.sample_ids._encoded.dtype.kind == "S"  # one bytes array, no str objects
    with pytest.raises(IndexError):
        reader.sample_ids[len(ids)]


def test_modes(tmp_path, shard) -> None:
    out = tmp_path / "s.zarr"
    ingest(Sa1bTarSource(), [shard], out, workers=1)
    with pytest.raises(StoreExistsError) as caught:
        ingest(Sa1bTarSource(), [shard], out, mode="create", workers=1)
    assert isinstance(caught.value, FileExistsError)
    with pytest.raises(IncompatibleStoreError, match="max-boxes"):
        ingest(Sa1bTarSource(max_boxes=3), [shard], out, workers=1)
    with pytest.raises(IncompatibleStoreError, match="layout"):
        ingest(Sa1bTarSource(), [shard], out, layout=Layout("raw"), workers=1)
    with pytest.raises(IncompatibleStoreError, match="kind"):
        open_for_writing(out, TOY, None)
    report = ingest(Sa1bTarSource(), [shard], out, mode="overwrite", workers=1)
    assert report.ingested == 5


def test_overwrite_never_deletes_what_is_not_a_store(tmp_path, shard) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(NotAStoreError):
        ingest(Sa1bTarSource(), [shard], precious, mode="overwrite", workers=1)
    with pytest.raises(NotAStoreError):
        ingest(Sa1bTarSource(), [shard], precious, workers=1)
    assert (precious / "thesis.tex").read_text() == "years of work"
    (tmp_path / "made_by_hand").mkdir()  # an empty folder is a fine place for a new store
    assert ingest(Sa1bTarSource(), [shard], tmp_path / "made_by_hand", workers=1,
                  mode="create").ingested == 5


def test_rerun_skips_ingested_inputs_and_resume_fills_the_rest(tmp_path, shard) -> None:
    full = tmp_path / "full.zarr"
    ingest(Sa1bTarSource(), [shard], full, workers=1)
    again = ingest(Sa1bTarSource(), [shard], full, workers=1)
    assert again.ingested == 0 and again.units_already_done == [str(shard)]

    # a run interrupted after 3 samples: their commit done, the input not recorded as finished
    partial = tmp_path / "partial.zarr"
    ingest(Sa1bTarSource(), [shard], partial, workers=1)
    store = Store.open(partial, mode="r+")
    store.array("committed")[3:] = False
    store.provenance["sources"] = []
    store.save_meta()
    resumed = ingest(Sa1bTarSource(), [shard], partial, workers=2)
    assert (resumed.already_stored, resumed.ingested) == (3, 2)
    a, b = SampleReader(full), SampleReader(partial)
    assert list(a.sample_ids) == list(b.sample_ids)
    for i in range(len(a)):
        for name, value in a.read(i).items():
            np.testing.assert_array_equal(b.read(i)[name], value)
    assert len(Store.open(partial).provenance["sources"]) == 1


def test_appending_a_second_shard(tmp_path, samples) -> None:
    from arraystore.testing.sa1b_shards import write_shard

    first = write_shard(tmp_path / "a.tar", samples[:2])
    second = write_shard(tmp_path / "b.tar", samples[2:])
    out = tmp_path / "s.zarr"
    ingest(Sa1bTarSource(), [first], out, workers=1, layout=Layout("sharded", shard_size=4))
    ingest(Sa1bTarSource(), [second], out, workers=1)
    assert list(SampleReader(out).sample_ids) == [s.key for s in samples]
    sources = Store.open(out).provenance["sources"]
    assert [s["path"] for s in sources] == [str(first.resolve()), str(second.resolve())]
    assert all(len(s["sha256"]) == 64 and s["size"] > 0 for s in sources)
