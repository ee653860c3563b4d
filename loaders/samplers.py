"""Samplers over a :class:`~arraystore.loaders.mixture.Mixture` (or any dataset with ``lengths``),
for distributed training, seeded, resumable anywhere.

Both compute an epoch's indices with NumPy from the lengths and source sizes alone (no per-index
Python object: 10^7 indices are an int32 array), and yield this rank's share from a position.
They follow torchdata's ``Stateful`` protocol: ``state_dict()`` holds the epoch, the position and
a few numbers per source (:mod:`arraystore.loaders.resume`), whatever the epoch's size;
``load_state_dict()`` makes the next iteration of that epoch yield exactly its rest -- also on
another world size, and with sources added, removed, reweighted or grown (each change is warned
about and handled as :func:`arraystore.loaders.resume.changes` says).

What was consumed, not what was prefetched: under torchdata's ``StatefulDataLoader`` the saved
position is that of the batches the training loop received. Under a plain DataLoader (which
prefetches), pass it: ``state_dict(position=batches_done * batch_size)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from arraystore.errors import OptionError
from arraystore.loaders.resume import (
    STATE_MARK,
    STATE_VERSION,
    MixtureChangedWarning,
    Source,
    carry_over,
    changes,
    check_unchanged,
    extent,
    find_state,
    marks,
    pad,
    remainder,
    sources_of,
)

SORT_BLOCK = 1 << 20  # megabatches are sorted this many indices at a time (bounded memory)


class ResumableSampler(Sampler[int]):
    """Epoch, position, stages and the rank's share; subclasses compute an epoch's global
    indices from recorded sources (:meth:`_base`)."""

    def __init__(self, world_size: int, rank: int, seed: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise OptionError(f"rank {rank} is not in [0, world_size={world_size})")
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.epoch = 0
        self.position = 0  # indices of this stage of the epoch handed out by this rank
        self._stages: list[dict[str, Any]] | None = None  # of the iteration under way
        self._loaded: tuple[int, list[dict[str, Any]], np.ndarray] | None = None
        self._marks: list[dict[str, Any]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _sources(self) -> list[Source]:
        raise NotImplementedError

    def _recorded(self) -> list[dict[str, Any]]:
        """The present sources as a state records them (digests computed once)."""
        if self._marks is None:
            self._marks = marks(self._sources())
        return self._marks

    def _base_parameters(self) -> dict[str, Any]:
        """What besides the sources decides an epoch's order (recorded in the first stage)."""
        raise NotImplementedError

    def _base(self, stage: Mapping[str, Any] | None, sources: list[Source],
              epoch: int) -> np.ndarray | None:
        """Epoch ``epoch``'s global order as ``stage`` (a first stage; ``None``: a fresh one)
        drew it, from the present ``sources``; ``None`` if that order cannot be rebuilt without
        a source now gone."""
        raise NotImplementedError

    def epoch_indices(self) -> np.ndarray:
        """All ranks' indices of this epoch, padded to a multiple of ``world_size``."""
        return pad(self._base(None, self._sources(), self.epoch), self.world_size)

    def rank_indices(self) -> np.ndarray:
        """This rank's indices of this epoch: every ``world_size``-th from ``rank``."""
        return self.epoch_indices()[self.rank::self.world_size]

    def _fresh_stage(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "consumed": 0, "sources": self._recorded(),
                **self._base_parameters()}

    def __iter__(self) -> Iterator[int]:
        loaded, self._loaded = self._loaded, None
        if loaded is not None and loaded[0] != self.epoch:
            warnings.warn(f"{type(self).__name__}: a state of epoch {loaded[0]} was loaded, "
                          f"then set_epoch({self.epoch}); epoch {self.epoch} starts from its "
                          f"beginning", stacklevel=2)
            loaded = None
        if loaded is None:
            self._stages = None  # one stage, recorded when a state is asked for
            stream, start = self.epoch_indices(), 0
        else:
            _, self._stages, stream = loaded
            start = self._stages[-1]["consumed"] // self.world_size
        self.position = start
        for index in stream[start * self.world_size + self.rank::self.world_size]:
            self.position += 1
            yield int(index)

    def state_dict(self, position: int | None = None) -> dict[str, Any]:
        """Where the job stands in this epoch. ``position``: this rank's indices consumed in
        the epoch's current stage (by default, how many this rank handed out: under a
        plain DataLoader that counts its prefetched batches too, so pass
        ``batches_done * batch_size``)."""
        position = self.position if position is None else int(position)
        stages = [dict(s) for s in (self._stages or [self._fresh_stage()])]
        stages[-1]["consumed"] = position * self.world_size
        return {STATE_MARK: STATE_VERSION, "sampler": type(self).__name__, "epoch": self.epoch,
                "seed": self.seed, "world_size": self.world_size, "rank": self.rank,
                "position": position, "stages": stages}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next iteration of ``state``'s epoch yields this rank's share of the
        epoch's rest (``state``: this sampler's, or any state holding one, such as a
        ``StatefulDataLoader``'s). Another world size or changed sources are fine; a source
        whose samples changed under the state raises
        :class:`~arraystore.loaders.resume.StoreChangedError`."""
        state = find_state(state, type(self).__name__)
        if state["seed"] != self.seed:
            raise OptionError(f"the saved sampler state has seed={state['seed']}, this sampler "
                              f"{self.seed}: resume with the same seed")
        epoch, stages = int(state["epoch"]), [dict(s) for s in state["stages"]]
        sources = self._sources()
        check_unchanged(stages, sources, self._recorded())
        last = stages[-1]
        if last["world_size"] == self.world_size and last["sources"] == self._recorded():
            base = self._base(stages[0], sources, epoch)  # the last stage goes on where it stopped
            stream = np.empty(0, np.int64) if base is None else pad(
                remainder(base, [*stages[:-1], {**last, "consumed": 0}]), self.world_size)
        else:  # a new stage: the rest, carried over to the present sources and world size
            stream = pad(self._rest(epoch, stages, sources), self.world_size)
            stages.append({"world_size": self.world_size, "consumed": 0,
                           "sources": self._recorded()})
        self._loaded = (epoch, stages, stream)
        self._stages = stages  # a state asked for before the next iteration is this one
        self.epoch, self.position = epoch, stages[-1]["consumed"] // self.world_size

    def _rest(self, epoch: int, stages: list[dict[str, Any]],
              sources: list[Source]) -> np.ndarray:
        """The epoch's unconsumed indices in the present sources' numbering, after warning
        about every change of sources."""
        base = self._base(stages[0], sources, epoch)
        if base is None:
            said = changes(stages[-1]["sources"], self._recorded(), {}, epoch)
            warnings.warn(MixtureChangedWarning(
                f"{type(self).__name__}: the order of epoch {epoch} cannot be rebuilt without "
                f"the sources now gone ({'; '.join(said)}), so epoch {epoch} ends where it was "
                f"saved; the next epoch draws from the present sources"), stacklevel=3)
            return np.empty(0, np.int64)
        rest, dropped = carry_over(remainder(base, stages), stages[-1]["sources"],
                                   self._recorded())
        said = changes(stages[-1]["sources"], self._recorded(), dropped, epoch)
        if said:
            warnings.warn(MixtureChangedWarning(f"{type(self).__name__}: resuming epoch "
                                                f"{epoch} with other sources: "
                                                + "; ".join(said)), stacklevel=3)
        return rest


Locality = tuple[int, int] | None  # (samples per block, blocks per window), or fully random


def shuffle(order: np.ndarray, rng: np.random.Generator, locality: Locality = None) -> None:
    """Shuffle ``order`` in place: fully (``locality`` None: ``rng.shuffle``), or keeping
    neighbours near (``(block, window)``: ``order``'s runs of ``block`` entries -- samples
    that sit in one shard when ``order`` is ascending -- put in random order, then the entries
    shuffled within each run of ``window`` blocks). ``window`` is the knob: 1 reads a block's
    samples one after another (shard-sequential, in random order), larger mixes more blocks,
    and a window as large as the order is a full shuffle."""
    if locality is None:
        rng.shuffle(order)
        return
    block, window = locality
    count = len(order)
    blocks = -(-count // block)
    starts = rng.permutation(blocks).astype(np.int64) * block
    sizes = np.minimum(starts + block, count) - starts
    first = np.repeat(np.cumsum(sizes) - sizes, sizes)  # where each entry's block begins
    source = np.repeat(starts, sizes) + (np.arange(count) - first)
    keys = np.repeat(np.arange(blocks) // window, sizes) + rng.random(count)
    order[:] = order[source[np.argsort(keys, kind="stable")]]


def check_locality(locality: Locality) -> Locality:
    if locality is not None and (len(locality) != 2 or min(locality) < 1):
        raise OptionError(f"locality={locality!r}: give (samples per block, blocks per window), "
                          f"both >= 1, or None for a full shuffle")
    return None if locality is None else (int(locality[0]), int(locality[1]))


def _sorted_megabatches(lengths: np.ndarray, members: np.ndarray | None, group: int,
                        rng: np.random.Generator, absolute: bool = False,
                        locality: Locality = None) -> np.ndarray:
    """``members`` (int32 indices into ``lengths``; default: all of them) shuffled, cut into
    megabatches of ``group`` and each sorted by length (``absolute``: by its absolute value),
    largest first (stable: ties keep their random order). Works in place on ``members``: the
    shuffle makes the same swaps as ``rng.permutation(len(members))`` would, and sort keys are
    gathered a block of megabatches at a time, so memory stays one int32 per index.
    ``locality``: see :func:`shuffle`."""
    order = np.arange(len(lengths), dtype=np.int32) if members is None else members
    shuffle(order, rng, locality)
    step = max(group, (SORT_BLOCK // group) * group)
    for start in range(0, len(order), step):  # blocks of whole megabatches
        block = order[start:start + step]
        keys = -np.abs(lengths[block]) if absolute else -lengths[block]
        rows = len(block) // group
        if rows:
            full = block[:rows * group].reshape(rows, group)
            within = np.argsort(keys[:rows * group].reshape(rows, group), axis=1, kind="stable")
            block[:rows * group] = np.take_along_axis(full, within, axis=1).ravel()
        tail = slice(rows * group, len(block))
        block[tail] = block[tail][np.argsort(keys[tail], kind="stable")]
    return order


def length_grouped_indices(lengths: np.ndarray, group: int, rng: np.random.Generator,
                           locality: Locality = None) -> np.ndarray:
    """The reference recipe's (xtuner's) order: megabatches of ``group`` random indices, each
    sorted by length descending. When positive (multimodal) and negative (text-only) lengths
    mix, each kind is cut into megabatches on its own (by absolute length); the megabatches of
    both, but for each kind's last, are shuffled together; the two last ones go at the end as
    one megabatch sorted by absolute length. Returns int32 indices. ``locality``: megabatches
    of neighbouring samples (:func:`shuffle`) instead of random ones."""
    lengths = np.asarray(lengths)
    positive = lengths > 0
    if not (positive | (lengths < 0)).all():
        raise OptionError("modality lengths must not be 0 (negative: text-only samples)")
    if positive.all() or not positive.any():  # one kind: by the length itself, as the
        return _sorted_megabatches(lengths, None, group, rng,  # reference does (-1 before -9)
                                   locality=locality)
    everything = np.arange(len(lengths), dtype=np.int32)
    kinds = [everything[positive], everything[~positive]]
    del everything, positive
    pieces, lasts = [], []
    for members in kinds:
        ordered = _sorted_megabatches(lengths, members, group, rng, absolute=True,
                                      locality=locality)
        cut = ((len(ordered) - 1) // group) * group  # the last megabatch, short or whole
        pieces += np.split(ordered[:cut], range(group, cut, group)) if cut else []
        lasts.append(ordered[cut:])
    shuffled = [pieces[i] for i in rng.permutation(len(pieces))]
    last = np.concatenate(lasts)
    last = last[np.argsort(-np.abs(lengths[last]), kind="stable")]
    return np.concatenate([*shuffled, last])


def _batch_size(per_device_batch_size: int | None, batch_size: int | None) -> int:
    """The per-device batch size, given under xtuner's name or the training scripts' one."""
    if per_device_batch_size is None and batch_size is None:
        raise OptionError("LengthGroupedSampler needs per_device_batch_size= (or batch_size=)")
    if None not in (per_device_batch_size, batch_size) and per_device_batch_size != batch_size:
        raise OptionError(f"per_device_batch_size={per_device_batch_size} and batch_size="
                          f"{batch_size} disagree: give one of them")
    return int(per_device_batch_size if per_device_batch_size is not None else batch_size)


def dataset_lengths(dataset: Any, length_property: str) -> Any:
    """A dataset's per-sample lengths: its ``lengths`` (a :class:`Mixture`'s), else its
    attribute ``length_property``, else its column of that name (a Hugging Face dataset's
    ``dataset["modality_length"]``)."""
    if getattr(dataset, "lengths", None) is not None:
        return dataset.lengths
    if getattr(dataset, length_property, None) is not None:
        return getattr(dataset, length_property)
    column_names = getattr(dataset, "column_names", None)
    if column_names is not None and length_property in column_names:
        return dataset[length_property]
    raise OptionError(f"{type(dataset).__name__} has no per-sample lengths: neither .lengths nor "
                      f"{length_property!r} (pass length_property= or lengths=)")


class LengthGroupedSampler(ResumableSampler):
    """Batches of similar ``modality_length`` (xtuner's ``LengthGroupedSampler``).

    Per epoch: a permutation seeded by ``seed + epoch``; megabatches of ``mega_batch_mult x
    world_size x per_device_batch_size`` indices (``mega_batch_mult`` defaults to
    ``min(N // (4 * world_size * per_device_batch_size), 50)``, at least 1), each sorted by
    length descending, positive and negative lengths grouped apart (see
    :func:`length_grouped_indices`); the epoch padded to a multiple of ``world_size`` by
    repeating it from the start; rank ``r`` takes every ``world_size``-th index from ``r``. The
    lengths are ``dataset.lengths`` (a :class:`Mixture`'s) unless given (see
    :func:`dataset_lengths`). Drop-in for both spellings of the reference code:
    ``LengthGroupedSampler(dataset, per_device_batch_size=8, length_property=
    "modality_length")`` (xtuner) and ``LengthGroupedSampler(dataset, batch_size=8,
    world_size=W, rank=r, seed=42)`` (the mixing training script). ``locality=(block,
    window)`` draws megabatches of neighbouring samples (blocks of ``block`` consecutive
    indices -- a shard's samples -- shuffled within windows of ``window`` blocks, see
    :func:`shuffle`): fewer objects per batch from an object store, less random batches.
    """

    def __init__(self, dataset: Any, per_device_batch_size: int | None = None,
                 world_size: int = 1, rank: int = 0, seed: int = 0,
                 mega_batch_mult: int | None = None, lengths: np.ndarray | None = None, *,
                 batch_size: int | None = None,
                 length_property: str = "modality_length", locality: Locality = None) -> None:
        super().__init__(world_size, rank, seed)
        self.locality = check_locality(locality)
        per_device_batch_size = _batch_size(per_device_batch_size, batch_size)
        self.dataset = dataset
        self.lengths = np.asarray(dataset_lengths(dataset, length_property)
                                  if lengths is None else lengths)
        n = len(self.lengths)
        if per_device_batch_size < 1 or n == 0:
            raise OptionError(f"per_device_batch_size ({per_device_batch_size}) and the number "
                              f"of samples ({n}) must be >= 1")
        total_batch = per_device_batch_size * world_size
        if mega_batch_mult is None:
            mega_batch_mult = max(1, min(n // (4 * total_batch), 50))
        self.group = mega_batch_mult * total_batch
        self.num_samples = math.ceil(n / world_size)
        self.total_size = self.num_samples * world_size

    def __len__(self) -> int:
        return self.num_samples

    def _sources(self) -> list[Source]:
        return sources_of(self.dataset, self.lengths)

    def _base_parameters(self) -> dict[str, Any]:
        return {"group": self.group, "locality": self.locality}

    def _base(self, stage: Mapping[str, Any], sources: list[Source],
              epoch: int) -> np.ndarray | None:
        lengths = self.lengths if stage is None or stage["sources"] == self._recorded() \
            else _recorded_lengths(stage["sources"], sources)
        if lengths is None:
            return None
        group, locality = (self.group, self.locality) if stage is None \
            else (stage["group"], _locality(stage))
        return length_grouped_indices(lengths, group, np.random.default_rng(self.seed + epoch),
                                      locality)


def _recorded_lengths(recorded: Sequence[Mapping[str, Any]],
                      sources: Sequence[Source]) -> np.ndarray | None:
    """The lengths the recorded sources had, from the present ones (their first ``size``
    samples, which :func:`~arraystore.loaders.resume.check_unchanged` vouched for); ``None`` if
    a recorded source is gone."""
    by_name = {s.name: s for s in sources}
    if any(m["name"] not in by_name for m in recorded):
        return None
    return np.concatenate([np.tile(by_name[m["name"]].lengths[:m["size"]], m["repeats"])
                           for m in recorded])


class WeightedSourceSampler(ResumableSampler):
    """Draws ``num_samples`` indices of a :class:`Mixture` per epoch: a source by weight, then
    a sample of it.

    Per epoch (seed ``(seed, epoch)``, the same on every rank): each source gets its share of
    the draws, ``num_samples * weight / sum(weights)`` rounded by largest remainder, and the
    sources' draws are shuffled together; within a source, samples are drawn without
    replacement (a permutation of its samples, another once it is used up). Rank ``r`` takes
    every ``world_size``-th draw from ``r``: the ranks' streams are disjoint. ``weights`` maps
    ``dataset_type`` to weight (default: each source's ``weight``, else 1); a source's repeats
    are ignored here (weights replace them). ``locality=(block, window)``: each source's
    samples drawn near their neighbours (:func:`shuffle`).
    """

    def __init__(self, mixture: Any, weights: Mapping[str, float] | None = None,
                 num_samples: int | None = None, world_size: int = 1, rank: int = 0,
                 seed: int = 0, locality: Locality = None) -> None:
        super().__init__(world_size, rank, seed)
        self.locality = check_locality(locality)
        types = list(mixture.dataset_types)
        weights = dict(weights) if weights is not None else {
            s.dataset_type: s.weight if s.weight is not None else 1.0 for s in mixture.sources}
        unknown = sorted(set(weights) - set(types))
        if unknown:
            raise OptionError(f"weights for {unknown}, which the mixture does not hold "
                              f"(present: {types}; missing optional sources take no weight)")
        self.weights = np.array([float(weights.get(t, 0.0)) for t in types])
        if (self.weights < 0).any() or not self.weights.sum() > 0:
            raise OptionError(f"weights must be >= 0 and not all 0, got {weights}")
        self.mixture = mixture
        total = int(num_samples if num_samples is not None else len(mixture))
        self.num_samples = math.ceil(total / world_size)
        self.total_size = self.num_samples * world_size

    def __len__(self) -> int:
        return self.num_samples

    def draws_per_source(self) -> np.ndarray:
        """How many of an epoch's draws each source gets (largest-remainder rounding)."""
        return _draws_per_source(self.weights, self.total_size)

    def _sources(self) -> list[Source]:
        return sources_of(self.mixture, np.asarray(self.mixture.lengths))

    def _recorded(self) -> list[dict[str, Any]]:
        if self._marks is None:
            self._marks = marks(self._sources(), self.weights)
        return self._marks

    def _base_parameters(self) -> dict[str, Any]:
        return {"draws": self.total_size, "locality": self.locality}

    def _base(self, stage: Mapping[str, Any] | None, sources: list[Source],
              epoch: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, epoch))
        if stage is None:
            return weighted_draws([s.size for s in sources], [s.offset for s in sources],
                                  self.weights, self.total_size, rng, self.locality)
        recorded = stage["sources"]
        return weighted_draws([m["size"] for m in recorded], extent(recorded)[:-1],
                              np.array([m["weight"] for m in recorded]), stage["draws"], rng,
                              _locality(stage))


def _locality(stage: Mapping[str, Any]) -> Locality:
    """A recorded stage's locality (a list once the state went through JSON)."""
    recorded = stage["locality"]
    return None if recorded is None else (int(recorded[0]), int(recorded[1]))


def _draws_per_source(weights: np.ndarray, draws: int) -> np.ndarray:
    exact = draws * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    short = draws - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def weighted_draws(sizes: Sequence[int], offsets: Sequence[int], weights: np.ndarray,
                   draws: int, rng: np.random.Generator,
                   locality: Locality = None) -> np.ndarray:
    """``draws`` global indices: each source's share by weight (largest remainder), the
    sources' draws shuffled together, a source's samples without replacement until it is used
    up (a fresh permutation per pass, :func:`shuffle` with ``locality``). int32 unless the
    indices need more."""
    counts = _draws_per_source(weights, draws)
    which = np.repeat(np.arange(len(counts), dtype=np.min_scalar_type(len(counts))), counts)
    rng.shuffle(which)
    wide = int(offsets[-1] + sizes[-1]) >= 2**31
    indices = np.empty(draws, np.int64 if wide else np.int32)
    for source, count in enumerate(int(c) for c in counts):
        if not count:
            continue
        size = int(sizes[source])
        first = int(offsets[source])
        permutation = np.arange(first, first + size, dtype=indices.dtype)  # one array, no sum
        # one pass: the permutation's first draws themselves (no copy of a 10^7 source)
        local = permutation[:count] if count <= size else np.empty(count, indices.dtype)
        for start in range(0, count, size):  # a fresh permutation per pass over it
            if locality is not None:
                permutation.sort()  # neighbours are neighbouring samples again
            shuffle(permutation, rng, locality)
            if count > size:
                local[start:start + size] = permutation[:count - start]
        indices[which == source] = local
    return indices
