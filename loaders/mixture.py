"""``Mixture``: several stores (or map-style Datasets) as one map-style dataset for one training
run (docs/formats.md), with per-source repeats, weights, ``modality_length`` and missing optional
sources skipped.

Index space: source after source, each ``repeats`` times (``[sav][sa1b][refcoco x4]``); index
``i`` of a source repeated r times reads its sample ``i % len``. Every decision a sampler makes
comes from :attr:`Mixture.lengths` and the per-source sizes, built from each store's
``modality_length`` array (read with the small-field column reader) or a constant -- never by
reading a sample. Items are the source's dict plus ``dataset_type`` and ``modality_length``.
"""

from __future__ import annotations

import bisect
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from arraystore.loaders.batched import (
    Batched,
    Slot,
    allocate,
    allocate_arrays,
    fill,
    slot_shapes,
    torch_dtype,
)
from arraystore.loaders.packed_collate import collate_packed
from arraystore.loaders.read_ahead import BatchWithNext, upcoming
from arraystore.loaders.shared_ring import shippable
from arraystore.loaders.zarr_dataset import ZarrDistillDataset
from arraystore.location import Location, is_url
from arraystore.mix import (
    MissingSourceError,
    MixEntry,
    MixSpecError,
    check_item_format,
    check_participation,
    read_mix_toml,
)
from arraystore.reader import SampleReader

MODALITY_FIELD = "modality_length"
DEFAULT_MODALITY_LENGTH = 1
ADDED_KEYS = ("dataset_type", MODALITY_FIELD)
COLUMN = ""  # the key of a source's modality_length column among its buffers: no slot's


@dataclass
class MixSource:
    """One source of a :class:`Mixture`: a store path or a map-style Dataset with ``__len__``.

    ``collate``: how a batch of this source's items is collated (default: the dataset's
    ``collate_fn`` attribute if it has one, else as ``default_collate`` does). The other fields
    are those of :class:`arraystore.mix.MixEntry` (``item="distill"``: a store path read as
    :class:`~arraystore.loaders.ZarrDistillDataset` items).
    """

    source: str | os.PathLike[str] | Dataset
    dataset_type: str
    repeats: int = 1
    weight: float | None = None
    required: bool = True
    modality_length: int | None = None
    fields: Sequence[str] | None = None
    backend: str = "auto"
    collate: Callable[[list[Any]], Any] | None = None
    item: str = "fields"

    def __post_init__(self) -> None:
        check_participation(self.dataset_type, self.repeats, self.weight, self.modality_length)
        check_item_format(self.dataset_type, self.item, self.fields)

    @classmethod
    def from_entry(cls, entry: MixEntry) -> MixSource:
        return cls(entry.path, entry.dataset_type, entry.repeats, entry.weight, entry.required,
                   entry.modality_length, entry.fields, entry.backend, item=entry.item)


class StoreItems(Dataset):
    """Any store as a map-style Dataset: item ``i`` is :meth:`SampleReader.read` of it
    (``storage_options``: of an object-store URL; ``cache_dir``, ``cache_limit``: its node-local
    cache). ``omit``: fields never read, whatever ``fields`` says (a mixture's source: the
    values the mixture sets itself)."""

    def __init__(self, path: str | os.PathLike[str], fields: Sequence[str] | None = None,
                 backend: str = "auto", storage_options: Mapping[str, Any] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None,
                 cache_limit: int | str | None = None, omit: Sequence[str] = ()) -> None:
        self.reader = SampleReader(path, backend=backend, fields=fields,
                                   storage_options=storage_options, cache_dir=cache_dir,
                                   cache_limit=cache_limit)
        self.fields = tuple(n for n in self.reader.fields if n not in omit)
        schema = self.reader.schema
        self.slots = [Slot(name, name, torch_dtype(schema[name].numpy_dtype))
                      for name in self.fields if not schema[name].is_string]
        self.strings = [n for n in self.fields if schema[n].is_string]

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.reader.read(index, self.fields)

    def batch_slots(self) -> list[Slot]:
        """Every numeric field as a slot of a batch buffer (strings are listed)."""
        return self.slots

    def fill_batch(self, indices: Sequence[int],
                   buffers: Mapping[str, torch.Tensor]) -> Batched:
        """The ``indices``-th items batched into ``buffers``
        (:func:`arraystore.loaders.batched.allocate`): numeric fields stacked, strings listed, as
        ``default_collate`` batches the items."""
        # from an object store the strings' chunks are fetched with the batch's
        stacked = fill(self.reader, self.slots, buffers, indices, also=self.strings)
        listed = {n: self.reader.read_each(indices, n) for n in self.strings}
        batch = {n: stacked[n] if n in stacked else listed[n] for n in self.fields}
        arrays = {n: batch[n].numpy() if n in stacked else batch[n] for n in self.fields}
        views = [{n: arrays[n][row] for n in self.fields} for row in range(len(indices))]
        return Batched(views, batch, default_format=True)

    def __getitems__(self, indices: Sequence[int]) -> Batched:
        """The items ``indices`` read straight into one batch buffer (a reused shared one in a
        DataLoader worker), which ``default_collate`` hands on; the items are NumPy views of
        it, as :meth:`__getitem__` returns them."""
        return self.fill_batch(indices, allocate(self.reader, self.batch_slots(), len(indices)))


