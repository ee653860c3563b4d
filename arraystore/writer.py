"""The store writer: the only process that writes a store.

Samples are validated against the schema as they arrive, buffered, and written a file's worth at a
time (a whole shard in the sharded layout, so no shard is rewritten per sample). A flush writes
every field's data, fsyncs the files it wrote, and only then marks those samples ``committed``:
a crash at any moment leaves complete samples committed and nothing else visible to readers.
Zarr's local store writes each chunk to a temporary file and renames it into place, so a torn
chunk never reads as data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from arraystore.errors import DuplicateSampleError, SampleValidationError, StoreWriteError
from arraystore.keys import chunk_folder, chunk_key
from arraystore.lock import StoreLock
from arraystore.regions import PENDING, reserved_end
from arraystore.schema import Field
from arraystore.store import COMMITTED_ARRAY, COMMITTED_FIELD, SAMPLE_ARRAY, SAMPLE_FIELD, Store

DEFAULT_RAW_FLUSH = 32


def sample_id_problem(sample_id: object) -> str | None:
    """Why ``sample_id`` cannot be stored, or None: ids are non-empty ``str`` without NUL
    characters (readers pack them into one bytes array, which cannot hold a trailing NUL)."""
    if isinstance(sample_id, str) and sample_id and "\0" not in sample_id:
        return None
    return f"sample id {sample_id!r}: expected a non-empty str without NUL characters"


def validate_sample(fields: tuple[Field, ...], sample_id: str, values: Mapping[str, Any]) -> None:
    """Check that ``sample_id`` is usable and ``values`` holds exactly the schema's fields with
    their shapes and dtypes."""
    problem = sample_id_problem(sample_id)
    if problem:
        raise SampleValidationError(problem)
    expected = {f.name for f in fields}
    missing, extra = expected - set(values), set(values) - expected
    if missing or extra:
        raise SampleValidationError(
            f"sample {sample_id!r}: fields missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    for f in fields:
        value = values[f.name]
        if f.is_string:
            if not isinstance(value, str):
                raise SampleValidationError(
                    f"sample {sample_id!r}, field {f.name!r}: expected str, got "
                    f"{type(value).__name__}"
                )
            continue
        if not isinstance(value, np.ndarray | np.generic):
            raise SampleValidationError(
                f"sample {sample_id!r}, field {f.name!r}: expected a numpy array, got "
                f"{type(value).__name__}"
            )
        if value.shape != f.shape or value.dtype != np.dtype(f.dtype):
            raise SampleValidationError(
                f"sample {sample_id!r}, field {f.name!r}: got shape {value.shape} dtype "
                f"{value.dtype}, expected shape {f.shape} dtype {f.dtype}"
            )


def uncommitted_ranges(committed: np.ndarray, stop: int) -> list[tuple[int, int]]:
    """The ranges of slots below ``stop`` that ``committed`` does not mark (slots past its
    end included)."""
    marks = np.zeros(stop, bool)
    marks[:min(stop, len(committed))] = committed[:stop]
    edges = np.flatnonzero(np.diff(np.concatenate(([True], marks, [True])).astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def stack_column(f: Field, column: Sequence[Any]) -> np.ndarray:
    """Values of ``f`` for consecutive samples as one array to assign to a slice of it."""
    return np.array(column, dtype=f.numpy_dtype) if f.is_string else np.stack(column)


class StoreWriter:
    """Append samples to a store opened for writing; use as a context manager.

    Resuming: slots after the last committed sample are reused (they hold data of a flush that a
    crash interrupted) and ids already committed are refused, so re-running an ingest fills
    exactly what is missing. Regions reserved for a distributed ingest's unfinished units are
    never reused (:mod:`arraystore.regions`). The writer holds the store's lock from
    construction to ``close``.
    """

    def __init__(self, store: Store, flush_every: int | None = None) -> None:
        if store.read_only:
            raise ValueError(f"{store.path}: opened read-only; open it with mode 'r+'")
        self._lock = StoreLock(store.location)
        self._lock.acquire()
        self.store = store
        store.fence = self._lock.ensure_held
        store.claim(self._lock.token)  # its token in the store: its metadata writes are fenced
        self.fields = store.schema.fields
        self.flush_every = flush_every or self._flush_unit(store)
        committed = store.committed_mask()
        self.committed_ids = store.committed_ids(committed)
        self.position = int(np.flatnonzero(committed)[-1]) + 1 if committed.any() else 0
        self._buffer: list[tuple[str, Mapping[str, Any]]] = []
        self._buffered_ids: set[str] = set()
        self._arrays = {f.name: store.array(f.name) for f in self.fields}
        self.position = max(self.position, reserved_end(store))
        if self._lock.took_over:
            self.position = self._past_the_former_holder(committed)
        self._remove_partials()

    def _past_the_former_holder(self, committed: np.ndarray) -> int:
        """Where a writer that broke a stale lock starts: past every slot its former holder,
        if it is only paused, can still write when it wakes (the arrays' lengths, its regions,
        and a flush it may not have grown the arrays for yet), at a file boundary of every
        array, so that no chunk or block file is shared with it. Every slot before that start
        not ``committed`` now is revoked: a commit the former holder makes there when it wakes
        counts for no reader. Its regions are forgotten (their units get new ones), in the
        same metadata write."""
        store, layout = self.store, self.store.layout
        every = (*self.fields, SAMPLE_FIELD, COMMITTED_FIELD)
        reach = max([reserved_end(store), *(store.array(f.name).shape[0] for f in every)])
        gap = max(layout.block_size, layout.shard_size, DEFAULT_RAW_FLUSH, self.flush_every)
        unit = math.lcm(*(layout.samples_per_file(f) for f in every))
        start = -(-(reach + gap) // unit) * unit
        store.claim(self._lock.token, revoke=uncommitted_ranges(committed, start),
                    edit=lambda meta: meta.setdefault("provenance", {}).update({PENDING: []}))
        return start

    @staticmethod
    def _flush_unit(store: Store) -> int:
        """Samples per flush: a shard's worth (no shard rewritten per sample), a few samples
        when each has its own chunk files, a block's worth when every field is chunked in
        blocks (each flush rewrites the block: rows of embeddings, not per-sample files)."""
        if not any(f.chunking == "sample" for f in store.schema.fields):
            return store.layout.block_size
        return store.layout.shard_size if store.layout.sharded else DEFAULT_RAW_FLUSH

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Samples already buffered are complete and valid: keep them even when the caller failed
        # (a bad input sample must not lose the good ones before it). A failing flush is not
        # retried: the store stays consistent and the next run resumes.
        try:
            if not isinstance(exc, OSError):
                self.flush()
                self.store.save_meta()  # the xarray view lists what is committed now
        finally:
            self.close()

    def close(self) -> None:
        """Release the store's lock (buffered samples not flushed are dropped)."""
        if self._lock is not None:
            self.store.fence = None
            self._lock.release()
            self._lock = None

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.committed_ids or sample_id in self._buffered_ids

    def append(self, sample_id: str, values: Mapping[str, Any]) -> None:
        """Queue one sample; it is written and committed at the next flush."""
        if sample_id in self:
            raise DuplicateSampleError(f"{self.store.path}: sample {sample_id!r} is already stored")
        values = self.store.with_added_defaults(values)
        validate_sample(self.fields, sample_id, values)
        self._buffer.append((sample_id, values))
        self._buffered_ids.add(sample_id)
        if (self.position + len(self._buffer)) % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        """Write the buffered samples, make them durable, then mark them committed."""
        if not self._buffer:
            return
        start, stop = self.position, self.position + len(self._buffer)
        try:
            self._write(start, stop)
        except OSError as exc:
            raise StoreWriteError(
                f"{self.store.path}: writing samples {start}-{stop - 1} failed: {exc}. The "
                f"{start} samples before them are committed and intact; fix the cause (free "
                f"disk space) and re-run the same command to resume"
            ) from exc
        self.committed_ids.update(sample_id for sample_id, _ in self._buffer)
        self._buffer.clear()
        self._buffered_ids.clear()
        self.position = stop

    def _write(self, start: int, stop: int) -> None:
        ids = [sample_id for sample_id, _ in self._buffer]
        # grow only: arrays may be longer already (after a crash between two resizes, or
        # grown by a writer that took the store over from this one)
        grown = self.store.grow((*self._arrays, SAMPLE_ARRAY, COMMITTED_ARRAY), stop)
        self._arrays = {name: grown[name] for name in self._arrays}
        for f in self.fields:
            column = [values[f.name] for _, values in self._buffer]
            self.store.check_writable(f, start, stop)
            self._arrays[f.name][start:stop] = stack_column(f, column)
        self._commit(start, ids, np.ones(len(ids), bool), self.fields)

    def _commit(self, start: int, ids: Sequence[str], keep: np.ndarray,
                written: Sequence[Field]) -> None:
        """Write the ids of ``[start, start + len(ids))``, make those samples' files of
        ``written`` durable, then mark the ``keep`` ones committed."""
        stop = start + len(ids)
        for f in (SAMPLE_FIELD, COMMITTED_FIELD):
            self.store.check_writable(f, start, stop)
        self.store.array(SAMPLE_ARRAY)[start:stop] = np.array(ids, dtype=SAMPLE_FIELD.numpy_dtype)
        self._sync(start, stop, written)
        self._lock.ensure_held()
        self.store.array(COMMITTED_ARRAY)[start:stop] = keep
        self.store.location.make_durable(self._keys(COMMITTED_FIELD, start, stop))

    def commit_region(self, start: int, ids: Sequence[str],
                      blocks: Mapping[str, Sequence[Any]]) -> list[str]:
        """Commit samples written elsewhere (a distributed ingest's worker wrote their
        per-sample fields to ``[start, start + len(ids))``): write their block-chunked fields
        ``blocks`` and ids, sync, mark them committed. Ids already committed (or repeated) are
        left uncommitted and returned."""
        if not ids:
            return []
        stop = start + len(ids)
        keep = np.ones(len(ids), bool)
        for i, sample_id in enumerate(ids):
            keep[i] = sample_id not in self.committed_ids
            self.committed_ids.add(sample_id)
        for f in self.fields:
            if f.chunking == "block":
                self.store.check_writable(f, start, stop)
                self._arrays[f.name][start:stop] = stack_column(f, blocks[f.name])
        self._commit(start, ids, keep, self.fields)
        return [sample_id for sample_id, k in zip(ids, keep, strict=True) if not k]

    def _remove_partials(self) -> None:
        """Delete temporary files a killed write left (``*.partial`` beside the chunks and
        metadata past the committed prefix; nothing reads them, but they take space). The
        folders are listed lazily: an object store, which has no such files, reads nothing."""
        self.store.location.remove_partials(self._partial_folders())

    def _partial_folders(self) -> Iterator[str]:
        yield ""  # the store's root
        for f in (*self.fields, SAMPLE_FIELD, COMMITTED_FIELD):
            per_file = self.store.layout.samples_per_file(f)
            first = self.position // per_file
            last = max(first, (self._arrays[f.name].shape[0] if f.name in self._arrays
                               else len(self.store)) // per_file)
            yield f.name
            for i in range(first, last + 1):
                yield chunk_folder(f.name, i, 1 + len(f.shape))

    def _sync(self, start: int, stop: int, written: Sequence[Field]) -> None:
        """Before the commit: the data of samples ``start`` to ``stop`` on stable storage."""
        self.store.location.make_durable(
            key for f in (*written, SAMPLE_FIELD) for key in self._keys(f, start, stop))

    def _keys(self, f: Field, start: int, stop: int) -> Iterator[str]:
        """The files samples ``start`` to ``stop`` of ``f`` were written to, and its metadata."""
        per_file = self.store.layout.samples_per_file(f)
        for index in range(start // per_file, (stop - 1) // per_file + 1):
            yield chunk_key(f.name, index, 1 + len(f.shape))
        yield f"{f.name}/zarr.json"
