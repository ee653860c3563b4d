"""Ingest on a Dask cluster (``arraystore ingest ... --scheduler dask``): a task per unit.

The driver (this process) holds the store's writer lock and alone writes the store's metadata:
it gives every unit not ingested yet a region of positions (:mod:`arraystore.regions`, saved
before any task starts), then submits one task per unit. A task runs on a Dask worker: it reads
its unit, derives each record (and runs the source's batch stage, if any) and writes the
per-sample fields of its samples straight into its own region, a file (shard) at a time, then
returns the ids, the small block-chunked values (flags, boxes, ids) and what it skipped. As each
task finishes, the driver writes those, syncs, marks the samples ``committed`` and records the
unit in provenance: a unit is committed whole or not at all.

A worker that dies mid-task is replaced and its task rerun by Dask (into the same region); a
driver that dies leaves committed units committed, and the same command run again skips them and
redoes the others into their recorded regions. Positions a unit did not fill stay uncommitted.
Workers report progress as Dask events (``arraystore-progress``), which the driver's progress
bar shows with each worker's throughput.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from arraystore.errors import (
    ArrayStoreError,
    MissingExtraError,
    OptionError,
    SampleError,
    SourceError,
)
from arraystore.ingest import (
    IngestReport,
    already_ingested,
    derive_here,
    write_report,
    writing,
)
from arraystore.ingest_loop import ingest_unit_samples
from arraystore.layout import Layout
from arraystore.location import Location
from arraystore.machine import available_cores
from arraystore.regions import file_unit, release, reserve
from arraystore.sources import BatchStage, Skip, Source, SourceUnit
from arraystore.store import Store, StoreTarget, WriteMode, utc_now
from arraystore.writer import StoreWriter, stack_column, validate_sample

PROGRESS_TOPIC = "arraystore-progress"
PROGRESS_EVERY_S = 1.0


class DistributedIngestError(ArrayStoreError, RuntimeError):
    """A distributed ingest cannot run as asked (a source that cannot bound its units...)."""


@dataclass
class UnitResult:
    """What a task returns for its unit: ids in region order, block-chunked values, skips."""

    unit: dict[str, Any]
    path: str
    start: int
    ids: list[str]
    blocks: dict[str, list[Any]]
    skipped: list[Skip]
    sha256: str
    worker: str
    seconds: float
    nbytes: int
    failure: Skip | None = None  # with on_error "fail": the broken sample; nothing written
    # what the unit's loop counted (arraystore.ingest_loop)
    ingested: int = 0
    already_stored: int = 0  # ids the store held when the task started: not decoded again
    stage_seconds: float = 0.0
    waiting_seconds: float = 0.0


@dataclass
class WorkerRate:
    samples: int = 0
    seconds: float = 0.0


@dataclass
class ProgressBoard:
    """Samples, bytes and per-worker throughput as workers report them."""

    samples: int = 0
    nbytes: int = 0
    workers: dict[str, WorkerRate] = field(default_factory=dict)
    _unit_progress: dict[str, tuple[int, int]] = field(default_factory=dict)

    def update(self, message: Mapping[str, Any]) -> None:
        """A worker's running totals for one unit: (samples, bytes) so far, its busy time."""
        key = message["unit"]
        samples, nbytes = self._unit_progress.get(key, (0, 0))
        self.samples += message["samples"] - samples
        self.nbytes += message["bytes"] - nbytes
        self._unit_progress[key] = (message["samples"], message["bytes"])
        rate = self.workers.setdefault(message["worker"], WorkerRate())
        rate.samples += message["samples"] - samples
        rate.seconds += message["busy"]

    def rates(self) -> str:
        return ", ".join(f"{name.rsplit(':', 1)[-1]}: {r.samples / r.seconds:.2f}/s"
                         for name, r in sorted(self.workers.items()) if r.seconds > 0)


_STAGES: dict[str, BatchStage | None] = {}  # per worker process: source name -> its stage


def _prepared_stage(source: Source) -> BatchStage | None:
    """Prepare this worker process for ``source`` once, and build its batch stage once (a
    model is loaded per worker, not per task)."""
    if source.name not in _STAGES:
        source.prepare_worker()
        _STAGES[source.name] = source.batch_stage()
    return _STAGES[source.name]