def _modality_lengths(dataset: Any, source: MixSource) -> np.ndarray:
    """Per-sample lengths without reading a sample: the declared constant, else the store's
    ``modality_length`` array, else the dataset's ``modality_lengths``, else 1."""
    if source.modality_length is not None:
        return np.full(len(dataset), source.modality_length, np.int64)
    reader = getattr(dataset, "reader", None)
    if isinstance(reader, SampleReader) and MODALITY_FIELD in reader.schema:
        lengths = reader.column(MODALITY_FIELD)
    elif getattr(dataset, "modality_lengths", None) is not None:
        lengths = np.asarray(dataset.modality_lengths)
    else:
        return np.full(len(dataset), DEFAULT_MODALITY_LENGTH, np.int64)
    if lengths.shape != (len(dataset),):
        raise MixSpecError(f"source {source.dataset_type!r}: {lengths.shape[0]} modality "
                           f"lengths for {len(dataset)} samples")
    if (lengths == 0).any():
        raise MixSpecError(f"source {source.dataset_type!r}: modality_length 0 at sample "
                           f"{int(np.flatnonzero(lengths == 0)[0])}; lengths are positive, or "
                           f"negative for text-only samples")
    return lengths


def _column(target: torch.Tensor | None, values: list[int]) -> torch.Tensor:
    """``values`` as an int64 tensor: written into ``target`` (a slot of the batch buffer)
    where there is one."""
    if target is None:
        return torch.tensor(values, dtype=torch.int64)
    target.numpy()[:] = values
    return target


