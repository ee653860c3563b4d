"""Resume anywhere (docs/python.md, "Resuming"): a saved state counts what training received,
not what the workers prefetched; it loads into another world size with every unconsumed sample
of the epoch coming once; a mixture that changed between save and load has one warned behaviour
per change, and a store whose samples changed is named."""

from __future__ import annotations

import pickle
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import Lengths
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from arraystore import ingest
from arraystore.converters.npz.source import NpzDirectorySource
from arraystore.errors import OptionError
from arraystore.loaders import (
    BatchLoader,
    LengthGroupedSampler,
    MixSource,
    Mixture,
    StoreItems,
    WeightedSourceSampler,
)
from arraystore.loaders.resume import MixtureChangedWarning, StoreChangedError
from arraystore.loaders.samplers import shuffle
from arraystore.testing.npz_examples import write_referring, write_sav_pairs

BATCH = 4


def lengths_mixture(sizes=(300, 200), repeats=(1, 2), names=("a", "b"),
                    grown: dict | None = None, changed: tuple = ()) -> Mixture:
    """Sources of random lengths, the same each call (``grown``: samples appended to a source;
    ``changed``: sources whose samples are others)."""
    rng = np.random.default_rng(1)
    sources = []
    for name, size, repeat in zip(names, sizes, repeats, strict=True):
        lengths = rng.integers(1, 400, size)
        if name in changed:
            lengths = np.random.default_rng(7).integers(1, 400, size)
        extra = np.random.default_rng(99).integers(1, 400, (grown or {}).get(name, 0))
        sources.append(MixSource(Lengths(np.concatenate([lengths, extra])), dataset_type=name,
                                 repeats=repeat))
    return Mixture(sources)


def make(kind: str, mixture: Mixture, world_size: int = 1, rank: int = 0, **options):
    """A sampler of ``kind`` (``+local``: drawing neighbours near each other)."""
    locality = (16, 2) if kind.endswith("+local") else None
    if kind.startswith("length"):
        return LengthGroupedSampler(mixture, BATCH, world_size=world_size, rank=rank, seed=3,
                                    locality=locality)
    weights = options.get("weights", {t: 1 + n for n, t in enumerate(mixture.dataset_types)})
    return WeightedSourceSampler(mixture, weights, num_samples=450, world_size=world_size,
                                 rank=rank, seed=3, locality=locality)


KINDS = ["length", "weighted", "length+local", "weighted+local"]


def named(mixture: Mixture, indices) -> list[tuple[str, int]]:
    """Global indices as (source, sample of it): comparable across mixtures."""
    return [(mixture.dataset_types[s], local) for s, local in map(mixture.locate, indices)]


def drawn(sampler, count: int) -> list[int]:
    iterator = iter(sampler)
    return [next(iterator) for _ in range(count)]