def ingest_unit(source: Source, unit: SourceUnit, location: Location, start: int, stop: int,
                on_error: str) -> UnitResult:
    """The task of one unit, run on a Dask worker; see the module docstring."""
    from distributed import get_worker

    started = time.perf_counter()
    worker = get_worker().address
    stage = _prepared_stage(source)
    store = Store.open(location, mode="r+", check_arrays=False)
    region = _Region(store, start, stop, unit)
    result = region.result
    result.worker = worker
    last_report = [time.perf_counter()]

    def report(force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - last_report[0] >= PROGRESS_EVERY_S:
            get_worker().log_event(PROGRESS_TOPIC, {
                "unit": unit.label, "worker": worker, "samples": len(result.ids),
                "bytes": unit.bytes_read, "busy": now - last_report[0]})
            last_report[0] = now

    try:
        ingest_unit_samples(source, unit, functools.partial(derive_here, source), region, stage,
                            store.committed_ids(), on_error, result, lambda _: report())
    except SampleError as exc:  # returned, not raised: the driver raises it (commits none)
        result.ids.clear()
        result.failure = Skip(exc.where, exc.sample_id, exc.reason)
        return result
    except SourceError as exc:
        result.ids.clear()
        result.failure = Skip(exc.path, "*", f"rest of the input unreadable: {exc.reason}")
        return result
    region.flush()
    report(force=True)
    result.sha256 = unit.digest.hexdigest()
    result.seconds = time.perf_counter() - started
    result.nbytes = unit.bytes_read
    return result


class _Region:
    """A task's sink: its samples written into the region ``[start, stop)`` of the store, the
    per-sample fields a file (shard) at a time, the block-chunked values kept for the driver."""

    def __init__(self, store: Store, start: int, stop: int, unit: SourceUnit) -> None:
        self.store, self.start, self.stop = store, start, stop
        self.fields = store.schema.fields
        self.per_sample = [f for f in self.fields if f.chunking == "sample"]
        self.flush_every = max(file_unit(store), 16)
        self.result = UnitResult(unit.identity(), str(unit.path), start, [],
                                 {f.name: [] for f in self.fields if f.chunking == "block"},
                                 [], "", "", 0.0, 0)
        self.held: set[str] = set()
        self.buffered: list[dict[str, Any]] = []

    def __contains__(self, sample_id: object) -> bool:
        return sample_id in self.held

    def append(self, sample_id: str, values: dict[str, Any]) -> None:
        values = dict(self.store.with_added_defaults(values))
        validate_sample(self.fields, sample_id, values)
        result = self.result
        if self.start + len(result.ids) >= self.stop:
            raise DistributedIngestError(
                f"{result.path}: more samples than the {self.stop - self.start} its scan "
                f"counted; the source's max_samples is wrong")
        result.ids.append(sample_id)
        self.held.add(sample_id)
        for name, column in result.blocks.items():
            column.append(values[name])
        self.buffered.append(values)
        if len(self.buffered) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        first = self.start + len(self.result.ids) - len(self.buffered)
        for f in self.per_sample:
            self.store.check_writable(f, first, first + len(self.buffered))
            self.store.array(f.name)[first: first + len(self.buffered)] = stack_column(
                f, [values[f.name] for values in self.buffered])
        self.buffered.clear()


@contextmanager
def dask_client(address: str | None, workers: int) -> Iterator[Any]:
    """A client of the scheduler at ``address``, or of a ``LocalCluster`` of ``workers``
    single-threaded processes started (and stopped) here."""
    distributed = require_distributed()
    if address:
        with distributed.Client(address) as client:
            yield client
        return
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        yield client


def require_distributed() -> Any:
    """The ``distributed`` module, or a :class:`MissingExtraError` naming the extra."""
    try:
        import distributed
        import distributed.comm.addressing
    except ImportError as exc:
        raise MissingExtraError(f"--scheduler dask needs dask.distributed ({exc}); install "
                                f"the 'scale' extra: pip install 'arraystore[scale]'") from exc
    return distributed


def check_scheduler_address(address: str) -> None:
    """Refuse an address no scheduler can have (``notaurl``: no port) with a typed error,
    before the store is opened or anything is written."""
    addressing = require_distributed().comm.addressing
    try:
        scheme, location = addressing.parse_address(address)
        if scheme in ("tcp", "tls", "ws", "wss"):
            addressing.parse_host_port(location)
    except ValueError as exc:
        raise OptionError(f"--dask-address {address!r}: {exc}; give the address of a running "
                          f"scheduler, e.g. tcp://host:8786") from exc


def ingest_distributed(
    source: Source,
    inputs: Sequence[str | os.PathLike[str]],
    out: StoreTarget,
    *,
    mode: WriteMode = "append",
    layout: Layout | None = None,
    on_error: str = "fail",
    storage_options: Mapping[str, Any] | None = None,
    break_lock: bool = False,
    address: str | None = None,
    workers: int | None = None,
    on_progress: Callable[[ProgressBoard, IngestReport, int], None] | None = None,
    on_client: Callable[[Any], None] | None = None,
) -> IngestReport:
    """Ingest ``inputs`` through ``source`` into ``out`` on Dask; see the module docstring.

    ``address``: a running scheduler (``tcp://host:8786``); without one, a ``LocalCluster`` of
    ``workers`` processes (default: the number of cores). ``on_progress(board, report,
    units_left)`` is called as workers report; ``on_client(client)`` once the cluster is up
    (the CLI prints the dashboard link). Other arguments as :func:`arraystore.ingest.ingest`.
    """
    require_distributed()  # before the store is made
    if address:
        check_scheduler_address(address)
    with writing(source, inputs, out, mode, layout, storage_options, break_lock) as (units, store):
        report = IngestReport(store=str(store.path), source=source.name, started=utc_now())
        todo = []
        for unit in units:
            if already_ingested(store, unit):
                report.units_already_done.append(str(unit.path))
            else:
                todo.append(unit)
        try:
            _run(source, todo, store, report, on_error, address,
                 workers or available_cores(), on_progress, on_client)
        finally:
            report.finished = utc_now()
            if report.skipped:
                write_report(store, report)
    return report


def _capacity(source: Source, unit: SourceUnit) -> int:
    capacity = source.max_samples(unit)
    if capacity is None:
        raise DistributedIngestError(
            f"source {source.name!r} cannot say how many samples {unit.path} holds before "
            f"reading it, which a distributed ingest needs; ingest it without --scheduler dask")
    return capacity


def _run(source: Source, todo: list[SourceUnit], store: Store, report: IngestReport,
         on_error: str, address: str | None, workers: int,
         on_progress: Callable[[ProgressBoard, IngestReport, int], None] | None,
         on_client: Callable[[Any], None] | None) -> None:
    from distributed import as_completed

    regions = reserve(store, [(u.identity(), _capacity(source, u)) for u in todo])
    board = ProgressBoard()
    with StoreWriter(store) as writer, dask_client(address, workers) as client:
        if on_client is not None:
            on_client(client)

        def progressed(event: tuple[float, dict[str, Any]]) -> None:
            board.update(event[1])
            if on_progress is not None:
                on_progress(board, report, len(futures))

        client.subscribe_topic(PROGRESS_TOPIC, progressed)
        futures = {
            client.submit(ingest_unit, source, unit, store.location, start, stop, on_error,
                          key=f"arraystore-{unit.label}-{start}", pure=False): unit
            for unit, (start, stop) in zip(todo, regions, strict=True)
        }
        try:
            for future in as_completed(list(futures)):
                result: UnitResult = future.result()
                del futures[future]
                if result.failure is not None:  # the shards committed so far stay committed
                    failure = result.failure
                    raise SampleError(failure.where, failure.sample_id, failure.reason)
                _commit_unit(writer, store, result, report)
                if on_progress is not None:
                    on_progress(board, report, len(futures))
        finally:
            client.unsubscribe_topic(PROGRESS_TOPIC)
            for future in futures:
                future.cancel()


def _commit_unit(writer: StoreWriter, store: Store, result: UnitResult,
                 report: IngestReport) -> None:
    """Commit one finished unit's samples and record the unit (one metadata write)."""
    duplicates = writer.commit_region(result.start, result.ids, result.blocks)
    report.ingested += len(result.ids) - len(duplicates)
    report.already_stored += len(duplicates) + result.already_stored
    report.stage_seconds += result.stage_seconds
    report.skipped.extend(result.skipped)
    release(store, result.unit)
    store.provenance.setdefault("sources", []).append({
        **result.unit, "sha256": result.sha256, "finished": utc_now(),
        "skipped": len(result.skipped), "region": [result.start, result.start + len(result.ids)],
        "worker": result.worker, "seconds": round(result.seconds, 3),
    })
    store.save_meta()
    report.units_ingested.append(result.path)


