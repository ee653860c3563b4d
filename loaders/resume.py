"""Where an epoch stands, across restarts, world sizes and changed mixtures.

A sampler's saved state names the epoch, the seed, and a list of *stages*: the world size that
drew from the epoch, how many of its global indices the job had consumed, and the sources it drew
from (name, size, repeats, a digest of their ids and lengths). The epoch's order is rebuilt from
the first stage's sources (it is a function of the seed, the epoch and those numbers); each later
stage drew from what its predecessor left, carried over to its own sources. Resuming on another
world size or with another mixture adds a stage; resuming unchanged continues the last one, index
for index. The state stays a few numbers per stage whatever the epoch's size.

Ranks advance in lockstep, so one rank's position ``p`` in a stage of ``W`` ranks says the job
consumed the stage's first ``p * W`` indices; every rank's state says the same.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

from arraystore.errors import ArrayStoreError, OptionError
from arraystore.reader import SampleReader

STATE_MARK = "arraystore_sampler"  # the key that tells a sampler's state inside a loader's
STATE_VERSION = 1


class StoreChangedError(ArrayStoreError, ValueError):
    """A saved sampler state was drawn from samples that are no longer there as they were (a
    store rewritten, reordered or shrunk): resuming would mix two epochs' orders."""


class MixtureChangedWarning(UserWarning):
    """A sampler state was loaded into a mixture whose sources differ from the saved ones; the
    message says what the rest of the epoch does about each difference."""


@dataclass(frozen=True)
class Source:
    """One source of what a sampler draws from, as it is now."""

    name: str
    size: int  # samples, one copy
    repeats: int
    offset: int  # its first global index
    lengths: np.ndarray  # per sample, one copy
    dataset: Any  # whose sample ids the digest hashes, read only then (a store's reader)
    where: str  # a path or a type name, for messages

    def digest(self, count: int) -> str:
        """A short hash of the first ``count`` samples' ids and lengths: equal digests mean
        the samples a state was drawn from are still there, in the same order."""
        hashed = hashlib.blake2b(digest_size=8)
        hashed.update(np.ascontiguousarray(self.lengths[:count], "<i8").tobytes())
        reader = getattr(self.dataset, "reader", None)
        if isinstance(reader, SampleReader):  # ids read here: an epoch drawn afresh needs none
            hashed.update(reader.sample_ids.prefix_digest(count).encode())
        return hashed.hexdigest()

    def label(self) -> str:
        return f"mixture source {self.name!r} ({self.where})" if self.name \
            else f"the dataset ({self.where})"


def sources_of(dataset: Any, lengths: np.ndarray) -> list[Source]:
    """The sources of a :class:`~arraystore.loaders.Mixture`, or the dataset as one source."""
    from arraystore.loaders.mixture import Mixture

    if not isinstance(dataset, Mixture):
        return [Source("", len(lengths), 1, 0, lengths, dataset, type(dataset).__name__)]
    found = []
    for number, (source, member) in enumerate(zip(dataset.sources, dataset.datasets,
                                                  strict=True)):
        offset, size = int(dataset.offsets[number]), int(dataset.sizes[number])
        where = os.fspath(source.source) if isinstance(source.source, str | os.PathLike) \
            else type(source.source).__name__
        found.append(Source(source.dataset_type, size, source.repeats, offset,
                            lengths[offset:offset + size], member, where))
    return found


def marks(sources: Sequence[Source], weights: Sequence[float] | None = None) -> list[dict]:
    """What a state records of each source (``weights``: a weighted sampler's, per source)."""
    recorded = []
    for number, source in enumerate(sources):
        mark = {"name": source.name, "size": source.size, "repeats": source.repeats,
                "digest": source.digest(source.size)}
        if weights is not None:
            mark["weight"] = float(weights[number])
        recorded.append(mark)
    return recorded


def pad(indices: np.ndarray, world_size: int) -> np.ndarray:
    """``indices`` repeated from their start up to a multiple of ``world_size`` (``indices``
    themselves where they are one already: an epoch of 10^7 indices is 80 MB)."""
    if len(indices) % world_size == 0:
        return indices
    return np.resize(indices, math.ceil(len(indices) / world_size) * world_size)


