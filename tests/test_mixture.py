"""``Mixture`` and its samplers (docs/formats.md): repeats and weights exactly as declared, ranks
that partition an epoch, resumable state, length grouping, missing sources, mixed-kind batches,
``mix.toml`` and ``arraystore mix describe``."""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Lengths, assert_same_values
from torch.utils.data import DataLoader, Dataset, default_collate

from arraystore import ingest
from arraystore.converters.npz.source import NpzDirectorySource
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.errors import OptionError
from arraystore.loaders import (
    LengthGroupedSampler,
    MixSource,
    Mixture,
    WeightedSourceSampler,
    ZarrDistillDataset,
)
from arraystore.loaders.batched import Batched
from arraystore.loaders.samplers import length_grouped_indices
from arraystore.mix import MissingSourceError, MixSpecError, read_mix_toml
from arraystore.reader import SampleReader
from arraystore.testing.npz_examples import write_referring, write_sav_pairs
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def stores(tmp_path_factory, shard) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mix")
    ingest(Sa1bTarSource(), [shard], root / "sa1b.zarr", workers=1)
    ingest(NpzDirectorySource(), [write_sav_pairs(root / "sav", 6, size=64)], root / "sav.zarr",
           workers=1)
    ingest(NpzDirectorySource(), [write_referring(root / "ref", 7, size=64)],
           root / "refcoco.zarr", workers=1)
    return {"sa1b": root / "sa1b.zarr", "sav": root / "sav.zarr", "refcoco": root / "refcoco.zarr"}


@pytest.fixture(scope="module")
def mix(stores) -> Mixture:
    return Mixture([
        MixSource(stores["sav"], dataset_type="sav", modality_length=512),
        MixSource(ZarrDistillDataset(stores["sa1b"]), dataset_type="sa1b", modality_length=1024),
        MixSource(stores["refcoco"], dataset_type="refcoco", repeats=4),
    ])


def source_table(path, dataset_type: str, **keys) -> str:
    """One ``[[source]]`` table of a mix.toml (JSON writes TOML's strings, numbers, booleans)."""
    lines = ["[[source]]", f"path = {json.dumps(str(path))}",
             f"dataset_type = {json.dumps(dataset_type)}",
             *(f"{key} = {json.dumps(value)}" for key, value in keys.items())]
    return "\n".join(lines) + "\n\n"


def sources_of(mixture: Mixture, indices) -> np.ndarray:
    return np.searchsorted(mixture.offsets, np.asarray(indices), side="right") - 1


