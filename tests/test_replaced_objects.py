"""An object of a store replaced while a reader has it open (the store rewritten in place under
a training job): every GET of an object read before asks for the version read then
(``If-Match``), so the reader notices, forgets the shard index it held and reads the object
again. Values are the new object's, never ranges of the old index applied to the new bytes;
with and without a node-local cache, in the DataLoader's batch path and item by item."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    LAYOUTS,
    _layout_store,
    assert_same_values,
    copy_store,
    edit_shard,
    per_sample_fields,
    shard_file,
    url,
)

from arraystore import SampleReader
from arraystore.errors import ObjectChangedError
from arraystore.loaders import ZarrDistillDataset, collate_distill
from arraystore.location import Location

SHARDED = LAYOUTS["sharded"]


def swap_samples_2_and_3(index: np.ndarray, data: bytearray) -> None:
    """The same samples in a shard, the bytes of inner chunks 2 and 3 swapped and their index
    entries too: the same values at other offsets, as a rewrite may lay them out."""
    (a, size), (b, other) = index[2], index[3]
    assert size == other
    data[a:a + size], data[b:b + size] = data[b:b + size], data[a:a + size]
    index[[2, 3]] = index[[3, 2]]


def replace_first_shards(store: Path, fields: list[str]) -> None:
    """Every field's first shard replaced (a new object: a new ETag), samples 2 and 3
    swapped in it."""
    for name in fields:
        edit_shard(shard_file(store, name, 0, SHARDED), SHARDED.shard_size,
                   swap_samples_2_and_3)


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "cache"])
def test_a_shard_replaced_under_a_reader_is_read_again(region, cache, tmp_path,
                                                        tmp_path_factory, shard) -> None:
    copy_store(region, "sharded", f"replaced-{cache}", tmp_path_factory, shard)
    local = SampleReader(_layout_store("sharded", tmp_path_factory, shard))
    fields = per_sample_fields(local)
    reader = SampleReader(url(f"replaced-{cache}"), storage_options=region.storage_options(),
                          fields=fields, cache_dir=tmp_path / "cache" if cache else "")
    for index in (0, 1):  # the shard indexes (and, cached, these chunks) are now known
        assert_same_values(reader.read(index), local.read(index, fields))
    replace_first_shards(region.root / "stores" / f"replaced-{cache}.zarr", fields)
    for index in (2, 3, 0, 1):
        assert_same_values(reader.read(index), local.read(index, fields), f"sample {index}")


def test_the_batch_path_reads_a_replaced_shard_again(region, tmp_path_factory, shard) -> None:
    copy_store(region, "sharded", "replaced-batches", tmp_path_factory, shard)
    local = ZarrDistillDataset(_layout_store("sharded", tmp_path_factory, shard))
    remote = ZarrDistillDataset(url("replaced-batches"), storage_options=region.storage_options())
    remote.__getitems__([0, 1])
    replace_first_shards(region.root / "stores" / "replaced-batches.zarr",
                        per_sample_fields(remote.reader))
    assert_same_values(collate_distill(remote.__getitems__([3, 2])),
                       collate_distill(local.__getitems__([3, 2])))


def test_a_get_of_a_replaced_object_names_it_and_forgets_it(region, tmp_path_factory,
                                                             shard) -> None:
    copy_store(region, "raw", "replaced-object", tmp_path_factory, shard)
    location = Location.of(url("replaced-object"), region.storage_options())
    key = "image/c/0/0/0/0"
    before = location.read_ranges([key], [0], [16], versioned=True)[0]
    path = region.root / "stores" / "replaced-object.zarr" / key
    changed = bytes(255 - b for b in path.read_bytes())
    path.with_name("new").write_bytes(changed)
    os.replace(path.with_name("new"), path)
    with pytest.raises(ObjectChangedError, match=r"replaced-object\.zarr/image/c/0/0/0/0") as got:
        location.read_ranges([key], [0], [16], versioned=True)
    assert got.value.keys == (key,)
    assert location.read_ranges([key], [0], [16], versioned=True)[0] == changed[:16] != before


def test_the_versions_a_process_remembers_are_bounded(monkeypatch) -> None:
    from collections import OrderedDict

    from arraystore import location

    monkeypatch.setattr(location, "REMEMBERED_TAGS", 2)
    tags: OrderedDict[str, str] = OrderedDict()
    location._remember(tags, "a", '"1"')
    location._remember(tags, "a", '"2"')  # the version read first stays
    location._remember(tags, "b", '"1"')
    location._remember(tags, "c", '"1"')  # the least recent goes
    assert tags == {"b": '"1"', "c": '"1"'}
    location._remember(tags, "a", '"2"')
    assert list(tags) == ["c", "a"] and tags["a"] == '"2"'
