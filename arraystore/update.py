"""In-place updates of committed samples (``arraystore fix ...``).

Some fields of some samples are rewritten a file at a time (a whole shard in the sharded layout,
read, patched and written back once), the files are fsynced, and only then are the samples'
flag fields set. A kill at any moment leaves every sample either as it was, flag unset, or fully
updated, flag set; re-running the same fix finishes the job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from arraystore.errors import SampleNotCommittedError, StoreWriteError
from arraystore.keys import chunk_key, group_by_chunk
from arraystore.lock import StoreLock
from arraystore.schema import Field
from arraystore.store import Store


class StoreUpdater:
    """Rewrite fields of committed samples; holds the store's writer lock while open."""

    def __init__(self, store: Store) -> None:
        if store.read_only:
            raise ValueError(f"{store.path}: opened read-only; open it with mode 'r+'")
        self.store = store
        self._lock: StoreLock | None = StoreLock(store.location)
        self._lock.acquire()
        store.claim(self._lock.token)  # its token in the store: its metadata writes are fenced
        self.committed = store.committed_mask()
        self.unlisted: dict[str, Field] = {}  # arrays written before they join the schema

    def field(self, name: str) -> Field:
        """The field of ``name``: the schema's, or one being added (:attr:`unlisted`)."""
        return self.unlisted.get(name) or self.store.schema[name]

    def __enter__(self) -> StoreUpdater:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def file_groups(self, positions: Sequence[int], fields: Sequence[str]) -> list[list[int]]:
        """``positions`` grouped by the file that holds them in ``fields``, in file order."""
        per_file = max(self.store.layout.samples_per_file(self.field(f)) for f in fields)
        return list(group_by_chunk(sorted(positions), per_file).values())

    def write(self, positions: Sequence[int], values: Mapping[str, np.ndarray],
              flags: Mapping[str, Any]) -> None:
        """Set ``values[field][i]`` at ``positions[i]``, make it durable, then set ``flags``
        (a value for every position, or one per position)."""
        positions = [int(p) for p in positions]
        uncommitted = [p for p in positions if not self.committed[p]]
        if uncommitted:
            raise SampleNotCommittedError(
                f"{self.store.path}: samples {uncommitted[:5]} are not committed; only complete "
                f"samples can be updated")
        try:
            for name, rows in values.items():
                self._rewrite(name, positions, np.asarray(rows))
            self._lock.ensure_held()
            for name, value in flags.items():
                flag = np.asarray(value, dtype=self.field(name).numpy_dtype)
                self._rewrite(name, positions, np.broadcast_to(flag, (len(positions),)))
        except OSError as exc:
            raise StoreWriteError(f"{self.store.path}: updating samples {positions[:5]}... "
                                  f"failed: {exc}; their flags are unchanged, re-run to "
                                  f"finish") from exc

    def _rewrite(self, name: str, positions: list[int], rows: np.ndarray) -> None:
        field = self.field(name)
        if rows.shape != (len(positions), *field.shape):
            raise ValueError(f"{name}: rows of shape {rows.shape}, expected "
                             f"{(len(positions), *field.shape)}")
        array = self.store.array(name)
        per_file = self.store.layout.samples_per_file(field)
        row_of = {position: row for row, position in enumerate(positions)}
        written = []
        for index, here in group_by_chunk(positions, per_file).items():
            start = index * per_file
            stop = min(start + per_file, array.shape[0])
            current = np.asarray(array[start:stop])
            for position in here:
                current[position - start] = rows[row_of[position]]
            self.store.check_writable(field, start, stop)
            array[start:stop] = current  # the whole file, written once
            written.append(chunk_key(name, index, 1 + len(field.shape)))
        self.store.location.make_durable(written)  # before the flags that say it is done