def test_items_and_lengths_without_reading_a_sample(stores, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a sample was read")

    monkeypatch.setattr(SampleReader, "read", refuse)
    mixture = Mixture([MixSource(stores["sav"], dataset_type="sav", modality_length=512),
                       MixSource(stores["refcoco"], dataset_type="refcoco", repeats=4)])
    captions = SampleReader(stores["refcoco"]).column("modality_length")
    assert mixture.lengths.dtype == np.int64 and len(mixture) == 6 + 4 * 7
    np.testing.assert_array_equal(mixture.lengths, [512] * 6 + list(captions) * 4)
    monkeypatch.undo()
    item = mixture[6 + 7 + 2]  # the second copy of refcoco sample 2
    assert item["dataset_type"] == "refcoco"
    assert item["modality_length"] == len(item["caption"].split()) == captions[2]
    assert item["image"].shape == (64, 64, 3)


def test_repeats_give_each_source_exactly_repeats_times_len(mix) -> None:
    indices = list(LengthGroupedSampler(mix, per_device_batch_size=4, seed=3))
    assert sorted(indices) == list(range(len(mix)))
    counts = np.bincount(sources_of(mix, indices), minlength=3)
    assert counts.tolist() == [6, 5, 4 * 7]
    refcoco = [mix.locate(i)[1] for i in indices if mix.locate(i)[0] == 2]
    assert np.bincount(refcoco).tolist() == [4] * 7


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_ranks_partition_the_epoch(world_size) -> None:
    lengths = np.random.default_rng(0).integers(1, 500, 1001)
    mixture = Mixture([MixSource(Lengths(lengths), dataset_type="only")])
    ranks = [LengthGroupedSampler(mixture, 4, world_size, r, seed=1) for r in range(world_size)]
    taken = np.concatenate([list(s) for s in ranks])
    assert all(len(s) == len(list(s)) for s in ranks)
    epoch = ranks[0].epoch_indices()
    padding = len(epoch) - len(mixture)
    assert padding < world_size
    assert sorted(taken) == sorted([*range(len(mixture)), *epoch[:padding]])
    weighted = [WeightedSourceSampler(mixture, num_samples=999, world_size=world_size, rank=r,
                                      seed=2) for r in range(world_size)]
    drawn = np.concatenate([list(s) for s in weighted])
    np.testing.assert_array_equal(np.sort(drawn), np.sort(weighted[0].epoch_indices()))


def test_seed_and_epoch_decide_the_order(mix) -> None:
    a, b = LengthGroupedSampler(mix, 4, seed=5), LengthGroupedSampler(mix, 4, seed=5)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == sorted(first)
    w1, w2 = WeightedSourceSampler(mix, seed=5), WeightedSourceSampler(mix, seed=5)
    assert list(w1) == list(w2)
    w1.set_epoch(3)
    assert list(w1) != list(w2)


@pytest.mark.parametrize("kind", ["length", "weighted"])
def test_resume_from_state_reproduces_the_rest(kind) -> None:
    lengths = np.random.default_rng(1).integers(-50, 400, 3000)
    lengths[lengths == 0] = 1
    mixture = Mixture([MixSource(Lengths(lengths[:2000]), dataset_type="a"),
                       MixSource(Lengths(lengths[2000:]), dataset_type="b", repeats=2)])
    rng = np.random.default_rng(7)

    def make():
        if kind == "length":
            return LengthGroupedSampler(mixture, 8, world_size=3, rank=1, seed=11)
        return WeightedSourceSampler(mixture, {"a": 1, "b": 3}, num_samples=2500,
                                     world_size=3, rank=1, seed=11)

    for epoch in (0, 2):
        full = make()
        full.set_epoch(epoch)
        expected = list(full)
        for stop in rng.integers(0, len(expected), 5):
            run = make()
            run.set_epoch(epoch)
            iterator = iter(run)
            done = [next(iterator) for _ in range(stop)]
            state = pickle.loads(pickle.dumps(run.state_dict()))
            assert len(pickle.dumps(state)) < 200 + 120 * len(mixture.sources)  # per source
            resumed = make()
            resumed.load_state_dict(state)
            assert done + list(resumed) == expected
            assert resumed.epoch == epoch
    with pytest.raises(OptionError, match="seed"):
        make().load_state_dict({**make().state_dict(), "seed": 99})


def test_weighted_proportions_follow_the_weights() -> None:
    mixture = Mixture([MixSource(Lengths(np.ones(n, int)), dataset_type=t)
                       for t, n in (("sav", 300), ("sa1b", 5000), ("refcoco", 40))])
    sampler = WeightedSourceSampler(mixture, {"sav": 1, "sa1b": 2, "refcoco": 4},
                                    num_samples=100_000, seed=0)
    drawn = np.array(list(sampler))
    shares = np.bincount(sources_of(mixture, drawn), minlength=3) / len(drawn)
    np.testing.assert_allclose(shares, [1 / 7, 2 / 7, 4 / 7], atol=0.01)
    sa1b = drawn[sources_of(mixture, drawn) == 1] - mixture.offsets[1]
    first = sa1b[:5000]
    assert len(np.unique(first)) == 5000  # a large source: no sample twice before all once
    # small sources cycle through every sample before repeating any
    refcoco = drawn[sources_of(mixture, drawn) == 2] - mixture.offsets[2]
    assert len(np.unique(refcoco[:40])) == 40
    with pytest.raises(OptionError, match="does not hold"):
        WeightedSourceSampler(mixture, {"openimages": 1})


def _spread(lengths, order, batch) -> float:
    batches = np.asarray(order)[: len(order) // batch * batch].reshape(-1, batch)
    values = lengths[batches]
    return float((values.max(1) - values.min(1)).mean())


def test_length_grouping_narrows_batches() -> None:
    lengths = np.random.default_rng(3).integers(1, 2000, 20_000)
    sampler = LengthGroupedSampler(Mixture([MixSource(Lengths(lengths), dataset_type="x")]),
                                   per_device_batch_size=8, seed=0)
    random_order = np.random.default_rng(1).permutation(len(lengths))
    grouped, baseline = _spread(lengths, list(sampler), 8), _spread(lengths, random_order, 8)
    assert grouped < 0.1 * baseline


def _xtuner_reference(lengths, group, rng) -> list[int]:
    """xtuner's get_length_grouped_indices, written plainly with lists (the same draws)."""
    def process(values):
        perm = rng.permutation(np.arange(len(values), dtype=np.int32))
        batches = [list(perm[i:i + group]) for i in range(0, len(values), group)]
        return [sorted(b, key=lambda i: values[i], reverse=True) for b in batches]

    if all(v > 0 for v in lengths) or all(v < 0 for v in lengths):
        return [int(i) for b in process(lengths) for i in b]
    mm = [i for i, v in enumerate(lengths) if v > 0]
    lang = [i for i, v in enumerate(lengths) if v < 0]
    mm_batches = [[mm[i] for i in b] for b in process([lengths[i] for i in mm])]
    lang_batches = [[lang[i] for i in b] for b in process([-lengths[i] for i in lang])]
    last = mm_batches[-1] + lang_batches[-1]
    batches = mm_batches[:-1] + lang_batches[:-1]
    batches = [batches[i] for i in rng.permutation(len(batches))]
    batches.append(sorted(last, key=lambda i: abs(lengths[i]), reverse=True))
    return [int(i) for b in batches for i in b]


@pytest.mark.parametrize("kinds", ["multimodal", "mixed", "text-only"])
def test_vectorised_grouping_equals_the_reference_algorithm(kinds) -> None:
    lengths = np.random.default_rng(4).integers(1, 60, 2_500)
    if kinds == "mixed":
        lengths[::3] *= -1  # text-only samples among multimodal ones
    elif kinds == "text-only":
        lengths = -lengths
    for group in (7, 64, 1000):
        ours = length_grouped_indices(lengths, group, np.random.default_rng(9))
        reference = _xtuner_reference(list(lengths), group, np.random.default_rng(9))
        assert ours.tolist() == reference


def test_missing_sources(stores, tmp_path) -> None:
    with pytest.raises(MissingSourceError, match=r"'openimages': no store at .*nowhere\.zarr"):
        Mixture([MixSource(stores["sav"], dataset_type="sav"),
                 MixSource(tmp_path / "nowhere.zarr", dataset_type="openimages")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mixture = Mixture([MixSource(stores["sav"], dataset_type="sav"),
                           MixSource(tmp_path / "nowhere.zarr", dataset_type="openimages",
                                     required=False)])
    assert len(caught) == 1 and "nowhere.zarr" in str(caught[0].message)
    assert mixture.dataset_types == ["sav"] and mixture.missing == [str(tmp_path / "nowhere.zarr")]
    with pytest.raises(MixSpecError, match="repeats must be an integer"):
        MixSource(stores["sav"], dataset_type="sav", repeats=0)
    with pytest.raises(MixSpecError, match="named by more than one source"):
        Mixture([MixSource(stores["sav"], dataset_type="x"),
                 MixSource(stores["refcoco"], dataset_type="x")])


def test_mixed_kinds_collate_in_dataloader_workers(mix) -> None:
    loader = DataLoader(mix, batch_size=6, sampler=list(range(3, 9)), collate_fn=mix.collate,
                        num_workers=2, multiprocessing_context="spawn")
    (batch,) = list(loader)  # sav 3..5 and sa1b 0..2 in one batch
    assert set(batch) == {"sav", "sa1b"}
    assert batch["sav"]["image1"].shape == (3, 64, 64, 3)
    assert batch["sav"]["dataset_type"] == ["sav"] * 3
    assert batch["sa1b"]["image"].shape == (3, 3, 1024, 1024)  # collate_distill: boxes as lists
    assert isinstance(batch["sa1b"]["box_prompts_xyxy"], list)
    assert torch.equal(batch["sa1b"]["modality_length"],  # as default_collate gives ints
                       default_collate([1024] * 3))
    same_kind = mix.collate([mix[i] for i in range(3)])
    assert same_kind["dataset_type"] == ["sav"] * 3
    assert len(pickle.dumps(mix)) < 100_000


def test_packed_collate_equals_default_collate_in_workers(mix) -> None:
    """Mixed batches from workers (one shared buffer each) hold exactly what default_collate
    of each kind's items gives in-process."""
    order = list(range(len(mix)))[::-1]
    loader = DataLoader(mix, batch_size=5, sampler=order, collate_fn=mix.collate,
                        num_workers=2, multiprocessing_context="spawn")
    for number, batch in enumerate(loader):
        items = [mix[i] for i in order[number * 5:(number + 1) * 5]]
        groups = batch if "dataset_type" not in batch else {batch["dataset_type"][0]: batch}
        for name, sub in groups.items():
            if name == "sa1b":
                continue  # collate_distill, its own
            members = [{k: v for k, v in i.items() if k not in ("dataset_type",
                                                                 "modality_length")}
                       for i in items if i["dataset_type"] == name]
            expected = default_collate(members)
            assert list(sub)[:len(expected)] == list(expected)
            for key, value in expected.items():
                if isinstance(value, torch.Tensor):
                    assert value.dtype == sub[key].dtype and torch.equal(value, sub[key])
                else:
                    assert value == sub[key]
            lengths = default_collate([i["modality_length"] for i in items
                                       if i["dataset_type"] == name])
            assert sub["modality_length"].dtype == lengths.dtype == torch.int64
            assert torch.equal(sub["modality_length"], lengths)


@pytest.mark.parametrize("indices", [[0, 1, 2], [3, 4, 5, 0], [38, 3, 9, 1, 4, 20],
                                     [9, 10, 11]])
def test_batches_read_together_equal_collate_of_the_items(mix, stores, indices) -> None:
    """One type, several types with their own collates, SA-1B among them: the batch built
    from each source's __getitems__ equals collate of the items read one by one."""
    expected = mix.collate([mix[i] for i in indices])
    read = mix.__getitems__(indices)
    assert isinstance(read, Batched)
    assert_same_values(mix.collate(read), expected, str(indices))
    assert_same_values(list(read), [mix[i] for i in indices], "items")
    twins = Mixture([MixSource(stores["sav"], dataset_type="a"),  # the same keys: one batch
                     MixSource(stores["sav"], dataset_type="b")])
    both = twins.__getitems__([0, 7, 1])
    assert not isinstance(both, Batched)
    assert_same_values(twins.collate(both), twins.collate([twins[i] for i in (0, 7, 1)]))


def test_the_sources_parts_of_a_batch_share_one_buffer(mix) -> None:
    """Every source's batched fields in a mixed batch (the SA-1B boxes' masks too) and each
    part's ``modality_length`` are views of one allocation: from a DataLoader worker the batch
    crosses as one shared-memory segment, as a source's does."""
    indices = [38, 3, 9, 1, 4, 20]
    batch = mix.collate(mix.__getitems__(indices))
    assert set(batch) == set(mix.dataset_types)
    values = [batch[name][key]
              for name, dataset in zip(mix.dataset_types, mix.datasets, strict=True)
              for key in [*(slot.key for slot in dataset.batch_slots()), "modality_length"]]
    # (the boxes' masks are listed)
    storages = {t.untyped_storage().data_ptr()
                for value in values for t in (value if isinstance(value, list) else [value])}
    assert len(storages) == 1
    parts = sources_of(mix, indices)
    for number, name in enumerate(mix.dataset_types):
        assert batch[name]["modality_length"].tolist() == mix.lengths[
            np.asarray(indices)[parts == number]].tolist()


def test_a_store_source_does_not_read_the_values_the_mixture_sets(stores) -> None:
    """The refcoco store holds ``modality_length``; the mixture's items take theirs from the
    mixture, so its source never reads the stored one (item by item or in a batch)."""
    mixture = Mixture([MixSource(stores["refcoco"], dataset_type="refcoco", repeats=2)])
    source = mixture.datasets[0]
    assert "modality_length" in source.reader.schema
    assert "modality_length" not in source.fields
    assert "modality_length" not in source[0]
    assert "modality_length" not in [slot.key for slot in source.batch_slots()]
    stored = SampleReader(stores["refcoco"]).column("modality_length")
    assert [mixture[i]["modality_length"] for i in range(len(mixture))] == list(stored) * 2
    batch = mixture.collate(mixture.__getitems__([0, 8, 3]))
    assert batch["modality_length"].tolist() == [stored[0], stored[1], stored[3]]
    assert batch["dataset_type"] == ["refcoco"] * 3


class Pairs(Dataset):
    """Items that are not dicts, one at a time or several at once."""

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> tuple:
        return (index, index)

    def __getitems__(self, indices) -> list:
        return [self[i] for i in indices]


def test_a_source_of_non_dict_items_is_a_clear_error() -> None:
    mixture = Mixture([MixSource(Pairs(), dataset_type="pairs")])
    with pytest.raises(TypeError, match="'pairs' returned a tuple; mixture sources return"):
        mixture[0]
    with pytest.raises(TypeError, match="'pairs' returned a tuple"):
        mixture.__getitems__([0, 1])


def test_toml_and_describe(stores, tmp_path) -> None:
    toml = tmp_path / "mix.toml"
    toml.write_text(source_table(stores["sav"], "sav", modality_length=512)
                    + source_table(stores["refcoco"], "refcoco", repeats=4, weight=3)
                    + source_table("openimages.zarr", "openimages", required=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixture = Mixture.from_toml(toml)
    assert len(mixture) == 6 + 28 and mixture.missing == [str(tmp_path / "openimages.zarr")]
    result = run_cli("mix", "describe", str(toml))
    assert result.exit_code == 0, result.output
    for text in ("sav", "refcoco", "npz", "82.4%", "17.6%", "missing", "openimages",
                 "optional source missing"):
        assert text in result.output, text
    toml.write_text(toml.read_text().replace("required = false", "required = true"))
    result = run_cli("mix", "describe", str(toml))
    assert result.exit_code == 1 and "required source missing" in result.output
    toml.write_text('[[source]]\npath = "x"\ndataset_type = "y"\nrepeat = 2\n')
    result = run_cli("mix", "describe", str(toml))
    assert result.exit_code == 1 and "unknown keys ['repeat']" in result.output


def test_training_loop_over_a_toml_mixture_with_length_grouping(stores, tmp_path) -> None:
    """What a training script does: Mixture.from_toml + LengthGroupedSampler + DataLoader with
    mix.collate, and the lengths of each batch as the tensor default_collate gives (it was a
    list, and ``.tolist()`` failed)."""
    toml = tmp_path / "mix.toml"
    toml.write_text(source_table(stores["sav"], "sav", modality_length=512)
                    + source_table(stores["sa1b"], "sa1b", item="distill", modality_length=1024)
                    + source_table(stores["refcoco"], "refcoco", repeats=2))
    mixture = Mixture.from_toml(toml)
    sampler = LengthGroupedSampler(mixture, batch_size=4, world_size=1, rank=0, seed=42)
    loader = DataLoader(mixture, batch_size=4, sampler=sampler, collate_fn=mixture.collate,
                        num_workers=2)
    seen = 0
    for batch in loader:
        groups = batch if "dataset_type" not in batch else {batch["dataset_type"][0]: batch}
        for name, sub in groups.items():
            lengths = sub["modality_length"].tolist()
            assert len(lengths) == len(sub["dataset_type"]) and set(sub["dataset_type"]) == {name}
            seen += len(lengths)
            if name == "sa1b":  # the seed-000 item dict, batched by collate_distill
                assert sub["image"].shape[1:] == (3, 1024, 1024) and "teacher_features" in sub
                assert lengths == [1024] * len(lengths)
    assert seen == len(mixture) == 6 + 5 + 14


def test_sampler_takes_both_reference_spellings(mix) -> None:
    """Seed 004's script (batch_size=, world_size=, rank=, seed=) and xtuner's config
    (per_device_batch_size=, length_property=) give the same sampler."""
    script = LengthGroupedSampler(mix, batch_size=4, world_size=2, rank=1, seed=42)
    xtuner = LengthGroupedSampler(mix, per_device_batch_size=4, world_size=2, rank=1, seed=42,
                                  length_property="modality_length")
    assert list(script) == list(xtuner) and len(script) == (len(mix) + 1) // 2
    by_column = LengthGroupedSampler(Lengths([3, 1, 2, 5]), batch_size=2,
                                     length_property="modality_lengths")
    assert sorted(by_column) == [0, 1, 2, 3]
    with pytest.raises(OptionError, match="disagree"):
        LengthGroupedSampler(mix, per_device_batch_size=4, batch_size=8)
    with pytest.raises(OptionError, match="needs per_device_batch_size"):
        LengthGroupedSampler(mix)
    with pytest.raises(OptionError, match=r"no per-sample lengths.*'length'"):
        LengthGroupedSampler(Pairs(), batch_size=2, length_property="length")


@pytest.mark.parametrize(("line", "message"), [
    ('required = "no"', "required must be true or false, got 'no'"),
    ("weight = inf", "weight must be a finite number > 0, got inf"),
    ("weight = nan", "weight must be a finite number > 0, got nan"),
    ("weight = true", "weight must be a number, got True"),
    ('repeats = "4"', "repeats must be an integer, got '4'"),
    ("repeats = 1.5", "repeats must be an integer, got 1.5"),
    ("modality_length = 5.0", "modality_length must be an integer"),
    ('fields = "image"', "fields must be a list of strings"),
    ("fields = [1, 2]", "fields must be a list of strings"),
    ('backend = 3', "backend must be a string"),
    ('item = "dict"', "item must be one of ('fields', 'distill'), got 'dict'"),
])
def test_toml_values_are_checked_for_type_and_range(tmp_path, line, message) -> None:
    toml = tmp_path / "mix.toml"
    toml.write_text(f'[[source]]\npath = "a.zarr"\ndataset_type = "a"\n{line}\n')
    with pytest.raises(MixSpecError, match=re.escape(message)):
        read_mix_toml(toml)
    result = run_cli("mix", "describe", str(toml))
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_toml_that_is_not_text_or_not_tables(tmp_path) -> None:
    toml = tmp_path / "mix.toml"
    toml.write_bytes(b'[[source]]\npath = "\xff\xfe.zarr"\n')
    with pytest.raises(MixSpecError, match="not UTF-8 text"):
        read_mix_toml(toml)
    toml.write_text('source = ["a", "b"]\n')
    with pytest.raises(MixSpecError, match="source 1 is not a table"):
        read_mix_toml(toml)
    with pytest.raises(MixSpecError, match="is a folder"):
        read_mix_toml(tmp_path)
    with pytest.raises(MixSpecError, match="'fields' applies to item"):
        MixSource("a.zarr", dataset_type="a", item="distill", fields=("image",))
