"""The one loop every ingest runs over a unit, in this process or in a task on a Dask worker.

records -> ids already stored skipped before they are decoded -> the rest derived (a record
may yield several samples, or skips) -> ids checked (no id twice in one run) -> samples batched
through the source's stage (a model), if it has one -> handed to a sink: the store writer
(:func:`arraystore.ingest.ingest`) or a task's region of the store
(:mod:`arraystore.distributed`). A broken sample, or an input unreadable from some point on,
stops the run (``on_error="fail"``, after the samples before it are handed on) or is listed
in the report (``"skip"``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Iterable, Iterator
from typing import Any, Protocol

from arraystore.allocator import keeping_freed_memory
from arraystore.errors import SampleError, SourceError
from arraystore.sources import BatchStage, Record, Skip, Source, SourceUnit, model_on_cpu
from arraystore.writer import sample_id_problem

# (record or its error, derived values or None, where and why it failed)
DerivedRecord = tuple[Record | SampleError, Any, str, str]
Derive = Callable[[Iterable[Record | SampleError]], Iterator[DerivedRecord]]
DUPLICATE = "duplicate sample id: stored earlier in this run"


class Sink(Protocol):
    """Where validated samples go: ``sample_id in sink`` once appended."""

    def __contains__(self, sample_id: object) -> bool: ...

    def append(self, sample_id: str, values: dict[str, Any]) -> None: ...


class Tally(Protocol):
    """What the loop counts (an :class:`arraystore.ingest.IngestReport` is one)."""

    ingested: int
    already_stored: int
    skipped: list[Skip]
    stage_seconds: float
    waiting_seconds: float


def ingest_unit_samples(source: Source, unit: SourceUnit, derive: Derive, sink: Sink,
                        stage: BatchStage | None, stored: Container[str], on_error: str,
                        tally: Tally,
                        progressed: Callable[[int | None], None] | None = None) -> None:
    """Run ``unit`` of ``source`` through the loop (see the module docstring) into ``sink``.

    ``derive`` turns records into derived values, in order (in worker processes or here);
    ``stored``: ids the store holds already (neither decoded nor written again);
    ``progressed(bytes)`` is told how far into the unit its records are, and ``None`` after
    each batch handed to the sink. Raises the first :class:`SampleError` (or the
    :class:`SourceError`) with ``on_error="fail"``.
    """
    pending: dict[str, dict[str, Any]] = {}  # derived, waiting for the batch stage
    batch = stage.batch_size if stage is not None else 1

    def write_pending() -> None:
        if stage is not None and pending:
            started = time.perf_counter()
            stage(list(pending.values()))
            tally.stage_seconds += time.perf_counter() - started
        for sample_id, values in pending.items():
            sink.append(sample_id, values)
            tally.ingested += 1
        pending.clear()
        if progressed is not None:
            progressed(None)

    def fail_or_skip(error: SampleError) -> None:
        if on_error == "fail":
            write_pending()  # the good samples before the bad one are kept
            raise error
        tally.skipped.append(Skip(error.where, error.sample_id, error.reason))

    def add(sample_id: str, values: dict[str, Any], where: str) -> None:
        if sample_id in stored:
            tally.already_stored += 1
        elif sample_id in sink or sample_id in pending:
            fail_or_skip(SampleError(where, sample_id, DUPLICATE))
        else:
            pending[sample_id] = values
            if len(pending) >= batch:
                write_pending()

    def fresh(items: Iterable[Record | SampleError]) -> Iterator[Record | SampleError]:
        """Records not stored yet; a record whose id no store can hold becomes its error."""
        for item in items:
            if isinstance(item, Record):
                ids = item.parts or (item.sample_id,)
                if all(i in stored for i in ids):  # nothing new: not even decoded
                    tally.already_stored += len(ids)
                    continue
                problem = sample_id_problem(item.sample_id)
                if problem:
                    item = SampleError(item.where, item.sample_id, problem)
            yield item

    results = derive(fresh(source.records(unit)))
    # a model on the CPU reuses the memory its last batch freed (see arraystore.allocator)
    with keeping_freed_memory(stage is not None and model_on_cpu(source)):
        try:
            while True:
                started = time.perf_counter()
                try:
                    item, values, where, reason = next(results)
                except StopIteration:
                    break
                tally.waiting_seconds += time.perf_counter() - started
                if isinstance(item, SampleError):
                    fail_or_skip(item)
                    continue
                if progressed is not None:
                    progressed(item.progress)
                if values is None:
                    fail_or_skip(SampleError(where, item.sample_id, reason))
                elif isinstance(values, list):  # the parts of a record that yields several samples
                    for part in values:
                        if isinstance(part, Skip):
                            tally.skipped.append(part)
                        else:
                            add(part.sample_id, part.values, item.where)
                else:
                    add(item.sample_id, values, item.where)
        except SourceError as exc:
            write_pending()
            if on_error == "fail":
                raise
            tally.skipped.append(Skip(exc.path, "*", f"rest of the input unreadable: {exc.reason}"))
        write_pending()