def _without_added(items: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
    """``items`` without the keys the mixture adds (as its sources gave them), for a source's
    collate; the items themselves where none has them."""
    if not any(k in item for item in items for k in ADDED_KEYS):
        return items
    return [{k: v for k, v in i.items() if k not in ADDED_KEYS} for i in items]


def modality_tensor(items: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """The items' ``modality_length`` as ``default_collate`` batches ints: an int64 tensor."""
    return torch.tensor([int(i[MODALITY_FIELD]) for i in items], dtype=torch.int64)


class Mixture(Dataset):
    """Map-style, picklable mixture of sources; see the module docstring.

    ``collate_fn``: the collate for every batch (default: :meth:`collate`, which groups items
    by ``dataset_type`` when their keys differ). ``storage_options``, ``cache_dir`` and
    ``cache_limit`` apply to every source given as an object-store URL.
    """

    def __init__(self, sources: Sequence[MixSource],
                 collate_fn: Callable[[list[Any]], Any] | None = None, *,
                 storage_options: Mapping[str, Any] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None,
                 cache_limit: int | str | None = None) -> None:
        self._remote = {"storage_options": storage_options, "cache_dir": cache_dir,
                        "cache_limit": cache_limit}
        self.sources: list[MixSource] = []
        self.datasets: list[Any] = []
        self.missing: list[str] = []
        types = [s.dataset_type for s in sources]
        duplicated = sorted({t for t in types if types.count(t) > 1})
        if duplicated:
            raise MixSpecError(f"dataset_type {duplicated} named by more than one source")
        for source in sources:
            dataset = self._open(source)
            if dataset is None:
                continue
            self.sources.append(source)
            self.datasets.append(dataset)
        if not self.datasets:
            raise MixSpecError(f"no source of the mixture is present (missing: {self.missing})")
        self.sizes = np.array([len(d) for d in self.datasets], np.int64)
        self.repeats = np.array([s.repeats for s in self.sources], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes * self.repeats)])
        # the same as Python ints, for a batch's few indices (NumPy's calls cost more there)
        self._starts, self._sizes = self.offsets.tolist(), self.sizes.tolist()
        self.lengths = np.empty(int(self.offsets[-1]), np.int64)  # filled source by source
        for number, (dataset, source) in enumerate(zip(self.datasets, self.sources,
                                                       strict=True)):
            own = _modality_lengths(dataset, source)
            for copy in range(source.repeats):
                start = int(self.offsets[number]) + copy * len(own)
                self.lengths[start:start + len(own)] = own
        self.collate_fn = collate_fn

    def _open(self, source: MixSource) -> Any | None:
        if not isinstance(source.source, str | os.PathLike):
            return source.source
        path = source.source  # a local path or an object-store URL
        remote = self._remote if is_url(path) else {}  # a local source takes none
        if not Location.of(path, remote.get("storage_options")).exists():
            if source.required:
                raise MissingSourceError(f"mixture source {source.dataset_type!r}: no store at "
                                         f"{path} (mark it required=False to train without it)")
            warnings.warn(f"mixture source {source.dataset_type!r}: no store at {path}; "
                          f"skipped (optional)", stacklevel=3)
            self.missing.append(str(path))
            return None
        if source.item == "distill":
            return ZarrDistillDataset(path, source.backend, **remote)
        # the values the mixture sets are not read: every item's would be replaced
        return StoreItems(path, source.fields, source.backend, **remote, omit=ADDED_KEYS)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], **kwargs: Any) -> Mixture:
        """The mixture a ``mix.toml`` declares (see :mod:`arraystore.mix`)."""
        return cls([MixSource.from_entry(e) for e in read_mix_toml(path)], **kwargs)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def dataset_types(self) -> list[str]:
        return [s.dataset_type for s in self.sources]

    def locate(self, index: int) -> tuple[int, int]:
        """(source number, the source's own index) of mixture index ``index``."""
        ((source, (_, (own,))),) = self._by_source([index]).items()
        return source, own

    def _by_source(self, indices: Sequence[int]) -> dict[int, tuple[list[int], list[int]]]:
        """Where a batch's indices are: each source present -> (the batch rows it serves, its
        own indices of them), in order of first appearance. Plain Python: a batch is a few
        indices, for which NumPy's calls cost several times more."""
        parts: dict[int, tuple[list[int], list[int]]] = {}
        total, starts, sizes = self._starts[-1], self._starts, self._sizes
        for row, index in enumerate(indices):
            index = int(index)
            if not 0 <= index < total:
                raise IndexError(f"index {index} out of range for a mixture of {total}")
            source = bisect.bisect_right(starts, index) - 1
            rows, own = parts.setdefault(source, ([], []))
            rows.append(row)
            own.append((index - starts[source]) % sizes[source])
        return parts

    def __getitem__(self, index: int) -> dict[str, Any]:
        source, local = self.locate(int(index))
        return self._mixture_item(source, self._checked(source, self.datasets[source][local]),
                                  int(self.lengths[index]))

    def set_epoch(self, epoch: int) -> None:
        """Pass the epoch on to the sources that draw per epoch (random crops)."""
        for dataset in self.datasets:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The states of the sources that have one (torchdata's ``Stateful``), by
        ``dataset_type``; where the epoch stands is the sampler's state."""
        return {"sources": {s.dataset_type: d.state_dict()
                            for s, d in zip(self.sources, self.datasets, strict=True)
                            if hasattr(d, "state_dict") and hasattr(d, "load_state_dict")}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Give each present source its saved state (sources added since start fresh; those
        gone are the sampler's to report)."""
        for source, dataset in zip(self.sources, self.datasets, strict=True):
            saved = state["sources"].get(source.dataset_type)
            if saved is not None and hasattr(dataset, "load_state_dict"):
                dataset.load_state_dict(saved)

    def _mixture_item(self, source: int, item: Mapping[str, Any], length: int
                      ) -> dict[str, Any]:
        """A source's item (a dict, :meth:`_checked`) as the mixture's: with its
        ``dataset_type`` and ``modality_length``."""
        return {**item, "dataset_type": self.sources[source].dataset_type,
                MODALITY_FIELD: length}

    def _checked(self, source: int, item: Any) -> Mapping[str, Any]:
        """``item`` of source ``source``, which must be a dict."""
        if type(item) is not dict and not isinstance(item, Mapping):  # a dict: no ABC hooks
            raise TypeError(f"mixture source {self.sources[source].dataset_type!r} returned a "
                            f"{type(item).__name__}; mixture sources return dicts")
        return item

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The items ``indices``, each source's read together. The sources that read into
        batch buffers (the store datasets' ``fill_batch``) share one allocation, with each
        one's ``modality_length`` column, so a mixed batch crosses from a worker as one
        buffer; the others use their own ``__getitems__``. Where :meth:`collate` would batch
        the items by type, the batch is built from what the sources read and handed on by it
        (a :class:`Batched`, equal to :meth:`collate` of the items); otherwise the items."""
        parts = self._by_source(indices)
        if any(not hasattr(self.datasets[s], "__getitems__") for s in parts):
            return [self[int(i)] for i in indices]
        following = upcoming(indices)
        then = self._by_source(following) if following else {}  # the sources' next parts
        reads, columns = self._read_parts({s: BatchWithNext(own, then[s][1] if s in then else ())
                                           for s, (_, own) in parts.items()})
        listed = self.lengths[np.asarray(indices, np.int64)].tolist()
        items: list[dict[str, Any]] = [{}] * len(indices)
        for source, (rows, _) in parts.items():
            read = reads[source]
            if not isinstance(read, Batched):  # a Batched holds dicts, built by its source
                read = [self._checked(source, item) for item in read]
            for row, item in zip(rows, read, strict=True):
                items[row] = self._mixture_item(source, item, listed[row])
        if self.collate_fn is not None or not all(isinstance(r, Batched)
                                                  for r in reads.values()):
            return items  # collated item by item
        if len(parts) > 1 and len({frozenset(items[r[0]]) for r, _ in parts.values()}) == 1:
            return items  # the same keys: one batch, collated item by item
        batches = {}
        for source, (rows, _) in parts.items():
            name, read = self.sources[source].dataset_type, reads[source]
            own = self._own_collate(source)
            if own is not None:
                batch = own(_without_added(read))
            elif read.default_format:  # the mixture's own values replace stored ones
                batch = {k: v for k, v in read.batch.items() if k not in ADDED_KEYS}
            else:
                batch = collate_packed({"": list(_without_added(read))})[""]
            if isinstance(batch, dict):
                batch["dataset_type"] = [name] * len(rows)
                batch[MODALITY_FIELD] = _column(columns.get(source), [listed[r] for r in rows])
            batches[name] = batch
        return Batched(items, next(iter(batches.values())) if len(batches) == 1 else batches)

    def _read_parts(self, parts: Mapping[int, Sequence[int]]
                    ) -> tuple[dict[int, Any], dict[int, torch.Tensor]]:
        """Each source's part of a batch (its own indices), read together, and the
        ``modality_length`` column of each source that fills a batch buffer
        (``batch_slots`` + ``fill_batch``): views of one allocation, in a DataLoader worker
        one shared segment for the whole mixed batch, so the column crosses by reference
        like the rest (probe: pickling a one-source batch for the queue 49 µs with the column
        by value, 39 by reference)."""
        filling = [s for s in parts if hasattr(self.datasets[s], "fill_batch")]
        shapes: dict[tuple[int, str], tuple[tuple[int, ...], torch.dtype]] = {}
        for source in filling:
            dataset, count = self.datasets[source], len(parts[source])
            for key, shape in slot_shapes(dataset.reader, dataset.batch_slots(), count).items():
                shapes[source, key] = shape
            shapes[source, COLUMN] = ((count,), torch.int64)
        buffers: dict[int, dict[str, torch.Tensor]] = {s: {} for s in filling}
        for (source, key), array in (allocate_arrays(shapes) if shapes else {}).items():
            buffers[source][key] = array
        columns = {s: buffers[s].pop(COLUMN) for s in filling}
        return {source: self.datasets[source].fill_batch(own, buffers[source])
                if source in buffers else self.datasets[source].__getitems__(own)
                for source, own in parts.items()}, columns

    def collate(self, items: list[Mapping[str, Any]]) -> Any:
        """Batch items: one batch when they share their keys, else a dict of per-type
        sub-batches (SA-1B and SAV dicts in one batch). A type whose source has a collate of
        its own (``MixSource.collate``, or the dataset's ``collate_fn``) uses it; the others
        are collated as ``default_collate`` would, all into one buffer (one shared-memory
        segment per batch from a worker: see :mod:`arraystore.loaders.packed_collate`). Each
        sub-batch gets ``dataset_type`` as a list and ``modality_length`` as an int64 tensor, as
        ``default_collate`` batches strings and ints."""
        if self.collate_fn is not None:
            return self.collate_fn(items)
        if isinstance(items, Batched):  # built by __getitems__
            return items.collated()
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for item in items:
            groups.setdefault(item["dataset_type"], []).append(item)
        single = len(groups) == 1 or len({frozenset(i) for i in items}) == 1
        if single:
            groups = {items[0]["dataset_type"]: items}
        batches, packed = {}, {}
        for name, members in groups.items():
            stripped = _without_added(members)
            own = self._own_collate(self.dataset_types.index(name))
            if own is None:
                packed[name] = stripped
            else:
                batches[name] = own(stripped)
        batches.update(collate_packed(packed) if packed else {})
        for name, members in groups.items():
            if isinstance(batches[name], dict):
                batches[name]["dataset_type"] = [i["dataset_type"] for i in members]
                batches[name][MODALITY_FIELD] = modality_tensor(members)
        return shippable(batches[next(iter(groups))] if single
                         else {n: batches[n] for n in groups})

    def _own_collate(self, number: int) -> Callable[[list[Any]], Any] | None:
        """The collate source ``number`` brings (``MixSource.collate``, else the dataset's
        ``collate_fn``), or None for the default."""
        return self.sources[number].collate or getattr(self.datasets[number], "collate_fn", None)
