"""Mixtures of stores as declared: which sources, with what repeats or weight, and what share of
an epoch each takes (``arraystore mix describe mix.toml``).

A ``mix.toml`` lists sources as ``[[source]]`` tables with the fields of :class:`MixEntry`
(``path``, ``dataset_type``, ``repeats``, ``weight``, ``required``, ``modality_length``,
``fields``, ``backend``, ``item``); relative paths are taken from the TOML file's folder. Every
value is checked for its type and range when the file is read (``required = "no"`` is refused,
not taken as true). This module reads declarations and store metadata only (no torch, no
sample): ``arraystore.loaders.Mixture`` builds the training-time dataset from the same entries.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from arraystore.errors import ArrayStoreError
from arraystore.location import Location, is_url
from arraystore.store import Store, is_store


class MixSpecError(ArrayStoreError, ValueError):
    """A mixture declaration is invalid (unknown key, bad repeats or weight, no source)."""


class MissingSourceError(ArrayStoreError, FileNotFoundError):
    """A required source of a mixture is not on disk."""


ITEM_FORMATS = ("fields", "distill")  # a source's items: its stored fields, or the seed's dict


@dataclass(frozen=True)
class MixEntry:
    """One source of a mixture: a store ``path`` and how it takes part.

    ``repeats``: copies of the source in an epoch of the mixture (RefCOCO x4). ``weight``: its
    relative chance per draw for a weighted sampler. ``required=False``: a missing store is
    skipped with a warning. ``modality_length``: the per-sample length when the store has no
    ``modality_length`` array (negative: text-only samples). ``item``: ``"fields"`` (the
    stored fields, as read) or ``"distill"`` (an ``sa1b`` store's items as the dicts of
    ``ZarrDistillDataset``, which the SA-1B training code expects).
    """

    path: str
    dataset_type: str
    repeats: int = 1
    weight: float | None = None
    required: bool = True
    modality_length: int | None = None
    fields: tuple[str, ...] | None = None
    backend: str = "auto"
    item: str = "fields"

    def __post_init__(self) -> None:
        check_participation(self.dataset_type, self.repeats, self.weight, self.modality_length)
        check_item_format(self.dataset_type, self.item, self.fields)


def check_item_format(dataset_type: str, item: str, fields: Sequence[str] | None) -> None:
    """Refuse an unknown item format, or ``fields`` with the ``distill`` one (its dict has its
    own keys)."""
    if item not in ITEM_FORMATS:
        raise MixSpecError(f"source {dataset_type!r}: item must be one of {ITEM_FORMATS}, got "
                           f"{item!r}")
    if item == "distill" and fields is not None:
        raise MixSpecError(f"source {dataset_type!r}: 'fields' applies to item = \"fields\"; "
                           f"the distill item has its own keys")


def check_participation(dataset_type: str, repeats: int, weight: float | None,
                        modality_length: int | None) -> None:
    """Refuse a source's settings that no sampler can use, naming the source."""
    if not dataset_type:
        raise MixSpecError("every mixture source needs a dataset_type")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise MixSpecError(f"source {dataset_type!r}: repeats must be an integer >= 1, got "
                           f"{repeats!r}")
    if weight is not None and not (isinstance(weight, int | float) and not isinstance(
            weight, bool) and math.isfinite(weight) and weight > 0):
        raise MixSpecError(f"source {dataset_type!r}: weight must be a finite number > 0, got "
                           f"{weight!r}")
    if modality_length == 0:
        raise MixSpecError(f"source {dataset_type!r}: modality_length 0 is not a length (use a "
                           f"negative length for text-only samples)")


# what each mix.toml key holds (bool is not an int here; an int is a float)
KEY_TYPES: dict[str, tuple[type, ...]] = {
    "path": (str,), "dataset_type": (str,), "repeats": (int,), "weight": (int, float),
    "required": (bool,), "modality_length": (int,), "fields": (list,), "backend": (str,),
    "item": (str,),
}