def extent(recorded: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The recorded sources' first global indices, and the end of the last."""
    return np.concatenate([[0], np.cumsum([m["size"] * m["repeats"] for m in recorded])])


def carry_over(indices: np.ndarray, old: Sequence[Mapping[str, Any]],
               new: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, dict[str, int]]:
    """``indices`` of sources ``old`` as indices of sources ``new`` (matched by name; a
    sample keeps its place in its source), in order; returns them and, per source no longer
    there, how many indices were dropped."""
    starts, new_starts = extent(old), extent(new)
    by_name = {m["name"]: (int(new_starts[n]), m) for n, m in enumerate(new)}
    which = np.searchsorted(starts, indices, side="right") - 1
    carried = np.full(len(indices), -1, np.int64)
    dropped = {}
    for number, mark in enumerate(old):
        chosen = which == number
        if not chosen.any():
            continue
        if mark["name"] not in by_name:
            dropped[mark["name"]] = int(chosen.sum())
            continue
        start, now = by_name[mark["name"]]
        copy, local = np.divmod(indices[chosen].astype(np.int64) - int(starts[number]),
                                mark["size"])
        carried[chosen] = start + (copy % now["repeats"]) * now["size"] + local
    return carried[carried >= 0], dropped


def check_unchanged(stages: Sequence[Mapping[str, Any]], sources: Sequence[Source],
                    present: Sequence[Mapping[str, Any]]) -> None:
    """Raise :class:`StoreChangedError` if a source that a stage drew from is still here but
    its recorded samples are not what they were. ``present``: the sources' own marks
    (:func:`marks`), whose digests serve where a stage recorded a source at its present size;
    each other prefix is hashed once."""
    by_name = {s.name: s for s in sources}
    digests = {(m["name"], m["size"]): m["digest"] for m in present}
    for stage in stages:
        for mark in stage["sources"]:
            source = by_name.get(mark["name"])
            if source is None:
                continue
            if source.size < mark["size"]:
                digest = None
            else:
                key = (mark["name"], mark["size"])
                if key not in digests:
                    digests[key] = source.digest(mark["size"])
                digest = digests[key]
            if digest != mark["digest"]:
                raise StoreChangedError(
                    f"{source.label()}: the saved sampler state was drawn from its first "
                    f"{mark['size']} samples, which have changed since (now {source.size} "
                    f"samples; rewritten, reordered or removed). Resuming would mix two "
                    f"orders: start the epoch afresh (set_epoch, no load_state_dict), or "
                    f"restore the store as it was")


def changes(saved: Sequence[Mapping[str, Any]], now: Sequence[Mapping[str, Any]],
            dropped: Mapping[str, int], epoch: int) -> list[str]:
    """One line per difference between the saved and the present sources, saying what the
    rest of ``epoch`` does about it."""
    present = {m["name"]: m for m in now}
    said = []
    for mark in saved:
        name, other = mark["name"], present.get(mark["name"])
        if other is None:
            said.append(f"source {name!r} is gone: its {dropped.get(name, 0)} remaining "
                        f"indices of epoch {epoch} are skipped")
            continue
        if other["size"] > mark["size"]:
            said.append(f"source {name!r} grew from {mark['size']} to {other['size']} "
                        f"samples: the new ones join at epoch {epoch + 1}")
        for key in ("repeats", "weight"):
            if mark.get(key) != other.get(key):
                said.append(f"source {name!r} changed {key} from {mark.get(key)} to "
                            f"{other.get(key)}: the rest of epoch {epoch} keeps the saved "
                            f"draws, epoch {epoch + 1} uses the new {key}")
    known = {m["name"] for m in saved}
    said += [f"source {m['name']!r} is new: it joins at epoch {epoch + 1}"
             for m in now if m["name"] not in known]
    return said


def remainder(base: np.ndarray, stages: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """What the job had not consumed of the epoch at the end of the last stage, in the last
    stage's sources' indices (padding excluded): ``base``, the epoch's order in the first
    stage's sources, replayed stage by stage."""
    stream, real = pad(base, stages[0]["world_size"]), len(base)
    for before, stage in pairwise(stages):
        rest, _ = carry_over(stream[before["consumed"]:real], before["sources"],
                             stage["sources"])
        stream, real = pad(rest, stage["world_size"]), len(rest)
    return stream[stages[-1]["consumed"]:real]


def find_state(state: Mapping[str, Any], sampler: str) -> Mapping[str, Any]:
    """A sampler's own state, given it or any state holding it (a ``StatefulDataLoader``'s,
    a checkpoint dict): the first mapping marked as a sampler state, depth first."""
    pending: list[Any] = [state]
    while pending:
        value = pending.pop()
        if isinstance(value, Mapping):
            if STATE_MARK in value:
                if value.get("sampler") != sampler:
                    raise OptionError(f"the state is a {value.get('sampler')}'s, not a "
                                      f"{sampler}'s")
                return value
            pending.extend(reversed(list(value.values())))
        elif isinstance(value, list | tuple):
            pending.extend(reversed(value))
    raise OptionError(f"no {sampler} state in the given state (keys: {sorted(state)[:8]})")
