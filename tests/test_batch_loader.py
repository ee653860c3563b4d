"""``BatchLoader``: the same batches as a DataLoader over the same index sequence, for an
``sa1b`` store and an NPZ-kind store; the ring never overwrites a batch within its contract."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, default_collate

from arraystore import Layout, ingest
from arraystore.converters.npz.source import NpzDirectorySource
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.loaders import (
    BatchLoader,
    StoreItems,
    ZarrDistillDataset,
    collate_distill,
    packed_default_collate,
)
from arraystore.readers import local_files


def equal(a, b) -> bool:
    if isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(b, dict):
        return list(a) == list(b) and all(equal(a[k], b[k]) for k in b)
    if isinstance(b, list | tuple):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture(scope="module")
def npz_store(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("npz")
    rng = np.random.default_rng(3)
    for i in range(11):
        np.savez(folder / f"s{i:02d}.npz", feat=rng.normal(size=(3, 5)).astype(np.float32),
                 label=np.int64(i), mask=rng.integers(0, 2, (4, 4)).astype(bool))
    out = folder.parent / "npz.zarr"
    ingest(NpzDirectorySource(), [folder], out, layout=Layout("sharded", shard_size=4),
           workers=1)
    return str(out)


@pytest.mark.parametrize("layout_store", ["raw", "sharded+crc32c", "raw+zstd"], indirect=True)
def test_sa1b_batches_equal_a_dataloaders(layout_store) -> None:
    _, path = layout_store
    dataset = ZarrDistillDataset(path)
    sampler = list(RandomSampler(dataset, generator=torch.Generator().manual_seed(0)))
    expected = list(DataLoader(dataset, batch_size=2, sampler=sampler,
                               collate_fn=collate_distill))
    got = list(BatchLoader(dataset, 2, sampler=sampler, copy=True))
    assert len(got) == len(expected) == 3
    assert all(equal(a, b) for a, b in zip(got, expected, strict=True))


def test_any_store_kind_batches_like_default_collate(npz_store) -> None:
    dataset = StoreItems(npz_store)
    expected = [default_collate([dataset[i] for i in range(start, min(start + 4, len(dataset)))])
                for start in range(0, len(dataset), 4)]  # item by item: the reference
    assert all(equal(a, b) for a, b in zip(
        DataLoader(dataset, batch_size=4), expected, strict=True))  # __getitems__, handed on
    batched = dataset.__getitems__([3, 0, 3])
    reference = default_collate([dataset[i] for i in (3, 0, 3)])
    assert default_collate(batched) is batched.batch
    assert packed_default_collate(batched) is batched.batch
    assert equal(batched.batch, reference)
    assert equal(packed_default_collate(list(batched)), reference)  # items: collated again
    loader = BatchLoader(dataset, 4, threads=3, prefetch=1, copy=True)
    got = list(loader)
    assert len(loader) == len(got) == 3
    assert all(equal(a, b) for a, b in zip(got, expected, strict=True))
    assert len(list(BatchLoader(dataset, 4, drop_last=True))) == 2


@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_ring_keeps_a_batch_until_prefetch_plus_one_more_are_drawn(npz_store,
                                                                   prefetch: int) -> None:
    """Within an epoch and on into the next (the loader keeps its ring across epochs)."""
    dataset = StoreItems(npz_store)
    expected = list(DataLoader(dataset, batch_size=1, collate_fn=default_collate)) * 2
    held: list[tuple[int, dict]] = []
    loader = BatchLoader(dataset, 1, prefetch=prefetch, threads=2)
    for number, batch in enumerate(itertools.chain(loader, loader)):
        held.append((number, batch))
        for earlier, kept in held[-(prefetch + 1):]:  # within the contract: intact
            assert equal(kept, expected[earlier]), (number, earlier)
    reused = [equal(kept, expected[n]) for n, kept in held[:-(prefetch + 1)]]
    assert not all(reused)  # beyond it, buffers were reused (copy=False)


def test_shuffle_is_seeded_and_bad_datasets_are_refused(npz_store) -> None:
    dataset = StoreItems(npz_store)
    first = [b["label"].tolist() for b in BatchLoader(dataset, 4, shuffle=True, seed=1,
                                                       copy=True)]
    again = [b["label"].tolist() for b in BatchLoader(dataset, 4, shuffle=True, seed=1,
                                                       copy=True)]
    assert first == again and sorted(x for b in first for x in b) == list(range(11))
    with pytest.raises(TypeError, match="fill_batch"):
        BatchLoader([1, 2, 3], 2)


def test_later_epochs_reuse_the_ring_and_the_threads_copies(
        tmp_path, shard, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loader's second epoch fills the buffers of its first, through the same copies of the
    dataset (their shards already open: the large chunks come out of the mappings, no
    ``preadv``), with the same batches; a changed dataset is copied again, into a new ring."""
    out = tmp_path / "store.zarr"
    ingest(Sa1bTarSource(max_boxes=2), [shard], out, layout=Layout("sharded", shard_size=2),
           workers=1)
    dataset = ZarrDistillDataset(out, keys=("image", "teacher_features"))
    order = [3, 1, 0, 2, 1, 3]
    loader = BatchLoader(dataset, 2, sampler=order, threads=2, prefetch=1)
    expected = [collate_distill([dataset[i] for i in order[k:k + 2]]) for k in (0, 2, 4)]
    first = [b["image"].data_ptr() for b in loader]
    calls: list[int] = []
    real = os.preadv
    monkeypatch.setattr(local_files.os, "preadv",
                        lambda fd, buffers, offset: calls.append(offset) or real(fd, buffers,
                                                                                 offset))
    again = []
    for batch in loader:
        assert equal(batch, expected[len(again)])
        again.append(batch["image"].data_ptr())
    assert set(again) <= set(first) and not calls
    dataset.keys = ("image",)  # changed: new copies, read afresh
    assert [equal(b, {"image": e["image"]}) for b, e in zip(loader, expected, strict=True)] \
        == [True] * 3
    assert calls
    held = iter(loader)
    next(held)  # an epoch under way holds the ring while the dataset changes back
    dataset.keys = ("image", "teacher_features")
    changed = iter(loader)
    got = [next(changed)]  # in a ring of its own
    list(held)  # the old epoch ends first: its ring, made for the keys of then, is not kept
    got += list(changed)
    assert [equal(b, e) for b, e in zip(got, expected, strict=True)] == [True] * 3
    assert [equal(b, e) for b, e in zip(loader, expected, strict=True)] == [True] * 3
