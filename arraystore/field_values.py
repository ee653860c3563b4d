"""Where the values of a field added in place come from (``arraystore fields add --from``).

Each source is keyed by sample id: a folder of ``<sample id>.npz`` files, another store holding
the field, or a model run on a field the store already has (a new teacher's features from the
stored images: what ``fix features`` does for SA-1B, for any field and any model).
"""

from __future__ import annotations

import os
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from arraystore.errors import OptionError, SampleError, SourceError
from arraystore.reader import SampleReader
from arraystore.schema import Field
from arraystore.stages import Model


class FieldValues(ABC):
    """Values of one field for samples named by id."""

    def open(self, store_path: str | os.PathLike[str]) -> None:  # noqa: B027 (most need none)
        """Called once with the store that gets the field, before anything else."""

    @abstractmethod
    def declare(self, name: str) -> Field:
        """The field as it will be stored under ``name`` (shape, dtype, dimension names)."""

    @abstractmethod
    def ids(self) -> Sequence[str] | None:
        """The sample ids this source has values for; ``None``: every sample of the store."""

    @abstractmethod
    def read(self, sample_ids: Sequence[str], positions: Sequence[int]) -> list[Any]:
        """The values of ``sample_ids`` (at ``positions`` of the store), ``None`` where this
        source has none."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What the store's provenance records of this source."""


def default_dims(name: str, shape: tuple[int, ...]) -> tuple[str, ...]:
    """Dimension names of an added field: its own (``<name>_0``, ...), so they never clash
    with another field's sizes; give ``dims`` to share a grid with stored fields."""
    return tuple(f"{name}_{axis}" for axis in range(len(shape)))


def _declared(name: str, value: np.ndarray, dims: Sequence[str] | None,
              where: str) -> Field:
    dims = tuple(dims) if dims else default_dims(name, value.shape)
    if len(dims) != value.ndim:
        raise OptionError(f"--dims {','.join(dims)}: {len(dims)} names for the {value.ndim} "
                          f"dimensions of {where}'s values {value.shape}")
    return Field(name, value.shape, value.dtype.name, dims,
                 "block" if value.ndim == 0 else "sample", f"added from {where}")