def batch_keys(batch) -> list[tuple[str, int]]:
    return list(zip(batch["dataset_type"], batch["index"].tolist(), strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_stateful_dataloader_resumes_what_training_received(kind) -> None:
    """Workers prefetch batches beyond the 5 received; the state counts the 5, and the resumed
    loader gives, batch for batch, what the uninterrupted one would have."""
    mixture = lengths_mixture()

    def loader():
        sampler = make(kind, mixture)
        sampler.set_epoch(2)
        return StatefulDataLoader(mixture, batch_size=BATCH, sampler=sampler, num_workers=2,
                                  prefetch_factor=4, collate_fn=mixture.collate)

    expected = [batch_keys(b) for b in loader()]
    interrupted = loader()
    received = []
    for batch in interrupted:
        received.append(batch_keys(batch))
        if len(received) == 5:
            break
    state = pickle.loads(pickle.dumps(interrupted.state_dict()))
    assert interrupted.sampler.position > 5 * BATCH  # the workers had drawn ahead
    resumed = loader()
    resumed.load_state_dict(state)
    assert received + [batch_keys(b) for b in resumed] == expected
    assert [batch_keys(b) for b in resumed] == expected  # the next epoch is whole again


def test_another_worker_count_loads_the_sampler_from_the_loader_state() -> None:
    """StatefulDataLoader refuses another num_workers; the sampler finds its own state in the
    loader's and resumes under a loader of 1 worker."""
    mixture = lengths_mixture()

    def loader(workers: int):
        sampler = make("length", mixture)
        return StatefulDataLoader(mixture, batch_size=BATCH, sampler=sampler,
                                  num_workers=workers, collate_fn=mixture.collate)

    expected = [batch_keys(b) for b in loader(2)]
    interrupted = loader(2)
    received = [batch_keys(b) for _, b in zip(range(3), interrupted, strict=False)]
    state = interrupted.state_dict()
    resumed = loader(1)
    resumed.sampler.load_state_dict(state)
    assert received + [batch_keys(b) for b in resumed] == expected


@pytest.mark.parametrize("kind", KINDS)
def test_plain_dataloader_resumes_from_the_consumed_position(kind) -> None:
    mixture = lengths_mixture()
    sampler = make(kind, mixture)
    expected = [batch_keys(b) for b in DataLoader(mixture, BATCH, sampler=sampler,
                                                  collate_fn=mixture.collate)]
    loader = DataLoader(mixture, BATCH, sampler=sampler, num_workers=2, prefetch_factor=4,
                        collate_fn=mixture.collate)
    for step, _ in enumerate(loader):
        if step == 6:
            break
    state = sampler.state_dict(position=(step + 1) * BATCH)  # the documented call
    resumed = make(kind, mixture)
    resumed.load_state_dict(state)
    rest = [batch_keys(b) for b in DataLoader(mixture, BATCH, sampler=resumed,
                                              collate_fn=mixture.collate)]
    assert rest == expected[step + 1:]


@pytest.mark.parametrize("kind", KINDS)
def test_a_loaded_state_waits_for_the_iteration_that_draws(kind) -> None:
    mixture = lengths_mixture()
    sampler = make(kind, mixture)
    sampler.set_epoch(1)
    whole = list(sampler)
    state = (drawn(sampler, 33), sampler.state_dict())[1]
    resumed = make(kind, mixture)
    resumed.load_state_dict(state)
    iter(resumed)  # an iterator nobody draws from takes nothing
    assert list(resumed) == whole[33:]
    assert list(resumed) == whole  # the state applied to one iteration only
    resumed.load_state_dict(state)
    resumed.set_epoch(4)
    with pytest.warns(UserWarning, match="starts from its beginning"):
        fourth = list(resumed)
    check = make(kind, mixture)
    check.set_epoch(4)
    assert fourth == list(check)
    with pytest.raises(OptionError, match="seed"):
        resumed.load_state_dict({**state, "seed": 99})
    with pytest.raises(OptionError, match="not a"):
        make("weighted" if kind.startswith("length") else "length",
             mixture).load_state_dict(state)


def test_locality_keeps_neighbours_together() -> None:
    """Blocks of 16 neighbours, windows of 1 block: each block's samples come one after
    another; a batch of 4 touches one block where a full shuffle touches ~4."""
    order = np.arange(1000, dtype=np.int64)
    shuffle(order, np.random.default_rng(0), (16, 1))
    assert sorted(order.tolist()) == list(range(1000))
    blocks = order // 16
    assert (np.diff(blocks) != 0).sum() == 1000 // 16  # 63 blocks (the last of 8): 62 changes
    assert not np.array_equal(order, np.sort(order))  # shuffled within each block
    mixture = lengths_mixture(sizes=(3000, 2000), repeats=(1, 1))
    local = WeightedSourceSampler(mixture, num_samples=4000, seed=1, locality=(16, 1))
    anywhere = WeightedSourceSampler(mixture, num_samples=4000, seed=1)

    def blocks_per_batch(sampler) -> float:
        batches = np.asarray(list(sampler))[:4000].reshape(-1, BATCH)
        return float(np.mean([len(set((b // 16).tolist())) for b in batches]))

    assert blocks_per_batch(local) < 2.5 < 3.5 < blocks_per_batch(anywhere)
    with pytest.raises(OptionError, match="locality"):
        LengthGroupedSampler(mixture, BATCH, locality=(0, 4))


def test_the_state_is_a_few_numbers_whatever_the_epoch() -> None:
    small = make("length", lengths_mixture(sizes=(300, 200)))
    large = make("length", lengths_mixture(sizes=(300_000, 200_000)))
    sizes = [len(pickle.dumps((drawn(s, 7), s.state_dict())[1])) for s in (small, large)]
    assert abs(sizes[0] - sizes[1]) < 8 and sizes[0] < 600


def _epoch_rest(sampler, consumed_per_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The job's consumed indices and the unconsumed rest of the epoch (padding excluded) when
    every rank of ``sampler``'s world took ``consumed_per_rank``."""
    padded = sampler.epoch_indices()
    real = len(sampler.lengths) if isinstance(sampler, LengthGroupedSampler) else len(padded)
    cut = consumed_per_rank * sampler.world_size
    return padded[:cut], padded[cut:real]


def _assert_exactly_once(streams: list[list[int]], rest: np.ndarray, consumed: np.ndarray,
                         world_size: int) -> None:
    assert len({len(s) for s in streams}) == 1  # ranks go on in lockstep
    got, wanted = Counter(np.concatenate(streams).tolist()), Counter(rest.tolist())
    assert not wanted - got  # every unconsumed index comes
    padding = got - wanted
    assert sum(padding.values()) < world_size and set(padding) <= set(wanted)
    if len(set(consumed.tolist())) == len(consumed):  # an epoch without repeats
        assert not set(got) & (set(consumed.tolist()) - set(rest.tolist()))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("worlds", [(4, 2), (2, 3), (1, 8), (8, 1)],
                         ids=lambda w: f"{w[0]}to{w[1]}")
def test_elastic_resume_gives_every_unconsumed_sample_once(kind, worlds) -> None:
    before, after = worlds
    mixture = lengths_mixture()
    old = [make(kind, mixture, before, rank) for rank in range(before)]
    for sampler in old:
        sampler.set_epoch(5)
        drawn(sampler, 9)
    consumed, rest = _epoch_rest(old[0], 9)
    state = old[before - 1].state_dict()  # any rank's state says where the job is
    new = [make(kind, mixture, after, rank) for rank in range(after)]
    for sampler in new:
        sampler.load_state_dict(state)
    streams = [list(s) for s in new]
    _assert_exactly_once(streams, rest, consumed, after)
    if after == before:
        assert streams == [list(old[r].rank_indices()[9:]) for r in range(after)]


@pytest.mark.parametrize("kind", KINDS)
def test_resumes_chain_across_world_sizes(kind) -> None:
    """4 ranks, then 2, then 3: each stage draws from what the last left."""
    mixture = lengths_mixture()
    first = [make(kind, mixture, 4, r) for r in range(4)]
    for sampler in first:
        drawn(sampler, 10)
    _, rest = _epoch_rest(first[0], 10)
    second = [make(kind, mixture, 2, r) for r in range(2)]
    taken = []
    for sampler in second:
        sampler.load_state_dict(first[0].state_dict())
        taken.append(drawn(sampler, 15))
    third = [make(kind, mixture, 3, r) for r in range(3)]
    for sampler in third:
        sampler.load_state_dict(pickle.loads(pickle.dumps(second[1].state_dict())))
    again = make(kind, mixture, 3, 0)
    again.load_state_dict(third[0].state_dict())  # saved again before drawing: the same rest
    assert len(third[0].state_dict()["stages"]) == 3
    streams = [t for t in taken] + [list(s) for s in third]
    assert list(again) == streams[2]
    seen = Counter(np.concatenate(streams).tolist())
    assert not Counter(rest.tolist()) - seen
    assert sum((seen - Counter(rest.tolist())).values()) < 2 + 3  # the padding of two stages


def _spread(lengths: np.ndarray, stream: list[int]) -> float:
    batches = np.asarray(stream)[: len(stream) // BATCH * BATCH].reshape(-1, BATCH)
    values = lengths[batches]
    return float((values.max(1) - values.min(1)).mean())


def test_length_grouping_holds_for_the_rest_on_another_world_size() -> None:
    mixture = lengths_mixture(sizes=(3000, 2000))
    old = [make("length", mixture, 4, r) for r in range(4)]
    for sampler in old:
        drawn(sampler, 50)
    new = [make("length", mixture, 2, r) for r in range(2)]
    for sampler in new:
        sampler.load_state_dict(old[0].state_dict())
    lengths = mixture.lengths
    grouped = np.mean([_spread(lengths, list(s)) for s in new])
    shuffled = _spread(lengths, np.random.default_rng(0).permutation(len(lengths)).tolist())
    assert grouped < shuffled / 5


def _resume_with(kind: str, saved_mixture: Mixture, new_mixture: Mixture, **options):
    """(the saved run's rest, as named samples; the resumed sampler; its rest; warnings)."""
    old = make(kind, saved_mixture)
    old.set_epoch(1)
    whole = list(old)
    state = (drawn(old, 40), old.state_dict())[1]
    resumed = make(kind, new_mixture, **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.load_state_dict(state)
    rest = named(new_mixture, list(resumed))
    said = [str(w.message) for w in caught if issubclass(w.category, MixtureChangedWarning)]
    return named(saved_mixture, whole[40:]), resumed, rest, said


@pytest.mark.parametrize("kind", KINDS)
def test_a_source_added_joins_at_the_next_epoch(kind) -> None:
    saved_rest, resumed, rest, said = _resume_with(
        kind, lengths_mixture(), lengths_mixture(sizes=(300, 200, 50), repeats=(1, 2, 1),
                                                 names=("a", "b", "c")))
    assert rest == saved_rest
    assert len(said) == 1 and "'c' is new: it joins at epoch 2" in said[0]
    resumed.set_epoch(2)
    mixture = resumed.dataset if kind.startswith("length") else resumed.mixture
    assert any(mixture_type == "c" for mixture_type, _ in named(mixture, list(resumed)))


@pytest.mark.parametrize("kind", KINDS)
def test_a_source_removed(kind) -> None:
    """Weighted: the rest of the epoch without the gone source's draws. Length-grouped: the
    epoch's order needs the gone source's lengths, so the epoch ends where it was saved. Both
    say so."""
    saved_rest, resumed, rest, said = _resume_with(
        kind, lengths_mixture(), lengths_mixture(sizes=(300,), repeats=(1,), names=("a",)))
    assert len(said) == 1 and "'b' is gone" in said[0]
    if kind.startswith("weighted"):
        assert rest == [s for s in saved_rest if s[0] == "a"]
        gone = sum(1 for s in saved_rest if s[0] == "b")
        assert f"its {gone} remaining indices of epoch 1 are skipped" in said[0]
    else:
        assert rest == [] and "epoch 1 ends where it was saved" in said[0]
    assert len(list(resumed)) == len(resumed)  # then whole epochs of the present sources


@pytest.mark.parametrize("kind", ["weighted", "weighted+local"])
def test_reweighted_sources_keep_the_saved_draws_for_the_rest(kind) -> None:
    saved_rest, _, rest, said = _resume_with(kind, lengths_mixture(), lengths_mixture(),
                                             weights={"a": 5, "b": 1})
    assert rest == saved_rest
    assert len(said) == 1 and said[0].count("keeps the saved draws") == 2


@pytest.mark.parametrize("kind", KINDS)
def test_a_grown_source_keeps_its_samples_and_adds_the_new_next_epoch(kind) -> None:
    saved_rest, _, rest, said = _resume_with(kind, lengths_mixture(),
                                             lengths_mixture(grown={"a": 60}))
    assert rest == saved_rest  # b's indices moved by 60: carried by name
    assert len(said) == 1 and "'a' grew from 300 to 360 samples" in said[0]


@pytest.mark.parametrize("kind", KINDS)
def test_a_source_whose_samples_changed_is_named(kind) -> None:
    with pytest.raises(StoreChangedError, match=r"mixture source 'b'.*first 200 samples"):
        _resume_with(kind, lengths_mixture(), lengths_mixture(changed=("b",)))


@pytest.fixture
def stores(tmp_path):
    """Two small stores (SAV-style pairs, referring captions) and their NPZ folders."""
    sav = write_sav_pairs(tmp_path / "sav", 9, size=32)
    ref = write_referring(tmp_path / "ref", 11, size=32)
    ingest(NpzDirectorySource(), [sav], tmp_path / "sav.zarr", workers=1)
    ingest(NpzDirectorySource(), [ref], tmp_path / "ref.zarr", workers=1)
    return tmp_path


def store_mixture(root) -> Mixture:
    return Mixture([MixSource(root / "sav.zarr", dataset_type="sav", modality_length=64),
                    MixSource(root / "ref.zarr", dataset_type="ref")])


def test_stores_appended_to_or_rewritten(stores) -> None:
    sampler = make("weighted", store_mixture(stores))
    whole = named(sampler.mixture, list(sampler))
    state = (drawn(sampler, 5), sampler.state_dict())[1]
    more = write_sav_pairs(stores / "more", 4, size=32, seed=5)
    for path in more.iterdir():
        path.rename(path.with_name("z" + path.name))  # new ids, after the stored ones
    ingest(NpzDirectorySource(), [more], stores / "sav.zarr", workers=1)
    grown = make("weighted", store_mixture(stores))
    with pytest.warns(MixtureChangedWarning, match="'sav' grew from 9 to 13"):
        grown.load_state_dict(state)
    assert named(grown.mixture, list(grown)) == whole[5:]
    rewritten = write_sav_pairs(stores / "other", 13, size=32, seed=6)
    for path in rewritten.iterdir():
        path.rename(path.with_name("a" + path.name))  # other samples (ids) in the store
    ingest(NpzDirectorySource(), [rewritten], stores / "sav.zarr", mode="overwrite",
           workers=1)
    with pytest.raises(StoreChangedError, match=r"'sav' \(.*sav.zarr\)"):
        make("weighted", store_mixture(stores)).load_state_dict(state)


def test_batch_loader_resumes_the_batches_it_handed_out(stores) -> None:
    items = StoreItems(stores / "ref.zarr")

    def keys(loader) -> list[list[str]]:
        return [list(b["caption"]) for b in loader]

    loader = BatchLoader(items, 3, shuffle=True, seed=4, prefetch=3)
    first, second = keys(loader), keys(loader)
    assert first != second  # a new order each epoch
    again = BatchLoader(items, 3, shuffle=True, seed=4, prefetch=3)
    keys(again)
    iterator = iter(again)
    taken = [list(next(iterator)["caption"]) for _ in range(2)]
    state = again.state_dict()
    assert state["batches"] == 2 and state["epoch"] == 1
    resumed = BatchLoader(items, 3, shuffle=True, seed=4)
    resumed.load_state_dict(state)
    assert taken + keys(resumed) == second
    sampler = LengthGroupedSampler(items, 3, lengths=np.arange(1, len(items) + 1))
    whole = keys(BatchLoader(items, 3, sampler=sampler))
    partial = BatchLoader(items, 3, sampler=sampler)
    iterator = iter(partial)
    next(iterator)
    carried = BatchLoader(items, 3, sampler=LengthGroupedSampler(
        items, 3, lengths=np.arange(1, len(items) + 1)))
    carried.load_state_dict(partial.state_dict())
    iterator = iter(carried)
    assert list(next(iterator)["caption"]) == whole[1]
    again = BatchLoader(items, 3, sampler=LengthGroupedSampler(
        items, 3, lengths=np.arange(1, len(items) + 1)))
    again.load_state_dict(carried.state_dict())  # resumed twice: counted from the epoch's start
    assert keys(again) == whole[2:]


def _identity(batch) -> list[tuple[str, bytes]]:
    subs = batch if "dataset_type" not in batch else {batch["dataset_type"][0]: batch}
    found = []
    for name, sub in subs.items():
        field = sub["image1"] if name == "sav" else sub["image"]
        found += [(name, bytes(row.numpy().tobytes())) for row in field]
    return found


def test_training_interrupted_and_resumed_on_another_world_size(stores) -> None:
    """A tiny model trained from a mixture of two stores by 2 simulated ranks, interrupted
    after 2 steps and resumed by 3 ranks: every sample of the epoch is seen exactly once
    (the padding of the 3-rank stage aside)."""
    torch.manual_seed(0)
    mixture = store_mixture(stores)
    model = torch.nn.Linear(1, 1)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)

    def rank_loaders(world_size: int) -> list[StatefulDataLoader]:
        return [StatefulDataLoader(mixture, batch_size=2, collate_fn=mixture.collate,
                                   sampler=LengthGroupedSampler(mixture, 2, world_size=world_size,
                                                                rank=rank, seed=1))
                for rank in range(world_size)]

    def step(batches) -> None:  # one data-parallel step: the ranks' losses summed
        optimiser.zero_grad()
        loss = sum(model(torch.tensor([[float(len(_identity(b)))]])).pow(2).sum()
                   for b in batches)
        loss.backward()
        optimiser.step()

    seen: list[tuple[str, bytes]] = []
    loaders = rank_loaders(2)
    iterators = [iter(loader) for loader in loaders]
    for _ in range(2):
        batches = [next(it) for it in iterators]
        seen += [key for batch in batches for key in _identity(batch)]
        step(batches)
    checkpoint = pickle.dumps({"model": model.state_dict(), "loader": loaders[0].state_dict()})
    del loaders, iterators  # the job stops

    saved = pickle.loads(checkpoint)
    model.load_state_dict(saved["model"])
    loaders = rank_loaders(3)
    for loader in loaders:
        loader.load_state_dict(saved["loader"])
    for batches in zip(*loaders, strict=True):
        seen += [key for batch in batches for key in _identity(batch)]
        step(batches)
    counts = Counter(seen)
    assert len(counts) == len(mixture)  # every sample
    assert sum(counts.values()) - len(mixture) < 3 and max(counts.values()) <= 2
