"""Declarative dataset schemas: which fields a store holds and how each is stored.

A :class:`Field` states one per-sample quantity: its shape and dtype *per sample*, the names of
its dimensions (the leading ``sample`` dimension is implicit) and whether it is chunked one sample
per chunk (images, features, maps, masks) or in blocks of many samples (ids, flags, boxes). A
:class:`Schema` is a dataset kind plus its fields. Both round-trip through JSON, so the store
records the exact declaration it was written with and describes itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np

from arraystore.errors import SchemaError, UnknownFieldError

Chunking = Literal["sample", "block"]
STRING_DTYPE = "str"
SAMPLE_DIM = "sample"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_NAMES = frozenset({"sample", "committed"})


@dataclass(frozen=True)
class Field:
    """One per-sample quantity of a dataset.

    ``dtype`` is a NumPy dtype name (``"uint8"``, ``"float32"``, ...) or ``"str"`` for a UTF-8
    string; ``dims`` names the per-sample dimensions (one per entry of ``shape``). Names encode the
    size where sizes are shared between fields (``y64``, ``x64``) so arrays on the same grid align
    in xarray.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    dims: tuple[str, ...]
    chunking: Chunking = "sample"
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "dims", tuple(self.dims))
        if not _NAME.match(self.name):
            raise SchemaError(f"field name {self.name!r} is not a valid identifier")
        if len(self.dims) != len(self.shape):
            raise SchemaError(
                f"field {self.name!r}: {len(self.dims)} dimension names {self.dims} "
                f"for a per-sample shape of rank {len(self.shape)} {self.shape}"
            )
        if len(set(self.dims)) != len(self.dims) or SAMPLE_DIM in self.dims:
            raise SchemaError(
                f"field {self.name!r}: dimension names {self.dims} must be unique and must not "
                f"include {SAMPLE_DIM!r} (the leading sample dimension is implicit)"
            )
        if any(s < 0 for s in self.shape):
            raise SchemaError(f"field {self.name!r}: negative size in shape {self.shape}")
        if self.chunking not in ("sample", "block"):
            raise SchemaError(
                f"field {self.name!r}: chunking must be 'sample' or 'block', got {self.chunking!r}"
            )
        if self.dtype != STRING_DTYPE:
            try:
                resolved = np.dtype(self.dtype)
            except TypeError as exc:
                raise SchemaError(f"field {self.name!r}: unknown dtype {self.dtype!r}") from exc
            if resolved.kind not in "biuf":
                raise SchemaError(
                    f"field {self.name!r}: dtype {self.dtype!r} is not supported; use a boolean, "
                    f"integer or floating type, or 'str'"
                )
            object.__setattr__(self, "dtype", resolved.name)
        elif self.shape != ():
            raise SchemaError(f"field {self.name!r}: string fields must be scalars per sample")

    @property
    def is_string(self) -> bool:
        return self.dtype == STRING_DTYPE

    @cached_property  # asked per field of every batch: built once
    def numpy_dtype(self) -> np.dtype:
        """The dtype of the values a reader returns (``StringDType`` for strings)."""
        return np.dtypes.StringDType() if self.is_string else np.dtype(self.dtype)

    @cached_property
    def nbytes(self) -> int:
        """Bytes of one sample of this field (0 for strings, whose size varies)."""
        return 0 if self.is_string else int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "dims": list(self.dims),
            "chunking": self.chunking,
            "description": self.description,
        }

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> Field:
        try:
            return cls(
                name=name,
                shape=tuple(data["shape"]),
                dtype=data["dtype"],
                dims=tuple(data["dims"]),
                chunking=data.get("chunking", "sample"),
                description=data.get("description", ""),
            )
        except KeyError as exc:
            raise SchemaError(f"field {name!r}: schema entry lacks {exc.args[0]!r}") from exc


@dataclass(frozen=True)
class Schema:
    """A dataset kind and its ordered fields."""

    kind: str
    fields: tuple[Field, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))
        names = [f.name for f in self.fields]
        reserved = sorted(RESERVED_NAMES.intersection(names))
        if reserved:
            raise SchemaError(f"schema {self.kind!r}: field names {reserved} are reserved")
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise SchemaError(f"schema {self.kind!r}: duplicated field names {duplicated}")
        sizes: dict[str, tuple[int, str]] = {}
        for f in self.fields:
            for dim, size in zip(f.dims, f.shape, strict=True):
                if dim in sizes and sizes[dim][0] != size:
                    raise SchemaError(
                        f"schema {self.kind!r}: dimension {dim!r} has size {size} in field "
                        f"{f.name!r} but {sizes[dim][0]} in field {sizes[dim][1]!r}; shared "
                        f"dimension names must have one size (xarray aligns on them)"
                    )
                sizes[dim] = (size, f.name)

    def __getitem__(self, name: str) -> Field:
        found = self._by_name.get(name)
        if found is not None:
            return found
        raise UnknownFieldError(f"schema {self.kind!r} has no field {name!r}; fields: "
                                f"{self.names}")

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @cached_property
    def _by_name(self) -> dict[str, Field]:
        return {f.name: f for f in self.fields}

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "fields": {f.name: f.to_json() for f in self.fields}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Schema:
        try:
            return cls(
                kind=data["kind"],
                fields=tuple(Field.from_json(n, d) for n, d in data["fields"].items()),
            )
        except KeyError as exc:
            raise SchemaError(f"schema lacks {exc.args[0]!r}") from exc
