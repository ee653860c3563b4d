"""``arraystore verify``: is the store consistent, and is every committed sample's data there?

Checks, naming the field, sample and file of each problem:
- the metadata of every array agrees with the schema and layout in the group attributes (shape,
  dtype, dimension names, chunk grid, codecs) and every array is long enough;
- every committed sample's chunk (or its inner chunk in a shard) exists inside the store (no
  link, nothing resolving outside it) with the size an uncompressed chunk must have, and its
  crc32c matches where the layout has one;
- with ``deep``, every committed sample of every field decodes through zarr-python (zstd too).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from arraystore.contract import disagreements, escapes
from arraystore.errors import ArrayStoreError
from arraystore.keys import chunk_file, group_by_chunk
from arraystore.readers.direct import CRC_BYTES, EMPTY, crc_matches, read_shard_index
from arraystore.schema import Field
from arraystore.store import COMMITTED_FIELD, SAMPLE_FIELD, Store


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
        self.extent = int(self.positions[-1]) + 1 if len(self.positions) else 0

    def problem(self, f: Field, position: int | None, path: Path | str, message: str) -> None:
        sample = "*" if position is None else f"{self.ids[position]!s} (#{position})"
        self.report.problems.append(Problem(f.name, sample, str(path), message))

    def check(self, f: Field) -> None:
        array_dir = self.store.path / f.name
        if not self._metadata_ok(f, array_dir):
            return
        per_file = self.layout.samples_per_file(f)
        for index, positions in group_by_chunk(self.positions, per_file).items():
            path = chunk_file(array_dir, index, 1 + len(f.shape))
            outside = escapes(self.store.path, path) if path.exists() else None
            if outside:
                self.problem(f, positions[0], path, f"refused: {outside}")
            elif not path.is_file():
                self.problem(f, positions[0], path, f"chunk file missing ({len(positions)} "
                                                    f"committed samples in it)")
            elif f.chunking == "sample" and self.layout.sharded:
                self._check_shard(f, path, positions)
            else:
                self._check_chunk(f, path, positions[0], self.layout.samples_per_chunk(f))
        if self.deep:
            self._decode(f, array_dir)

    def _metadata_ok(self, f: Field, array_dir: Path) -> bool:
        try:
            meta = json.loads((array_dir / "zarr.json").read_text())
        except (OSError, ValueError) as exc:
            self.problem(f, None, array_dir / "zarr.json", f"array metadata unreadable: {exc}")
            return False
        problems = disagreements(f, self.layout, meta)
        for message in problems:
            self.problem(f, None, array_dir / "zarr.json", message)
        if meta["shape"][0] < self.extent:
            self.problem(f, None, array_dir / "zarr.json",
                         f"holds {meta['shape'][0]} samples; committed samples reach "
                         f"{self.extent}")
            return False
        return not problems

    def _uncompressed_bytes(self, f: Field, samples: int) -> int | None:
        if f.is_string or self.layout.compression != "none":
            return None
        return samples * f.nbytes + (CRC_BYTES if self.layout.checksum else 0)

    def _check_chunk(self, f: Field, path: Path, position: int, samples: int) -> None:
        data = path.read_bytes()
        self.report.chunks_checked += 1
        self._check_bytes(f, path, position, memoryview(data), self._uncompressed_bytes(f,
                                                                                        samples))

    def _check_bytes(self, f: Field, path: Path, position: int, data: memoryview,
                     expected: int | None) -> None:
        if expected is not None and len(data) != expected:
            self.problem(f, position, path, f"chunk of {len(data)} bytes, expected {expected}")
        elif self.layout.checksum and not crc_matches(data[:-CRC_BYTES],
                                                       bytes(data[-CRC_BYTES:])):
            self.problem(f, position, path, "crc32c mismatch: the chunk is corrupt")

    def _check_shard(self, f: Field, path: Path, positions: list[int]) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                index = read_shard_index(fd, self.layout.shard_size, True, str(path))
            except ArrayStoreError as exc:
                self.problem(f, positions[0], path, str(exc))
                return
            for position in positions:
                offset, nbytes = (int(v) for v in index[position % self.layout.shard_size])
                if offset == int(EMPTY):
                    self.problem(f, position, path, "committed, but its inner chunk is missing "
                                                    "from the shard")
                    continue
                self.report.chunks_checked += 1
                self._check_bytes(f, path, position, memoryview(os.pread(fd, nbytes, offset)),
                                  self._uncompressed_bytes(f, 1))
        finally:
            os.close(fd)

    def _decode(self, f: Field, array_dir: Path) -> None:
        array = zarr.open_array(str(array_dir), mode="r")
        for start, stop in _runs(self.positions, self.layout.samples_per_chunk(f)):
            try:
                array[start:stop]
            except Exception as exc:  # any codec failure is this chunk's problem
                self.problem(f, start, array_dir, f"does not decode: {type(exc).__name__}: "
                                                  f"{exc}")


def _runs(positions: np.ndarray, per_chunk: int) -> Iterator[tuple[int, int]]:
    """(start, stop) per chunk holding committed positions, clipped to them."""
    for members in group_by_chunk(positions, per_chunk).values():
        yield members[0], members[-1] + 1


def verify(path: str | os.PathLike[str], *, deep: bool = False) -> VerifyReport:
    """Check the store at ``path``; ``report.ok`` is True when no problem was found."""
    report = VerifyReport(store=str(path), deep=deep)
    try:
        store = Store.open(path, check_arrays=False)  # each disagreement is reported below
    except ArrayStoreError as exc:
        report.problems.append(Problem("*", "*", str(path), str(exc)))
        return report
    checker = _Checker(store, report, deep)
    report.samples, report.committed = len(store), len(checker.positions)
    for f in (*store.schema.fields, SAMPLE_FIELD, COMMITTED_FIELD):
        checker.check(f)
    return report
