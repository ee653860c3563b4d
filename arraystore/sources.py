"""The interface a converter implements to feed a store.

A source turns input paths into *units* (one TAR shard, one ``.bin`` directory, one NPZ
directory), states the schema it produces, and splits each unit into *records*: the raw bytes of one
sample, read cheaply in the writer process. ``derive`` turns a record into the sample's field
values; it runs in worker processes, so a source object must be picklable (it holds options only).
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Protocol

from arraystore.errors import SampleError
from arraystore.machine import available_cores
from arraystore.plugins import PluginOption
from arraystore.schema import Schema


@dataclass
class SourceUnit:
    """One input the provenance records: path, size, and a checksum computed while reading."""

    path: Path
    size: int
    digest: Any = field(default_factory=hashlib.sha256, repr=False, compare=False)
    bytes_read: int = 0

    @property
    def label(self) -> str:
        return self.path.name

    def __getstate__(self) -> dict[str, Any]:
        """A unit sent to another process (a Dask task) is read there from the start: its
        checksum and progress start afresh (a hash object does not pickle)."""
        return {**self.__dict__, "digest": None, "bytes_read": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, digest=hashlib.sha256())

    def identity(self) -> dict[str, Any]:
        """What makes a re-run recognise this unit as already ingested."""
        return {"path": str(self.path.resolve()), "size": self.size}


@dataclass(frozen=True)
class Record:
    """The raw material of one sample, with where it came from (for error messages).

    A record that yields several samples (an image and its segments) lists their ids in
    ``parts``: when every one of them is already stored, the record is skipped before it is
    derived.
    """

    sample_id: str
    where: str
    payload: Any
    progress: int = 0  # bytes of the unit consumed once this record was read
    parts: tuple[str, ...] = ()


@dataclass
class Skip:
    """One sample (or the rest of a unit) left out of the store, and why."""

    where: str
    sample_id: str
    reason: str


@dataclass(frozen=True)
class Part:
    """One of the samples a record yields when it yields several."""

    sample_id: str
    values: dict[str, Any]


class HashingReader:
    """A read-only stream over a unit's file that feeds every byte read into the unit's checksum
    and counts them in ``unit.bytes_read`` (the progress bar's position)."""

    def __init__(self, raw: BinaryIO, unit: SourceUnit) -> None:
        self._raw = raw
        self._unit = unit
        unit.bytes_read = 0

    @property
    def bytes_read(self) -> int:
        return self._unit.bytes_read

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._unit.digest.update(data)
        self._unit.bytes_read += len(data)
        return data

    def readable(self) -> bool:
        return True


class BatchStage(Protocol):
    """Runs on ``batch_size`` derived samples at a time, in the writer process, updating them.
    ``name`` is the provenance key of what it records (``teacher``, ``embedder``)."""

    batch_size: int
    name: str

    def __call__(self, samples: list[dict[str, Any]]) -> None: ...

    def describe(self) -> dict[str, Any]:
        """What to record in the store's provenance (model, weights checksum, ...)."""
        ...


class Source(ABC):
    """Base class of converters; subclasses register under the ``arraystore.sources`` group."""

    name: ClassVar[str]
    kind: ClassVar[str]
    options: ClassVar[tuple[PluginOption, ...]] = ()

    def __init__(self, **options: Any) -> None:
        known = {o.name: o for o in self.options}
        unknown = set(options) - set(known)
        if unknown:
            raise TypeError(
                f"source {self.name!r}: unknown options {sorted(unknown)}; known: {sorted(known)}"
            )
        self.settings: dict[str, Any] = {n: o.default for n, o in known.items()}
        self.settings.update({k: v for k, v in options.items() if v is not None})
        for name, value in options.items():
            known[name].check(value)

    @abstractmethod
    def units(self, inputs: Sequence[str | os.PathLike[str]]) -> list[SourceUnit]:
        """Resolve the command line's inputs; raise :class:`SourceError` for an unusable one."""

    @abstractmethod
    def schema(self, units: Sequence[SourceUnit]) -> Schema:
        """The schema this source writes (may look at the first unit, e.g. to infer NPZ fields)."""

    @abstractmethod
    def records(self, unit: SourceUnit) -> Iterator[Record | SampleError]:
        """Read one unit as a stream of records, updating ``unit.digest`` with every byte read.

        A broken sample is *yielded* as a :class:`SampleError` (the ingest then fails or skips it
        and the stream goes on); :class:`SourceError` is raised when the rest of the unit cannot be
        read (a truncated TAR).
        """

    @abstractmethod
    def derive(self, record: Record) -> dict[str, Any] | list[Part | Skip]:
        """The field values of one sample (runs in a worker process); for a record with
        ``parts``, a :class:`Part` per sample it yields and a :class:`Skip` (always reported,
        never fatal) per part it leaves out."""

    def store_attrs(self, units: Sequence[SourceUnit]) -> Mapping[str, Any]:
        """Kind-specific attributes to record in a new store (default: none)."""
        return {}

    def batch_stage(self) -> BatchStage | None:
        """An optional step run in the writer process on batches of derived samples, before
        they are written (e.g. a teacher model computing features). Default: none."""
        return None

    def stage_device(self) -> str | None:
        """The device :meth:`batch_stage` will run its model on (``"cpu"``, ``"cuda:0"``), or
        None when this source has no stage; known without building the model, so that the
        default number of decode workers can be chosen (:func:`default_workers`)."""
        return None

    def max_samples(self, unit: SourceUnit) -> int | None:
        """An upper bound of the samples ``unit`` yields, found cheaply (TAR member headers,
        not their data), or None when the source cannot tell before reading. A distributed
        ingest reserves that many store positions for the unit before a worker reads it."""
        return None

    def prepare_worker(self) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Called once in each worker process before the first ``derive`` (e.g. to pin threads)."""


def default_workers(source: Source, cores: int | None = None) -> int:
    """Decode processes for an ingest of ``source`` when ``--workers`` is not given.

    Without a model stage, one per available core. With a model on the CPU, none beside the
    writer (1: records are derived in the writer process): the model's threads use every core
    already, and a decode process beside them only takes cores from it and pays its start-up
    (spawned workers import the model's libraries). With a model on an accelerator, every core
    but the writer's decodes, so the device is never left waiting.
    """
    cores = cores or available_cores()
    if source.stage_device() is None:
        return cores
    if model_on_cpu(source):
        return 1
    return max(1, cores - 1)


def model_on_cpu(source: Source) -> bool:
    """Whether ``source`` has a batch stage whose model runs on the CPU."""
    device = source.stage_device()
    return device is not None and device.split(":")[0] == "cpu"
