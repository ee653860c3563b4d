"""Typed errors of arraystore.

Each error also subclasses the built-in exception it resembles, so callers' existing ``except
FileNotFoundError`` / ``except ValueError`` clauses keep working. Messages name the file, field or
sample concerned and, where one exists, the option that fixes the problem.
"""

from __future__ import annotations

from collections.abc import Sequence


class ArrayStoreError(Exception):
    """Base class of every error raised by arraystore."""


class StoreNotFoundError(ArrayStoreError, FileNotFoundError):
    """The path holds no store."""


class StoreExistsError(ArrayStoreError, FileExistsError):
    """A store (or some other file) already exists where a new store was to be created."""


class NotAStoreError(ArrayStoreError, ValueError):
    """The path exists but is not an arraystore store (no Zarr group with arraystore attributes)."""


class StoreFormatError(ArrayStoreError, ValueError):
    """The store's metadata is inconsistent, or of a format version this code cannot read."""


class MissingChunkError(StoreFormatError):
    """A committed sample's chunk, shard or inner chunk is absent: the store is damaged (a
    chunk never written reads as the fill value in Zarr, which would hide the loss)."""


class IncompatibleStoreError(ArrayStoreError, ValueError):
    """Appending to a store whose kind, schema or layout differs from what was asked for."""


class SchemaError(ArrayStoreError, ValueError):
    """A schema declaration is invalid (bad name, shape, dtype or dimension names)."""


class SampleValidationError(ArrayStoreError, ValueError):
    """A sample handed to the writer does not match the store's schema."""


class DuplicateSampleError(ArrayStoreError, ValueError):
    """A sample id that the store already holds (or that appeared earlier in the input)."""


class SourceError(ArrayStoreError, ValueError):
    """An input (a TAR shard, a ``.bin`` directory, an NPZ directory) that cannot be read at all."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class SampleError(ArrayStoreError, ValueError):
    """One sample of an input is broken; ingest fails on it, or skips and reports it.

    ``where`` names the file and member (``shard.tar:sa_1.json``); ``sample_id`` the sample.
    """

    def __init__(self, where: str, sample_id: str, reason: str) -> None:
        super().__init__(f"{where} (sample {sample_id!r}): {reason}")
        self.where = where
        self.sample_id = sample_id
        self.reason = reason


class OptionError(ArrayStoreError, ValueError):
    """An option of a source or loader has a value it cannot work with (checked before anything
    is written or read)."""


class UnknownFieldError(ArrayStoreError, KeyError):
    """A field name the store's schema does not have; the message lists the ones it has."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnknownPluginError(ArrayStoreError, ValueError):
    """No source, exporter or reader backend is registered under the requested name."""


class DuplicatePluginError(ArrayStoreError, ValueError):
    """Two installed distributions register one plug-in name in one group."""


class StoreLockedError(ArrayStoreError, BlockingIOError):
    """Another live process is writing the store (or this one lost its lock)."""


class StoreAccessError(ArrayStoreError, OSError):
    """An object store could not be reached or refused the request (no credentials, no
    server, no permission); the message names the URL and what to check."""


class ObjectChangedError(ArrayStoreError, OSError):
    """Objects of a store in an object store were replaced while a reader was reading them
    (their ETag is no longer the one the reader's earlier requests saw). Readers catch it,
    forget what they knew of those objects and read them again; it reaches the caller only
    when they change again at once. ``keys``: the objects' keys in the store."""

    def __init__(self, message: str, keys: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.keys = tuple(keys)


class ChecksumMismatchError(ArrayStoreError, OSError):
    """A chunk's stored crc32c does not match its bytes: the file is corrupt."""


class StoreWriteError(ArrayStoreError, OSError):
    """Writing to the store failed (disk full, permissions); what was committed stays valid."""


class WorkerDiedError(ArrayStoreError, RuntimeError):
    """A worker process of an ingest died; committed samples are kept and a re-run resumes."""


class UnknownSampleError(ArrayStoreError, ValueError):
    """Values given for sample ids the store does not hold (nothing was written)."""


class SampleNotCommittedError(ArrayStoreError, IndexError):
    """A read asked for a sample whose data is not (yet) complete."""


class MissingExtraError(ArrayStoreError, ImportError):
    """An optional dependency of a command is not installed (the message names the extra)."""
