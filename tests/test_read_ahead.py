"""Read-ahead from an object store (``arraystore.loaders.read_ahead``): a batch that names the
batch read next gets that batch fetched on the reader's own thread, so reading it then makes no
request; values equal the local store's through a DataLoader and a mixture; a wrong guess costs
only bytes; a read-ahead fetch that fails is raised when its batch is read, naming the object."""

from __future__ import annotations

import pickle
import shutil
import uuid

import numpy as np
import pytest
from conftest import UNCOMPRESSED, _layout_store, assert_same_values, copy_store, served, url
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from arraystore import Field, Layout, Schema, Store, StoreWriter, ingest
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.errors import MissingChunkError
from arraystore.loaders import (
    LengthGroupedSampler,
    MixSource,
    Mixture,
    ReadAhead,
    ZarrDistillDataset,
    collate_distill,
)
from arraystore.loaders.read_ahead import BatchWithNext
from arraystore.reader import CACHED_BLOCKS, SampleReader


def remote(region, name: str) -> ZarrDistillDataset:
    return ZarrDistillDataset(url(name), storage_options=region.storage_options())


def settled(reader: SampleReader) -> None:
    """Wait for the reader's read-ahead fetch in this process, if one runs."""
    later = reader._open.get().later
    if later is not None:
        later[1].exception(timeout=60)