def _check_types(where: str, table: Mapping[str, Any]) -> None:
    """Refuse a value of the wrong TOML type, naming the key, what it holds and what fits."""
    for key, value in table.items():
        wanted = KEY_TYPES[key]
        if (isinstance(value, bool) and bool not in wanted) or not isinstance(value, wanted):
            what = {(int,): "an integer", (int, float): "a number", (str,): "a string",
                    (bool,): "true or false", (list,): "a list of strings"}[wanted]
            raise MixSpecError(f"{where}: {key} must be {what}, got {value!r}")
    if "fields" in table and not all(isinstance(f, str) for f in table["fields"]):
        raise MixSpecError(f"{where}: fields must be a list of strings, got {table['fields']!r}")


def read_mix_toml(path: str | os.PathLike[str]) -> list[MixEntry]:
    """The ``[[source]]`` entries of a ``mix.toml``."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as exc:
        raise MissingSourceError(f"mixture file {path} not found") from exc
    except IsADirectoryError as exc:
        raise MixSpecError(f"{path} is a folder; give the mix.toml file") from exc
    except UnicodeDecodeError as exc:
        raise MixSpecError(f"{path}: not UTF-8 text ({exc}); TOML files are UTF-8") from exc
    except tomllib.TOMLDecodeError as exc:
        raise MixSpecError(f"{path}: not valid TOML: {exc}") from exc
    tables = document.get("source")
    if not isinstance(tables, list) or not tables:
        raise MixSpecError(f"{path}: expected [[source]] tables, one per store of the mixture")
    known = {f.name for f in fields(MixEntry)}
    entries = []
    for n, table in enumerate(tables):
        if not isinstance(table, dict):
            raise MixSpecError(f"{path}: source {n + 1} is not a table; write [[source]]")
        unknown = sorted(set(table) - known)
        if unknown:
            raise MixSpecError(f"{path}: source {n + 1} has unknown keys {unknown}; known: "
                               f"{sorted(known)}")
        if "path" not in table or "dataset_type" not in table:
            raise MixSpecError(f"{path}: source {n + 1} needs 'path' and 'dataset_type'")
        _check_types(f"{path}: source {n + 1}", table)
        settings: dict[str, Any] = dict(table)
        if not is_url(settings["path"]) and not Path(settings["path"]).is_absolute():
            settings["path"] = str((path.parent / settings["path"]).resolve())
        if settings.get("fields") is not None:
            settings["fields"] = tuple(settings["fields"])
        entries.append(MixEntry(**settings))
    return entries


@dataclass
class SourceSummary:
    """One line of ``arraystore mix describe``."""

    path: str
    dataset_type: str
    kind: str
    samples: int
    repeats: int
    weight: float | None
    required: bool
    missing: bool
    epoch_share: float = 0.0  # of an epoch with repeats
    weight_share: float | None = None  # of the draws of a weighted sampler


def describe_mix(entries: list[MixEntry]) -> list[SourceSummary]:
    """Kind, committed samples and shares of each source (missing ones listed, not counted)."""
    summaries = []
    for entry in entries:
        present = is_store(entry.path)
        if not present and Location.of(entry.path).exists():
            Store.open(entry.path)  # raises: something is there, but not a store
        store = Store.open(entry.path) if present else None
        summaries.append(SourceSummary(
            path=entry.path, dataset_type=entry.dataset_type,
            kind=store.kind if store else "-", samples=store.num_committed() if store else 0,
            repeats=entry.repeats, weight=entry.weight, required=entry.required,
            missing=not present))
    total = sum(s.samples * s.repeats for s in summaries)
    weights = [s.weight if s.weight is not None else 1.0 for s in summaries if not s.missing]
    for s in summaries:
        if not s.missing:
            s.epoch_share = s.samples * s.repeats / total if total else 0.0
            s.weight_share = (s.weight if s.weight is not None else 1.0) / sum(weights)
    return summaries