class NpzFolderValues(FieldValues):
    """``<sample id>.npz`` files in ``folder``; the array ``key`` of each (default: the one
    named as the field, else the file's only array). Loaded without pickle."""

    def __init__(self, folder: str | os.PathLike[str], key: str | None = None,
                 dims: Sequence[str] | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SourceError(str(folder), "not a folder (expected <sample id>.npz files)")
        self.files = {p.stem: p for p in sorted(self.folder.glob("*.npz"))}
        if not self.files:
            raise SourceError(str(folder), "holds no .npz files")
        self.key, self.dims, self.name = key, dims, ""

    def _load(self, sample_id: str) -> np.ndarray:
        path = self.files[sample_id]
        try:
            with np.load(path, allow_pickle=False) as npz:
                keys = list(npz.files)
                key = self.key or (self.name if self.name in keys else None) or \
                    (keys[0] if len(keys) == 1 else None)
                if key is None or key not in keys:
                    raise SampleError(str(path), sample_id,
                                      f"no array {self.key or self.name!r} (it holds {keys}; "
                                      f"choose one with --key)")
                return np.asarray(npz[key])
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise SampleError(str(path), sample_id, f"unreadable NPZ: {exc}") from exc

    def declare(self, name: str) -> Field:
        self.name = name
        first = next(iter(self.files))
        return _declared(name, self._load(first), self.dims, str(self.folder))

    def ids(self) -> Sequence[str]:
        return list(self.files)

    def read(self, sample_ids: Sequence[str], positions: Sequence[int]) -> list[Any]:
        return [self._load(i) if i in self.files else None for i in sample_ids]

    def describe(self) -> dict[str, Any]:
        return {"from": "npz", "path": str(self.folder), "files": len(self.files)}


class StoreValues(FieldValues):
    """Field ``field`` (default: the added field's name) of another store, by sample id."""

    def __init__(self, path: str | os.PathLike[str], field: str | None = None,
                 dims: Sequence[str] | None = None) -> None:
        self.path, self.field, self.dims = path, field, dims
        self.reader: SampleReader | None = None
        self._index: dict[str, int] = {}

    def declare(self, name: str) -> Field:
        self.field = self.field or name
        self.reader = SampleReader(self.path, fields=(self.field,))
        stored = self.reader.schema[self.field]
        self._index = {sample_id: n for n, sample_id in enumerate(self.reader.sample_ids)}
        dims = tuple(self.dims) if self.dims else stored.dims
        return Field(name, stored.shape, stored.dtype, dims, stored.chunking,
                     stored.description or f"added from {self.path}:{self.field}")

    def ids(self) -> Sequence[str]:
        return list(self._index)

    def read(self, sample_ids: Sequence[str], positions: Sequence[int]) -> list[Any]:
        return [self.reader.read_field(self.field, self.reader.position(self._index[i]))
                if i in self._index else None for i in sample_ids]

    def describe(self) -> dict[str, Any]:
        return {"from": "store", "path": str(self.path), "field": self.field}


class ModelValues(FieldValues):
    """``model`` (:class:`arraystore.stages.Model`) on the store's own ``input_field``, in
    batches of ``model.batch_size``; ``output``: which of its outputs, if it returns several."""

    def __init__(self, model: Model, input_field: str, output: int = 0,
                 dims: Sequence[str] | None = None) -> None:
        self.model, self.input_field, self.output, self.dims = model, input_field, output, dims
        self.reader: SampleReader | None = None

    def open(self, store_path: str | os.PathLike[str]) -> None:
        self.reader = SampleReader(store_path, fields=(self.input_field,))

    def _run(self, inputs: np.ndarray) -> np.ndarray:
        results = self.model(inputs)
        return np.asarray(results[self.output] if isinstance(results, tuple) else results)

    def declare(self, name: str) -> Field:
        if not len(self.reader):
            raise OptionError(f"{self.reader.path} has no committed sample to run the model on")
        first = self._run(self.reader.read_field(self.input_field, self.reader.position(0))[None])
        return _declared(name, first[0], self.dims, f"a model on {self.input_field!r}")

    def ids(self) -> None:
        return None

    def read(self, sample_ids: Sequence[str], positions: Sequence[int]) -> list[Any]:
        values: list[Any] = []
        step = max(1, int(self.model.batch_size))
        for start in range(0, len(positions), step):
            inputs = np.stack([self.reader.read_field(self.input_field, int(p))
                               for p in positions[start:start + step]])
            values += list(self._run(inputs))
        return values

    def describe(self) -> dict[str, Any]:
        return {"from": "model", "input": self.input_field, **self.model.describe()}


MODEL_PREFIX = "model:"


def load_model(spec: str) -> Model:
    """The model ``model:FILE.py:FACTORY`` names: ``FACTORY()`` of the user's own Python file
    (it builds the model from local weights), called once."""
    import importlib.util

    file, _, factory = spec[len(MODEL_PREFIX):].rpartition(":")
    if not file or not factory:
        raise OptionError(f"--from {spec}: write model:FILE.py:FACTORY (a function of that "
                          f"file that returns the model)")
    if not Path(file).is_file():
        raise SourceError(file, "no such Python file (--from model:FILE.py:FACTORY)")
    loaded = importlib.util.spec_from_file_location(Path(file).stem, file)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    if not callable(getattr(module, factory, None)):
        raise OptionError(f"{file} has no function {factory!r} (--from model:FILE.py:FACTORY)")
    model = getattr(module, factory)()
    missing = [a for a in ("batch_size", "describe") if not hasattr(model, a)] + \
        ([] if callable(model) else ["__call__"])
    if missing:
        raise OptionError(f"{file}:{factory}() returned a {type(model).__name__} without "
                          f"{missing}: a model takes a batch of inputs (B, ...) and returns "
                          f"(B, ...), and has batch_size and describe()")
    return model


def values_from(path: str | os.PathLike[str], *, key: str | None = None,
                field: str | None = None, dims: Sequence[str] | None = None,
                input_field: str | None = None, output: int = 0) -> FieldValues:
    """The source ``--from path`` names: another store, a folder of NPZ files, or
    ``model:FILE.py:FACTORY`` run on the store's ``input_field``."""
    from arraystore.store import is_store

    if str(path).startswith(MODEL_PREFIX):
        if input_field is None:
            raise OptionError("--from model:... needs --input FIELD (the stored field the model "
                              "reads)")
        return ModelValues(load_model(str(path)), input_field, output, dims)
    if input_field is not None:
        raise OptionError("--input names the field a model reads: give --from model:FILE.py:"
                          "FACTORY")
    if is_store(path):
        if key is not None:
            raise OptionError("--key picks an array of NPZ files; a store's field is --field")
        return StoreValues(path, field, dims)
    if field is not None:
        raise OptionError(f"--field picks a field of a store; {path} is not one (NPZ files: "
                          f"--key)")
    return NpzFolderValues(path, key, dims)
