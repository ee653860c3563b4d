"""``arraystore ingest npz DIR``: one sample per ``.npz`` file, fields inferred and checked.

The first file (in sorted order) defines the schema: one field per key, with its shape and dtype;
every other file must hold exactly those keys with those shapes and dtypes, or it is a broken
sample (failed or skipped per ``--on-error``). Files are loaded with ``allow_pickle=False``:
object arrays are refused, never unpickled. The sample id is the file's path relative to the
folder, without ``.npz``.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from arraystore.errors import SampleError, SchemaError, SourceError
from arraystore.schema import Field, Schema
from arraystore.sources import Record, Source, SourceUnit

KIND = "npz"
BLOCK_BELOW_BYTES = 4096  # smaller per-sample arrays are chunked in blocks of samples


def load_npz(data: bytes, where: str, sample_id: str) -> dict[str, np.ndarray]:
    """All arrays of an NPZ held in memory, refusing anything that would need pickle."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except ValueError as exc:
        raise SampleError(where, sample_id, f"refused: {exc} (object arrays are never "
                                            f"unpickled)") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise SampleError(where, sample_id, f"not a readable NPZ: {exc}") from exc


def dimension_names(shape: tuple[int, ...]) -> tuple[str, ...]:
    """Size-encoding names (``n64``, then ``n64_1`` for a 2nd axis of 64) that align in xarray."""
    names: list[str] = []
    for size in shape:
        base, suffix = f"n{size}", 0
        while (f"{base}_{suffix}" if suffix else base) in names:
            suffix += 1
        names.append(f"{base}_{suffix}" if suffix else base)
    return tuple(names)


def infer_field(key: str, value: np.ndarray, where: str) -> Field:
    """The field declaration a first-file array implies."""
    if value.dtype.kind == "U" and value.shape == ():
        return Field(key, (), "str", ())
    if value.dtype.kind not in "biuf":
        raise SourceError(where, f"array {key!r} has dtype {value.dtype}; only numeric, boolean "
                                 f"and scalar string arrays can be stored")
    chunking = "sample" if value.nbytes >= BLOCK_BELOW_BYTES else "block"
    try:
        return Field(key, value.shape, value.dtype.name, dimension_names(value.shape), chunking)
    except SchemaError as exc:
        raise SourceError(where, f"array {key!r}: {exc}") from exc


class NpzDirectorySource(Source):
    """Folders of ``*.npz`` files, searched recursively, one sample per file."""

    name = "npz"
    kind = KIND
    expected_fields: tuple[Field, ...] = ()

    def units(self, inputs: Sequence[str | os.PathLike[str]]) -> list[SourceUnit]:
        units = []
        for item in inputs:
            root = Path(item)
            if not root.is_dir():
                raise SourceError(str(root), "not a folder of .npz files")
            files = self._files(root)
            if not files:
                raise SourceError(str(root), "holds no .npz files")
            units.append(SourceUnit(root, sum(f.stat().st_size for f in files)))
        return units

    @staticmethod
    def _files(root: Path) -> list[Path]:
        return sorted(p for p in root.rglob("*.npz") if p.is_file() and not p.is_symlink())

    def schema(self, units: Sequence[SourceUnit]) -> Schema:
        first = self._files(units[0].path)[0]
        arrays = load_npz(first.read_bytes(), str(first), first.stem)
        if not arrays:
            raise SourceError(str(first), "the first NPZ holds no arrays to infer fields from")
        schema = Schema(KIND, tuple(infer_field(k, v, str(first))
                                    for k, v in sorted(arrays.items())))
        self.expected_fields = schema.fields  # travels to the workers with the source
        return schema

    def records(self, unit: SourceUnit) -> Iterator[Record | SampleError]:
        for path in self._files(unit.path):
            data = path.read_bytes()
            unit.digest.update(data)
            unit.bytes_read += len(data)
            sample_id = path.relative_to(unit.path).with_suffix("").as_posix()
            yield Record(sample_id, str(path), data, unit.bytes_read)

    def derive(self, record: Record) -> dict[str, Any]:
        arrays = load_npz(record.payload, record.where, record.sample_id)
        expected = {f.name: f for f in self.expected_fields}
        if set(arrays) != set(expected):
            raise SampleError(record.where, record.sample_id,
                              f"keys {sorted(arrays)}, expected {sorted(expected)} (the first "
                              f"file's keys)")
        values: dict[str, Any] = {}
        for name, field in expected.items():
            value = arrays[name]
            if field.is_string:
                if value.dtype.kind != "U" or value.shape != ():
                    raise SampleError(record.where, record.sample_id,
                                      f"{name}: expected a scalar string, got {value.dtype} "
                                      f"{value.shape}")
                values[name] = str(value[()])
            elif value.shape != field.shape or value.dtype != np.dtype(field.dtype):
                raise SampleError(record.where, record.sample_id,
                                  f"{name}: shape {value.shape} dtype {value.dtype}, expected "
                                  f"shape {field.shape} dtype {field.dtype}")
            else:
                values[name] = value
        return values
