"""``arraystore verify``: is the store consistent, and is every committed sample's data there?

Checks, naming the field, sample and file of each problem:
- the metadata of every array agrees whole with what the schema and layout in the group
  attributes make (:func:`arraystore.contract.disagreements`), is no link, and every array is
  long enough; ``committed`` covers no block that is not stored and no slot without an id,
  and no block of it is lost between stored ones while holding samples committed nowhere else;
- every committed sample's chunk (or its inner chunk in a shard) exists inside the store (no
  link, nothing resolving outside it) with the size an uncompressed chunk must have, shard
  indexes are sound (no entry overlapping another), string chunks decode, and each crc32c
  matches where the layout has one;
- no sample id is committed twice;
- with ``deep``, every committed sample of every field decodes through zarr-python (zstd too).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from arraystore.chunk_format import CRC_BYTES, EMPTY, crc_matches, decode_vlen_utf8
from arraystore.contract import disagreements
from arraystore.errors import ArrayStoreError, StoreFormatError
from arraystore.keys import chunk_key, group_by_chunk
from arraystore.readers.base import fetch_shard_index
from arraystore.schema import Field
from arraystore.store import (
    COMMITTED_FIELD,
    SAMPLE_FIELD,
    Store,
    StoreTarget,
    expected_array_metadata,
)


@dataclass
class Problem:
    field: str
    sample: str
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: sample {self.sample}: {self.message} ({self.file})"


@dataclass
class VerifyReport:
    store: str
    deep: bool
    samples: int = 0
    committed: int = 0
    chunks_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what is sound but worth knowing

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class _Checker:
    def __init__(self, store: Store, report: VerifyReport, deep: bool) -> None:
        self.store, self.report, self.deep = store, report, deep
        self.layout = store.layout
        committed = store.committed_mask()
        self.positions = np.flatnonzero(committed)
        self.ids = store.sample_ids()
        if len(self.ids) < len(committed):
            raise StoreFormatError(
                f"{store.path}: 'sample' holds {len(self.ids)} ids, but 'committed' covers "
                f"{len(committed)} samples")
        self.extent = int(self.positions[-1]) + 1 if len(self.positions) else 0

    def problem(self, f: Field, position: int | None, key: str, message: str) -> None:
        sample = "*" if position is None else f"{self.ids[position]!s} (#{position})"
        self.report.problems.append(Problem(f.name, sample, self.store.location.where(key),
                                            message))

    def check(self, f: Field) -> None:
        location = self.store.location
        if not self._metadata_ok(f):
            return
        per_file = self.layout.samples_per_file(f)
        for index, positions in group_by_chunk(self.positions, per_file).items():
            key = chunk_key(f.name, index, 1 + len(f.shape))
            refused = location.problem(key)
            size = None if refused else location.size(key)
            if refused:
                self.problem(f, positions[0], key, f"refused: {refused}")
            elif size is None:
                self.problem(f, positions[0], key, f"chunk file missing ({len(positions)} "
                                                   f"committed samples in it)")
            elif f.chunking == "sample" and self.layout.sharded:
                self._check_shard(f, key, size, positions)
            else:
                self._check_chunk(f, key, positions[0], self.layout.samples_per_chunk(f))
        if self.deep:
            self._decode(f)

    def _metadata_ok(self, f: Field) -> bool:
        key = f"{f.name}/zarr.json"
        refused = self.store.location.problem(f.name) or self.store.location.problem(key)
        if refused:
            self.problem(f, None, key, f"refused: {refused}")
            return False
        try:
            meta = json.loads(self.store.location.read_bytes(key))
        except (OSError, ValueError) as exc:
            self.problem(f, None, key, f"array metadata unreadable: {exc}")
            return False
        problems = disagreements(expected_array_metadata(f, self.layout), meta)
        for message in problems:
            self.problem(f, None, key, message)
        if problems:
            return False
        if meta["shape"][0] < self.extent:
            self.problem(f, None, key, f"holds {meta['shape'][0]} samples; committed samples "
                                       f"reach {self.extent}")
            return False
        return True

    def _uncompressed_bytes(self, f: Field, samples: int) -> int | None:
        if f.is_string or self.layout.compression != "none":
            return None
        return samples * f.nbytes + (CRC_BYTES if self.layout.checksum else 0)

    def _check_chunk(self, f: Field, key: str, position: int, samples: int) -> None:
        data = self.store.location.read_bytes(key)
        self.report.chunks_checked += 1
        self._check_bytes(f, key, position, memoryview(data),
                          self._uncompressed_bytes(f, samples), samples)

    def _check_bytes(self, f: Field, key: str, position: int, data: memoryview,
                     expected: int | None, samples: int = 1) -> None:
        if expected is not None and len(data) != expected:
            self.problem(f, position, key, f"chunk of {len(data)} bytes, expected {expected}")
        elif self.layout.checksum and not crc_matches(data[:-CRC_BYTES],
                                                       bytes(data[-CRC_BYTES:])):
            self.problem(f, position, key, "crc32c mismatch: the chunk is corrupt")
        elif f.is_string and self.layout.compression == "none":  # zstd: decoded when deep
            body = data[:-CRC_BYTES] if self.layout.checksum else data
            try:
                decode_vlen_utf8(bytes(body), samples * max(1, int(np.prod(f.shape))), key)
            except StoreFormatError as exc:
                self.problem(f, position, key, f"corrupt string chunk: {exc}")

    def check_commit_blocks(self) -> None:
        """A ``committed`` block file lost between stored ones reads as "nothing committed":
        its samples silently drop out of every reader. Slots without an id are holes a writer
        left (a failed unit); an id in a lost block that is committed nowhere else is a sample
        whose commit mark is gone. Marks in revoked ranges (made after their writer's lock
        was broken) are noted, not counted."""
        block = self.store.array(COMMITTED_FIELD.name).chunks[0]
        stored = {int(n) for n in self.store.location.names(f"{COMMITTED_FIELD.name}/c")
                  if n.isdigit()}
        elsewhere = set(self.ids[self.positions].tolist())
        revoked = np.zeros(len(self.ids), bool)
        for start, stop in self.store.revoked():
            revoked[start:stop] = True
        for index in sorted(set(range(-(-len(self.ids) // block))) - stored):
            start = index * block
            lost = [start + i for i, sample_id in enumerate(self.ids[start:start + block].tolist())
                    if sample_id and sample_id not in elsewhere and not revoked[start + i]]
            if lost:
                self.problem(COMMITTED_FIELD, lost[0], chunk_key(COMMITTED_FIELD.name, index, 1),
                             f"this block of {COMMITTED_FIELD.name!r} is missing: {len(lost)} "
                             f"written samples in it are committed nowhere, so no reader "
                             f"sees them; restore the file from a copy of the store, or "
                             f"ingest their source into a new store")
        marks = self.store.array(COMMITTED_FIELD.name)
        late = sum(int(np.count_nonzero(marks[start:min(stop, len(self.ids))]))
                   for start, stop in self.store.revoked() if start < len(self.ids))
        if late:
            self.report.notes.append(
                f"{late} samples were marked committed by a writer after its lock was broken "
                f"(in the revoked slot ranges {self.store.revoked()}); no reader counts them")

    def check_ids(self) -> None:
        """Each committed sample must have an id (``committed`` set on a slot never written
        leaves the fill value), and a unique one: a duplicate would make two samples one in
        every index by id (xarray's ``sel``, resume, ``fix``)."""
        ids = self.ids[self.positions]
        for at in np.flatnonzero(ids == ""):  # the fill value: no writer stores it
            self.problem(SAMPLE_FIELD, int(self.positions[at]), SAMPLE_FIELD.name,
                         "committed, but has no id (its slot was never written)")
        values, first, counts = np.unique(ids, return_index=True, return_counts=True)
        repeated = counts > 1
        for value, at, count in zip(values[repeated], first[repeated], counts[repeated],
                                    strict=True):
            position = int(self.positions[at])
            self.problem(SAMPLE_FIELD, position, chunk_key(SAMPLE_FIELD.name, 0, 1),
                         f"sample id {str(value)!r} is committed {int(count)} times")

    def _check_shard(self, f: Field, key: str, size: int, positions: list[int]) -> None:
        location, shard_size = self.store.location, self.layout.shard_size
        try:
            index = fetch_shard_index(location, key, size, shard_size,
                                      self._uncompressed_bytes(f, 1))
        except ArrayStoreError as exc:
            self.problem(f, positions[0], key, str(exc))
            return
        for position in positions:
            offset, nbytes = (int(v) for v in index[position % shard_size])
            if offset == int(EMPTY):
                self.problem(f, position, key, "committed, but its inner chunk is missing "
                                               "from the shard")
                continue
            self.report.chunks_checked += 1
            data = location.read_range(key, offset, offset + nbytes)
            self._check_bytes(f, key, position, memoryview(data), self._uncompressed_bytes(f, 1))

    def _decode(self, f: Field) -> None:
        array = self.store.array(f.name)
        for start, stop in _runs(self.positions, self.layout.samples_per_chunk(f)):
            try:
                array[start:stop]
            except Exception as exc:  # any codec failure is this chunk's problem
                self.problem(f, start, f.name, f"does not decode: {type(exc).__name__}: "
                                               f"{exc}")


def _runs(positions: np.ndarray, per_chunk: int) -> Iterator[tuple[int, int]]:
    """(start, stop) per chunk holding committed positions, clipped to them."""
    for members in group_by_chunk(positions, per_chunk).values():
        yield members[0], members[-1] + 1


def verify(path: StoreTarget, *, deep: bool = False,
           storage_options: Mapping[str, Any] | None = None) -> VerifyReport:
    """Check the store at ``path`` (a local path or an object-store URL); ``report.ok`` is True
    when no problem was found."""
    report = VerifyReport(store=str(path), deep=deep)
    try:
        # each disagreement is reported below
        store = Store.open(path, check_arrays=False, storage_options=storage_options)
    except ArrayStoreError as exc:
        report.problems.append(Problem("*", "*", str(path), str(exc)))
        return report
    try:
        checker = _Checker(store, report, deep)
    except ArrayStoreError as exc:  # fewer ids than `committed` covers
        report.problems.append(Problem(COMMITTED_FIELD.name, "*", str(path), str(exc)))
        return report
    report.samples, report.committed = len(store), len(checker.positions)
    for f in (*store.schema.fields, SAMPLE_FIELD, COMMITTED_FIELD):
        checker.check(f)
    checker.check_ids()
    checker.check_commit_blocks()
    for link in store.location.links():
        report.problems.append(Problem("*", "*", link, "a symbolic link inside the store: no "
                                       "reader or writer goes through it; replace it with what "
                                       "it points to"))
    return report
