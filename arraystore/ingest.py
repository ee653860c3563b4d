"""Run a source into a store: records read here, derived in a pool of workers, written here.

The writer process reads each unit's records (cheap: bytes out of a TAR stream), hands them to
``workers`` processes that decode and derive fields, and receives the samples back in input order
with a bounded number in flight, so memory stays flat whatever the shard size. It is the only
process that writes the store. Units already ingested (recorded in provenance with size and
checksum) are skipped without being read; samples already committed are skipped, so re-running a
command resumes it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from arraystore.errors import SampleError, WorkerDiedError
from arraystore.ingest_loop import DerivedRecord, ingest_unit_samples
from arraystore.layout import Layout
from arraystore.location import Location
from arraystore.lock import StoreLock
from arraystore.ownership import refuse_inputs_inside
from arraystore.sources import (
    BatchStage,
    Part,
    Record,
    Skip,
    Source,
    SourceUnit,
    default_workers,
)
from arraystore.store import Store, StoreTarget, WriteMode, open_for_writing, utc_now
from arraystore.writer import StoreWriter

OnError = Literal["fail", "skip"]
ON_ERROR_CHOICES: tuple[str, ...] = ("fail", "skip")
REPORTS_SUFFIX = ".reports"  # beside the store: zarr warns about foreign files inside a group


@dataclass
class IngestReport:
    """What one ingest run did; written as JSON to ``<store>.reports/`` beside the store."""

    store: str
    source: str
    started: str
    finished: str = ""
    ingested: int = 0
    already_stored: int = 0
    units_ingested: list[str] = field(default_factory=list)
    units_already_done: list[str] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    report_path: str = ""
    stage_setup_seconds: float = 0.0  # building the batch stage (loading a model), once
    stage_seconds: float = 0.0  # in the batch stage (a model), writer process
    waiting_seconds: float = 0.0  # the writer waiting for workers' results

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_WORKER_SOURCE: Source | None = None


def _init_worker(source: Source) -> None:
    global _WORKER_SOURCE
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the writer process handles Ctrl-C
    _WORKER_SOURCE = source
    source.prepare_worker()


Derived = tuple[dict[str, Any] | list[Part | Skip] | None, str, str]  # or None, where, why


def derive_record(record: Record, source: Source | None = None) -> Derived:
    """Derive one record; a failure comes back as where and why (exceptions may not pickle)."""
    source = source or _WORKER_SOURCE
    assert source is not None, "worker used before _init_worker"
    try:
        return source.derive(record), "", ""
    except SampleError as exc:
        return None, exc.where, exc.reason
    except Exception as exc:  # any decoder error is this sample's problem, not the run's
        return None, record.where, f"{type(exc).__name__}: {exc}"


def derive_here(source: Source, items: Iterable[Record | SampleError]) -> Iterator[DerivedRecord]:
    """Each record derived in this process, in order; an error passes through as it is."""
    for item in items:
        yield (item, None, item.where, item.reason) if isinstance(item, SampleError) else (
            item, *derive_record(item, source))


class DerivePool:
    """Derive records in worker processes, yielding results in input order, few in flight.

    A worker that dies (killed by the OS, out of memory) breaks the pool; that is reported as a
    :class:`WorkerDiedError` instead of waiting forever for its result.
    """

    def __init__(self, source: Source, workers: int, lookahead: int = 0) -> None:
        self.source = source
        self.workers = workers
        self.lookahead = max(2 * workers, lookahead)
        self._pool: ProcessPoolExecutor | None = None
        if workers > 1:
            self._pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                             initializer=_init_worker, initargs=(source,))
        else:
            source.prepare_worker()

    def __enter__(self) -> DerivePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def derive(self, items: Iterable[Record | SampleError]) -> Iterator[DerivedRecord]:
        if self._pool is None:
            yield from derive_here(self.source, items)
            return
        window: deque[tuple[Record | SampleError, Future | None]] = deque()
        try:
            for item in items:
                pending = None if isinstance(item, SampleError) else self._pool.submit(
                    derive_record, item)
                window.append((item, pending))
                if len(window) >= self.lookahead:
                    yield self._next(window)
            while window:
                yield self._next(window)
        except BrokenProcessPool as exc:
            in_flight = [i.sample_id for i, p in window if p is not None]
            raise WorkerDiedError(
                f"a decode worker process died (killed by the OS? out of memory?) while deriving "
                f"one of the samples {in_flight}; the samples before them are committed: re-run "
                f"the same command to resume, with fewer --workers if memory is short. Calling "
                f"ingest() from a script? Workers start with 'spawn' and re-import the main "
                f"module: put the call under `if __name__ == \"__main__\":`"
            ) from exc

    @staticmethod
    def _next(window: deque[tuple[Record | SampleError, Future | None]]):
        """The oldest result; its item leaves the window only once its result is in."""
        item, pending = window[0]
        result = (item, None, item.where, item.reason) if pending is None else (
            item, *pending.result())
        window.popleft()
        return result


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[samples]} samples"),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def already_ingested(store: Store, unit: SourceUnit) -> bool:
    identity = unit.identity()
    return any(
        {k: entry.get(k) for k in identity} == identity
        for entry in store.provenance.get("sources", [])
    )


def ingest(
    source: Source,
    inputs: Sequence[str | os.PathLike[str]],
    out: StoreTarget,
    *,
    mode: WriteMode = "append",
    layout: Layout | None = None,
    workers: int | None = None,
    on_error: OnError = "fail",
    progress: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    break_lock: bool = False,
) -> IngestReport:
    """Ingest ``inputs`` through ``source`` into the store at ``out``; see the module docstring.

    ``out`` is a local path or an object-store URL (``s3://bucket/x.zarr``, configured by
    ``storage_options`` and the service's environment variables). ``on_error="fail"`` stops at
    the first broken sample with a :class:`SampleError` (what was written before it stays
    committed, and re-running resumes); ``"skip"`` leaves broken samples out and lists each,
    with its reason, in the returned report and the JSON report file. ``break_lock`` takes over
    an object store's stale writer lock (:mod:`arraystore.lock`).
    """
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    workers = max(1, workers if workers is not None else default_workers(source))
    with writing(source, inputs, out, mode, layout, storage_options, break_lock) as (units, store):
        return _run(source, units, store, workers, on_error, progress)


@contextmanager
def writing(source: Source, inputs: Sequence[str | os.PathLike[str]], out: StoreTarget,
            mode: WriteMode, layout: Layout | None, storage_options: Mapping[str, Any] | None,
            break_lock: bool) -> Iterator[tuple[list[SourceUnit], Store]]:
    """The units of ``inputs``, and the store at ``out`` opened (or created) for them, with
    its writer lock held: how every ingest, local or distributed, begins."""
    if mode == "overwrite":
        refuse_inputs_inside(out, inputs)
    units = source.units(inputs)
    schema = source.schema(units)
    location = Location.of(out, storage_options)
    with StoreLock(location, break_lock=break_lock):
        yield units, open_for_writing(location, schema, layout, mode,
                                      extra_attrs=source.store_attrs(units))


def _run(source: Source, units: list[SourceUnit], store: Store, workers: int, on_error: OnError,
         progress: bool) -> IngestReport:
    report = IngestReport(store=str(store.path), source=source.name, started=utc_now())
    todo = [unit for unit in units if not already_ingested(store, unit)]
    report.units_already_done = [str(u.path) for u in units if u not in todo]
    if not todo:  # nothing to do: no model built, no worker started
        report.finished = utc_now()
        return report
    started = time.perf_counter()
    stage = source.batch_stage()
    report.stage_setup_seconds = time.perf_counter() - started
    if stage is not None:
        store.provenance[stage.name] = {**stage.describe(), "used_from": utc_now()}
    # decoding runs ahead of the writer by two batches, so a model stage never waits on it
    lookahead = 2 * stage.batch_size if stage is not None else 0
    try:
        with StoreWriter(store) as writer, DerivePool(source, workers, lookahead) as pool, \
                _progress(progress) as bar:
            preexisting = set(writer.committed_ids)
            for unit in todo:
                skips_before = len(report.skipped)
                _ingest_unit(source, unit, writer, pool, stage, preexisting, on_error, report,
                             bar)
                writer.flush()
                store.provenance.setdefault("sources", []).append({
                    **unit.identity(), "sha256": unit.digest.hexdigest(), "finished": utc_now(),
                    "skipped": len(report.skipped) - skips_before,
                })
                store.save_meta()
                report.units_ingested.append(str(unit.path))
    finally:
        report.finished = utc_now()
        if report.skipped:
            write_report(store, report)
    return report


def _ingest_unit(source: Source, unit: SourceUnit, writer: StoreWriter, pool: DerivePool,
                 stage: BatchStage | None, preexisting: set[str], on_error: OnError,
                 report: IngestReport, bar: Progress) -> None:
    task = bar.add_task(unit.label, total=unit.size, samples=0)

    def progressed(completed: int | None) -> None:
        if completed is None:
            bar.update(task, samples=report.ingested)
        else:
            bar.update(task, completed=completed)

    ingest_unit_samples(source, unit, pool.derive, writer, stage, preexisting, on_error, report,
                        progressed)
    bar.update(task, completed=unit.size)


def write_report(store: Store, report: IngestReport) -> None:
    """Save ``report`` as JSON in ``<store>.reports/`` beside the store; sets its path."""
    stamp = report.started.replace(":", "").replace("+0000", "Z")
    name = f"ingest-{stamp}-{os.getpid()}.json"
    report.report_path = store.location.sibling_path(REPORTS_SUFFIX, name)
    store.location.write_sibling(REPORTS_SUFFIX, name,
                                 json.dumps(report.to_json(), indent=2).encode())