def test_each_batch_names_the_one_its_worker_reads_next() -> None:
    batches = [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    assert [b.then for b in ReadAhead(batches, workers=2)] == [[4, 5], [6, 7], [8], [], []]
    assert [b.then for b in ReadAhead(batches, workers=0)] == [[2, 3], [4, 5], [6, 7], [8], []]
    assert [list(b) for b in ReadAhead(batches, workers=3)] == batches
    assert len(ReadAhead(batches, workers=2)) == 5
    copy = pickle.loads(pickle.dumps(BatchWithNext([1, 2], [3])))
    assert list(copy) == [1, 2] and copy.then == [3]
    with pytest.raises(ValueError, match="num_workers"):
        ReadAhead(batches, workers=-1)


def test_set_epoch_reaches_the_sampler_inside() -> None:
    sampler = LengthGroupedSampler(range(12), batch_size=2, seed=1, lengths=np.ones(12, int))
    ahead = ReadAhead(BatchSampler(sampler, 2, drop_last=False), workers=2)
    first = [list(b) for b in ahead]
    ahead.set_epoch(1)
    assert sampler.epoch == 1 and [list(b) for b in ahead] != first


@pytest.mark.parametrize("layout", UNCOMPRESSED)
def test_the_next_batch_is_fetched_while_this_one_is_read(region, layout, tmp_path_factory,
                                                          shard) -> None:
    dataset = remote(region, layout)
    local = ZarrDistillDataset(_layout_store(layout, tmp_path_factory, shard))
    dataset.__getitems__(BatchWithNext([0, 3], [4, 1]))
    settled(dataset.reader)
    read = []
    assert served(region, lambda: read.append(dataset.__getitems__([4, 1])))["gets"] == 0
    assert_same_values(collate_distill(read[0]), collate_distill(local.__getitems__([4, 1])))


@pytest.mark.parametrize("layout", UNCOMPRESSED)
def test_a_batch_fetches_the_blocks_it_needs_with_it(region, layout, tmp_path_factory,
                                                     shard) -> None:
    """The numeric block-chunked fields (boxes, flags) a batch needs and the process lacks
    come with the batch's fetch, in one batch of requests (read one by one, each field's
    first read was a round trip); their values equal the local store's. (Strings in blocks
    are read through zarr-python.)"""
    reader = SampleReader(url(layout), storage_options=region.storage_options(), cache_dir="")
    local = SampleReader(_layout_store(layout, tmp_path_factory, shard))
    blocks = [field.name for field in reader.schema.fields
              if field.chunking == "block" and not field.is_string]
    assert len(blocks) > 1
    fetched = served(region, lambda: reader.fetch_ahead([0, 3], reader.fields))
    assert fetched["gets"] >= len(blocks)
    read: list[dict] = []
    assert served(region, lambda: read.extend(reader.read(i, blocks) for i in (0, 3)))[
        "gets"] == 0
    for got, index in zip(read, (0, 3), strict=True):
        assert_same_values(got, local.read(index, blocks))


def test_blocks_of_one_sample_are_read_as_they_come(region, tmp_path, shard) -> None:
    """A layout whose blocks hold one sample each (``block_size=1``) stores block-chunked
    fields one sample a chunk: a batch reads them as such, with the local values."""
    layout = Layout("sharded", shard_size=4, block_size=1, checksum=False)
    ingest(Sa1bTarSource(max_boxes=2), [shard], tmp_path / "one.zarr", layout=layout, workers=1)
    shutil.copytree(tmp_path / "one.zarr", region.root / "stores" / "blocks-of-one.zarr")
    dataset = remote(region, "blocks-of-one")
    dataset.__getitems__(BatchWithNext([0, 3], [4, 1]))
    settled(dataset.reader)
    local = ZarrDistillDataset(tmp_path / "one.zarr")
    assert_same_values(collate_distill(dataset.__getitems__([4, 1])),
                       collate_distill(local.__getitems__([4, 1])))


def test_a_batch_over_more_blocks_than_are_kept_reads_them_once(folder_s3, tmp_path) -> None:
    """A batch whose samples lie in more blocks of a field than a process keeps
    (``CACHED_BLOCKS``) keeps all it needs, held before or fetched, until it is read: none
    fetched again."""
    schema = Schema("toy", (Field("x", (3,), "float32", ("n3",)),
                            Field("flag", (), "uint8", (), "block")))
    layout = Layout("sharded", shard_size=4, block_size=2, checksum=False)
    count = 2 * (CACHED_BLOCKS + 2)
    bucket = folder_s3.root / f"blocks-{uuid.uuid4().hex[:8]}"
    with StoreWriter(Store.create(bucket / "toy.zarr", schema, layout)) as writer:
        for i in range(count):
            writer.append(f"s{i}", {"x": np.full(3, i, np.float32), "flag": np.uint8(i % 7)})
    reader = SampleReader(f"s3://{bucket.name}/toy.zarr",
                          storage_options=folder_s3.storage_options(direct=True), cache_dir="")
    everything = list(range(count))
    assert int(reader.read(count - 1, ["flag"])["flag"]) == (count - 1) % 7  # one block held
    assert served(folder_s3, lambda: reader.fetch_ahead(everything, ["flag"]))["gets"] \
        == count // 2 - 1
    flags: list[int] = []
    assert served(folder_s3, lambda: flags.extend(
        int(reader.read(i, ["flag"])["flag"]) for i in everything))["gets"] == 0
    assert flags == [i % 7 for i in everything]


def test_a_wrong_guess_costs_bytes_not_values(region, tmp_path_factory, shard) -> None:
    dataset = remote(region, "sharded")
    local = ZarrDistillDataset(_layout_store("sharded", tmp_path_factory, shard))
    dataset.__getitems__(BatchWithNext([0], [1, 2]))
    got = dataset.__getitems__(BatchWithNext([4, 3], [0]))
    assert_same_values(collate_distill(got), collate_distill(local.__getitems__([4, 3])))


def test_a_dataloader_with_read_ahead_gives_the_local_batches(region, tmp_path_factory,
                                                              shard) -> None:
    batches = list(BatchSampler(SequentialSampler(range(5)), 2, drop_last=False))
    local = ZarrDistillDataset(_layout_store("sharded", tmp_path_factory, shard))
    expected = list(DataLoader(local, batch_sampler=batches, collate_fn=collate_distill))
    loader = DataLoader(remote(region, "sharded"), batch_sampler=ReadAhead(batches, workers=2),
                        num_workers=2, collate_fn=collate_distill)
    got = list(loader)
    assert len(got) == len(expected)
    for one, other in zip(got, expected, strict=True):
        assert_same_values(one, other)


def test_a_mixture_hands_each_source_its_part_of_the_next_batch(region) -> None:
    mixture = Mixture([MixSource(remote(region, "raw"), dataset_type="raw"),
                       MixSource(remote(region, "sharded"), dataset_type="sharded")])
    mixture.__getitems__(BatchWithNext([0, 5], [1, 6, 7]))
    for dataset in mixture.datasets:
        settled(dataset.reader)
    assert served(region, lambda: mixture.__getitems__([1, 6, 7]))["gets"] == 0


def test_a_failed_read_ahead_is_raised_when_its_batch_is_read(region, tmp_path_factory,
                                                              shard) -> None:
    copy_store(region, "sharded", "ahead-damaged", tmp_path_factory, shard)
    (region.root / "stores" / "ahead-damaged.zarr" / "image" / "c" / "1" / "0" / "0"
     / "0").unlink()  # the shard object of sample 4's image
    dataset = remote(region, "ahead-damaged")
    dataset.__getitems__(BatchWithNext([0], [4]))
    settled(dataset.reader)
    with pytest.raises(MissingChunkError, match="image"):
        dataset.__getitems__([4])
