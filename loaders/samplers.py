"""Samplers over a :class:`~arraystore.loaders.mixture.Mixture` (or any dataset with ``lengths``),
for distributed training, seeded, resumable mid-epoch.

Both compute an epoch's indices with NumPy from the lengths and source sizes alone (no per-index
Python object: 10^7 indices are an int32 array), and yield this rank's share from a position.
``state_dict()`` holds the epoch and that position (a few numbers, whatever the epoch's size);
``load_state_dict()`` then makes the next ``iter()`` yield exactly the rest of that epoch. With a
DataLoader that prefetches, save the position of what training consumed:
``state_dict(position=batches_done * batch_size)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from arraystore.errors import OptionError

SORT_BLOCK = 1 << 20  # megabatches are sorted this many indices at a time (bounded memory)


class _ResumableSampler(Sampler[int]):
    """Epoch, position and the rank's share; subclasses compute an epoch's global indices."""

    def __init__(self, world_size: int, rank: int, seed: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise OptionError(f"rank {rank} is not in [0, world_size={world_size})")
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.epoch = 0
        self.position = 0  # indices of this epoch handed out by this rank
        self._resume_at = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_indices(self) -> np.ndarray:
        """All ranks' indices of this epoch, padded to a multiple of ``world_size``."""
        raise NotImplementedError

    def rank_indices(self) -> np.ndarray:
        """This rank's indices of this epoch: every ``world_size``-th from ``rank``."""
        return self.epoch_indices()[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        indices = self.rank_indices()
        start, self._resume_at = self._resume_at, 0
        for self.position, index in enumerate(indices[start:], start + 1):
            yield int(index)

    def state_dict(self, position: int | None = None) -> dict[str, int]:
        """Where this rank stands: epoch, and how many of its indices were consumed (by
        default, how many it handed out)."""
        return {"epoch": self.epoch, "position": self.position if position is None else position,
                "seed": self.seed, "world_size": self.world_size, "rank": self.rank}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the next ``iter()`` yields this rank's rest of ``state['epoch']``."""
        for key in ("seed", "world_size"):
            if state[key] != getattr(self, key):
                raise OptionError(f"the saved sampler state has {key}={state[key]}, this "
                                  f"sampler {getattr(self, key)}: resume with the same settings")
        self.epoch = int(state["epoch"])
        self.position = self._resume_at = int(state["position"])


def _sorted_megabatches(lengths: np.ndarray, members: np.ndarray | None, group: int,
                        rng: np.random.Generator, absolute: bool = False) -> np.ndarray:
    """``members`` (int32 indices into ``lengths``; default: all of them) shuffled, cut into
    megabatches of ``group`` and each sorted by length (``absolute``: by its absolute value),
    largest first (stable: ties keep their random order). Works in place on ``members``: the
    shuffle makes the same swaps as ``rng.permutation(len(members))`` would, and sort keys are
    gathered a block of megabatches at a time, so memory stays one int32 per index."""
    order = np.arange(len(lengths), dtype=np.int32) if members is None else members
    rng.shuffle(order)
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


def length_grouped_indices(lengths: np.ndarray, group: int,
                           rng: np.random.Generator) -> np.ndarray:
    """The reference recipe's (xtuner's) order: megabatches of ``group`` random indices, each
    sorted by length descending. When positive (multimodal) and negative (text-only) lengths
    mix, each kind is cut into megabatches on its own (by absolute length); the megabatches of
    both, but for each kind's last, are shuffled together; the two last ones go at the end as
    one megabatch sorted by absolute length. Returns int32 indices."""
    lengths = np.asarray(lengths)
    positive = lengths > 0
    if not (positive | (lengths < 0)).all():
        raise OptionError("modality lengths must not be 0 (negative: text-only samples)")
    if positive.all() or not positive.any():  # one kind: by the length itself, as the
        return _sorted_megabatches(lengths, None, group, rng)  # reference does (-1 before -9)
    everything = np.arange(len(lengths), dtype=np.int32)
    kinds = [everything[positive], everything[~positive]]
    del everything, positive
    pieces, lasts = [], []
    for members in kinds:
        ordered = _sorted_megabatches(lengths, members, group, rng, absolute=True)
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


class LengthGroupedSampler(_ResumableSampler):
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
    world_size=W, rank=r, seed=42)`` (the mixing training script).
    """

    def __init__(self, dataset: Any, per_device_batch_size: int | None = None,
                 world_size: int = 1, rank: int = 0, seed: int = 0,
                 mega_batch_mult: int | None = None, lengths: np.ndarray | None = None, *,
                 batch_size: int | None = None,
                 length_property: str = "modality_length") -> None:
        super().__init__(world_size, rank, seed)
        per_device_batch_size = _batch_size(per_device_batch_size, batch_size)
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

    def epoch_indices(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed + self.epoch)
        indices = length_grouped_indices(self.lengths, self.group, rng)
        if len(indices) == self.total_size:
            return indices
        return np.resize(indices, self.total_size)  # pads by repeating from the start


class WeightedSourceSampler(_ResumableSampler):
    """Draws ``num_samples`` indices of a :class:`Mixture` per epoch: a source by weight, then
    a sample of it.

    Per epoch (seed ``(seed, epoch)``, the same on every rank): each source gets its share of
    the draws, ``num_samples * weight / sum(weights)`` rounded by largest remainder, and the
    sources' draws are shuffled together; within a source, samples are drawn without
    replacement (a permutation of its samples, another once it is used up). Rank ``r`` takes
    every ``world_size``-th draw from ``r``: the ranks' streams are disjoint. ``weights`` maps
    ``dataset_type`` to weight (default: each source's ``weight``, else 1); a source's repeats
    are ignored here (weights replace them).
    """

    def __init__(self, mixture: Any, weights: Mapping[str, float] | None = None,
                 num_samples: int | None = None, world_size: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        super().__init__(world_size, rank, seed)
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
        self.sizes = np.asarray(mixture.sizes, np.int64)
        self.offsets = np.asarray(mixture.offsets[:-1], np.int64)
        total = int(num_samples if num_samples is not None else len(mixture))
        self.num_samples = math.ceil(total / world_size)
        self.total_size = self.num_samples * world_size

    def __len__(self) -> int:
        return self.num_samples

    def draws_per_source(self) -> np.ndarray:
        """How many of an epoch's draws each source gets (largest-remainder rounding)."""
        exact = self.total_size * self.weights / self.weights.sum()
        counts = np.floor(exact).astype(np.int64)
        short = self.total_size - int(counts.sum())
        counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
        return counts

    def epoch_indices(self) -> np.ndarray:
        rng = np.random.default_rng((self.seed, self.epoch))
        counts = self.draws_per_source()
        which = np.repeat(np.arange(len(counts), dtype=np.min_scalar_type(len(counts))), counts)
        rng.shuffle(which)
        wide = int(self.offsets[-1] + self.sizes[-1]) >= 2**31
        indices = np.empty(self.total_size, np.int64 if wide else np.int32)
        for source, count in enumerate(int(c) for c in counts):
            if not count:
                continue
            size = int(self.sizes[source])
            permutation = np.arange(size, dtype=indices.dtype) + self.offsets[source]
            local = np.empty(count, indices.dtype)
            for start in range(0, count, size):  # a fresh permutation per pass over it
                rng.shuffle(permutation)
                local[start:start + size] = permutation[:count - start]
            indices[which == source] = local
        return indices
