"""Where a store lives: a local folder, or a prefix of an object store named by a URL.

A local store keeps what a disk gives: an ``flock`` writer lock, ``fsync`` before a commit,
chunk files ``pread`` without following links. A URL (``s3://bucket/sa1b.zarr``, ``gs://``,
``az://``, ``file://``; anything fsspec knows) is reached through fsspec with the caller's
storage options and the service's standard environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...): zarr reads and writes through its ``FsspecStore``, the direct reader
issues ranged GETs, and the writer lock is an object created with a conditional write. Every
other module asks its location instead of assuming a disk.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from arraystore.beneath import open_beneath
from arraystore.contract import links_below
from arraystore.errors import (
    ArrayStoreError,
    MissingExtraError,
    ObjectChangedError,
    OptionError,
    StoreAccessError,
)
from arraystore.keys import fsync_path
from arraystore.node_cache import NodeCache
from arraystore.per_process import PerProcess
from arraystore.s3_gets import (
    EREMOTEIO,
    PreconditionFailedError,
    PresignedGets,
    presigned_gets_apply,
)

T = TypeVar("T")

SIBLING_SEPARATOR = "."  # ``<store>.lock``, ``<store>.reports``: beside the store, never in it


def is_url(target: str | os.PathLike[str]) -> bool:
    """Whether ``target`` names an object store (``scheme://...``) rather than a local path."""
    return isinstance(target, str) and "://" in target


def parse_storage_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (the CLI's ``--storage-option``) as fsspec storage options.

    Values that read as JSON (``true``, ``3``, ``{"a": 1}``) become that value, others stay
    strings; dotted keys nest (``client_kwargs.region_name=x`` -> ``{"client_kwargs":
    {"region_name": "x"}}``)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"storage option {pair!r}: expected KEY=VALUE")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        *parents, leaf = key.split(".")
        target = options
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ValueError(f"storage option {pair!r}: {parent!r} is already a value")
        target[leaf] = value
    return options


class Location(ABC):
    """A store's root; keys are ``/``-separated paths inside it (``image/c/0/0/0/0``).

    Everything that differs between a disk and an object store is answered here. Three users
    choose once, when they open, between strategies that only one of them has, and ask
    :attr:`is_local`: the direct backend (files it maps and ``pread``s, or ranged GETs), the
    writer lock (an ``flock``, or a lock object with a heartbeat) and the sample reader
    (whether its workers take the metadata the open read, or read it again)."""

    is_local: bool
    may_hold_links: bool  # a key may be a symbolic link leading out of the store (a disk's)
    path: Path | str  # what the user named: a Path, or the URL
    cache: NodeCache | None = None  # where ranged reads keep what they fetch (object stores)

    def __str__(self) -> str:
        return str(self.path)

    @staticmethod
    def of(target: str | os.PathLike[str] | Location,
           storage_options: Mapping[str, Any] | None = None) -> Location:
        """The location ``target`` names; ``storage_options`` configure an object store."""
        if isinstance(target, Location):
            return target
        if not os.fspath(target):
            raise OptionError("an empty path names no store; give a folder such as out.zarr "
                              "or a URL such as s3://bucket/out.zarr")
        if is_url(target):
            return ObjectLocation(str(target), storage_options)
        if storage_options:
            raise OptionError(f"{target}: --storage-option is for object-store URLs "
                              f"(s3://...), not local paths; drop it")
        return LocalLocation(Path(target))

    def cached(self, cache: NodeCache | None) -> Location:
        """This location with its ranged reads kept in ``cache``: a local store is read
        directly, so only an object store's location takes one."""
        return self

    @abstractmethod
    def where(self, key: str) -> str:
        """``key`` as a user can find it: a file path, or a URL."""

    @abstractmethod
    def zarr_store(self, read_only: bool) -> Any:
        """What ``zarr.open_group`` / ``zarr.open_array`` take for this root."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The whole object ``key``; FileNotFoundError when there is none."""

    @abstractmethod
    def read_range(self, key: str, start: int, stop: int) -> bytes:
        """Bytes ``start`` to ``stop`` of ``key`` (fewer at its end)."""

    def read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The whole objects ``keys``, None for each that does not exist (an object store
        fetches them all at once)."""
        out: list[bytes | None] = []
        for key in keys:
            try:
                out.append(self.read_bytes(key))
            except FileNotFoundError:
                out.append(None)
        return out

    @abstractmethod
    def update(self, key: str, change: Callable[[bytes], bytes | None]) -> bytes:
        """Rewrite ``key`` as ``change`` makes its current bytes (None: leave it), whole or
        not at all, and only if nobody rewrote it in between; returns the bytes it holds
        then."""

    def update_each(self, keys: Sequence[str],
                    change: Callable[[bytes], bytes | None]) -> list[bytes]:
        """:meth:`update` of each of ``keys`` (an object store makes them all at once)."""
        return [self.update(key, change) for key in keys]

    @abstractmethod
    def names(self, prefix: str) -> list[str]:
        """The names directly below the folder ``prefix`` (none when it does not exist), as
        stored now: a listing, never a cached one."""

    @abstractmethod
    def size(self, key: str) -> int | None:
        """The size of ``key`` in bytes, None when it does not exist."""

    @abstractmethod
    def exists(self) -> bool:
        """Something is there (a folder, or objects under the prefix)."""

    @abstractmethod
    def vacant(self) -> bool:
        """Nothing there yet (or an empty folder a user made for the store)."""

    @abstractmethod
    def remove(self) -> None:
        """Delete the store (the caller has checked that it is one)."""

    @abstractmethod
    def usage(self, prefix: str) -> tuple[int, int]:
        """Bytes and number of files (objects) under ``prefix``."""

    @abstractmethod
    def sibling_path(self, suffix: str, name: str) -> str:
        """Where ``<store><suffix>/<name>``, beside the store, is (reports)."""

    @abstractmethod
    def write_sibling(self, suffix: str, name: str, data: bytes) -> None:
        """Write ``data`` to :meth:`sibling_path`, whole or not at all."""

    @abstractmethod
    def sibling(self, suffix: str) -> str:
        """``<store><suffix>``, beside the store (its lock)."""

    @abstractmethod
    def problem(self, key: str) -> str | None:
        """Why ``key`` must not be read as part of this store, or None."""

    @abstractmethod
    def links(self) -> list[str]:
        """Every symbolic link inside the store (a disk's folders may hold them)."""

    @abstractmethod
    def refuse_links_to(self, folders: Iterable[str]) -> None:
        """Raise :class:`~arraystore.errors.StoreFormatError` when a folder on the way to one
        of ``folders`` is a symbolic link (a disk's); a folder not there yet is fine."""

    @abstractmethod
    def remove_partials(self, folders: Iterable[str]) -> None:
        """Delete the temporary files a killed write left in ``folders`` (a disk's
        ``*.partial``)."""

    @abstractmethod
    def check_can_hold_store(self) -> None:
        """Raise :class:`OptionError` where no store can be written (a disk's root folder)."""

    @abstractmethod
    def make_durable(self, keys: Iterable[str]) -> None:
        """Bring what was written to ``keys`` onto stable storage (before a commit marks it)."""

    @abstractmethod
    def tensorstore_kvstore(self, key: str) -> dict[str, Any] | None:
        """TensorStore's kvstore spec for ``key``; None where TensorStore has no driver for
        this location (the reader then falls back to zarr-python)."""


class LocalLocation(Location):
    is_local = True
    may_hold_links = True

    def __init__(self, path: Path) -> None:
        self.path = path

    def links(self) -> list[str]:
        return links_below(self.path)

    def refuse_links_to(self, folders: Iterable[str]) -> None:
        root = os.fspath(self.path)
        for folder in folders:
            fd = open_beneath(root, folder)
            if fd is not None:
                os.close(fd)

    def remove_partials(self, folders: Iterable[str]) -> None:
        for folder in dict.fromkeys(folders):  # each once
            for partial in self.file(folder).glob("*.partial"):
                partial.unlink(missing_ok=True)

    def check_can_hold_store(self) -> None:
        local_store_path(self.path)

    def file(self, key: str) -> Path:
        return self.path / key

    def make_durable(self, keys: Iterable[str]) -> None:
        """``fsync`` each key's file, then each folder holding one, then the root."""
        folders = set()
        for key in keys:
            path = self.file(key)
            fsync_path(path)
            folders.add(path.parent)
        for folder in sorted(folders, key=lambda p: -len(p.parts)):
            fsync_path(folder)
        fsync_path(self.path)

    def tensorstore_kvstore(self, key: str) -> dict[str, Any] | None:
        return {"driver": "file", "path": str(self.file(key))}

    def where(self, key: str) -> str:
        return str(self.file(key))

    def zarr_store(self, read_only: bool) -> Any:
        """A zarr-python store that reads and writes nothing through a link below the root."""
        from arraystore.zarr_local import ContainedLocalStore

        return ContainedLocalStore(self.path, read_only=read_only)

    def open_key(self, key: str) -> int:
        """A read-only descriptor of ``key``, no link followed on the way
        (:func:`~arraystore.beneath.open_beneath`); FileNotFoundError when there is none."""
        fd = open_beneath(os.fspath(self.path), key)
        if fd is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", str(self.file(key)))
        return fd

    def read_bytes(self, key: str) -> bytes:
        return self.read_range(key, 0, None)

    def read_range(self, key: str, start: int, stop: int | None) -> bytes:
        """Bytes ``start`` to ``stop`` of ``key`` (None: to its end)."""
        fd = self.open_key(key)
        try:
            length = (os.fstat(fd).st_size if stop is None else stop) - start
            return os.pread(fd, max(0, length), start)
        except OSError as exc:  # a folder where a file should be: say which
            raise OSError(exc.errno, exc.strerror, str(self.file(key))) from exc
        finally:
            os.close(fd)

    def update(self, key: str, change: Callable[[bytes], bytes | None]) -> bytes:
        """A read, then a new file renamed over ``key`` once durable (the store's writer lock
        keeps every other writer out)."""
        current = self.read_bytes(key)
        new = change(current)
        if new is None:
            return current
        path = self.file(key)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_bytes(new)
        fsync_path(tmp)
        tmp.replace(path)
        fsync_path(path.parent)
        return new

    def names(self, prefix: str) -> list[str]:
        try:
            return os.listdir(self.file(prefix))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def size(self, key: str) -> int | None:
        try:
            fd = self.open_key(key)
        except FileNotFoundError:
            return None
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def exists(self) -> bool:
        return self.path.exists()

    def vacant(self) -> bool:
        return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))

    def remove(self) -> None:
        if self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()
        else:
            shutil.rmtree(self.path)

    def usage(self, prefix: str) -> tuple[int, int]:
        total = count = 0
        for root, _, files in os.walk(self.file(prefix)):
            for name in files:
                total += os.stat(os.path.join(root, name)).st_size
                count += 1
        return total, count

    def sibling_path(self, suffix: str, name: str) -> str:
        return str(self.path.with_name(self.path.name + suffix) / name)

    def sibling(self, suffix: str) -> str:
        """Beside the store's real folder, every link on the way resolved: two spellings of
        one store (a link to it, a link to a folder above it, ``..``) name one sibling."""
        path = local_store_path(self.path)
        return str(path.with_name(path.name + suffix))

    def write_sibling(self, suffix: str, name: str, data: bytes) -> None:
        path = Path(self.sibling_path(suffix, name))
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_bytes(data)
        tmp.replace(path)

    def problem(self, key: str) -> str | None:
        from arraystore.contract import escapes

        path = self.file(key)
        return escapes(self.path, path) if path.exists() or path.is_symlink() else None


REMOTE_LIBRARIES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "aiohttp", "google",
                    "azure")


SERVICE_ERRNOS = (errno.EBUSY, EREMOTEIO)  # s3fs (and s3_gets): 503 and 500
CUT_ANSWERS = ("ClientPayloadError", "ServerDisconnectedError", "ContentLengthError",
               "CutAnswerError", "RemoteDisconnected", "ConnectionResetError")


def service_failed(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is the service failing to answer (throttled, a
    server error, a connection cut mid-answer) rather than the store being out of reach."""
    seen: set[int] = set()  # a chain can loop back on itself
    while exc is not None and id(exc) not in seen:
        if (isinstance(exc, OSError) and exc.errno in SERVICE_ERRNOS) \
                or type(exc).__name__ in CUT_ANSWERS:
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def remote_failures(url: str) -> Iterator[None]:
    """Turn the failures of the storage libraries into a :class:`StoreAccessError` naming
    ``url`` and what to check: the service failing after the client's retries (throttled,
    server errors, cut answers), or the store out of reach (no credentials, no server, no
    permission). A missing key stays ``FileNotFoundError`` and the project's own errors pass
    through."""
    try:
        yield
    except (FileNotFoundError, FileExistsError, ArrayStoreError):
        raise
    except Exception as exc:
        library = type(exc).__module__.split(".")[0]
        if not isinstance(exc, OSError) and library not in REMOTE_LIBRARIES:
            raise
        if service_failed(exc):
            raise StoreAccessError(
                f"{url}: the object store kept failing after the client's retries with "
                f"backoff ({type(exc).__name__}: {exc}); the service may be overloaded or "
                f"down: try again later, or allow more retries (storage options retries=N "
                f"for cut answers, config_kwargs.retries.max_attempts=N for throttling and "
                f"server errors)"
            ) from exc
        raise StoreAccessError(
            f"{url}: the object store could not be reached ({type(exc).__name__}: {exc}); "
            f"check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
            f"--storage-option key=... secret=...), the endpoint (AWS_ENDPOINT_URL or "
            f"--storage-option endpoint_url=...) and the network") from exc


def _remote(method: Callable[..., T]) -> Callable[..., T]:
    """``method`` of an :class:`ObjectLocation` under :func:`remote_failures`."""
    @functools.wraps(method)
    def wrapper(self: ObjectLocation, *args: Any, **kwargs: Any) -> T:
        with remote_failures(self.url):
            return method(self, *args, **kwargs)
    return wrapper


def local_store_path(path: str | os.PathLike[str]) -> Path:
    """The real path of a local store to be written (every link resolved); the root folder
    is refused: a store is a folder with a name, beside which its lock lives."""
    real = Path(os.path.realpath(path))
    if not real.name:
        raise OptionError(f"{path}: the root folder cannot hold a store; name a folder such "
                          f"as out.zarr")
    return real


async def _update_s3_object(fs: Any, bucket: str, name: str,
                            change: Callable[[bytes], bytes | None]) -> bytes | None:
    """:meth:`ObjectLocation.update` on S3 (s3fs's client): the bytes stored then; None after
    100 lost races."""
    for _ in range(100):
        body, tag = await _s3_get(fs, bucket, name)
        new = change(body)
        if new is None:
            return body
        try:
            await fs._call_s3("put_object", Bucket=bucket, Key=name, Body=new, IfMatch=tag)
            return new
        except OSError as exc:
            if not _precondition_failed(exc):
                raise
    return None


REMEMBERED_TAGS = 1 << 16  # objects whose version a process remembers (the least recent go)


def _remember(tags: OrderedDict[str, str], key: str, tag: str) -> None:
    """Record ``tag`` as the version of ``key`` this process reads, unless it knows one: the
    version it read first stays, so that a later GET of another version fails its
    ``If-Match``. Bounded, least recently recorded first out: more than the shard indexes
    every reader of a process caches, far fewer than a raw layout's objects."""
    if key not in tags:
        tags[key] = tag
        if len(tags) > REMEMBERED_TAGS:
            tags.popitem(last=False)


async def _get_s3_range(fs: Any, path: str, start: int, stop: int | None,
                        tag: str | None) -> tuple[bytes, str]:
    """Bytes ``[start, stop)`` of the object at ``path`` (a negative start: its last
    ``-start`` bytes) and the ETag of the version they came from, with s3fs's client and its
    retries; only from version ``tag`` where given (``If-Match``)."""
    from s3fs.core import _error_wrapper

    bucket, name = path.split("/", 1)
    if start < 0:
        asked = {"Range": f"bytes={start}"}
    elif start or stop is not None:
        asked = {"Range": f"bytes={start}-{'' if stop is None else stop - 1}"}
    else:
        asked = {}  # the whole object (a Range would be refused for an empty one)
    if tag:
        asked["IfMatch"] = tag
    # as s3fs's own ranged reads: a body cut off mid-read is tried again
    return await _error_wrapper(_s3_get, args=(fs, bucket, name), kwargs=asked,
                                retries=fs.retries)


def _gather_s3_ranges(fs: Any, asked: Sequence[tuple[str, int, int | None, str | None]]
                      ) -> list[Any]:
    """:func:`_get_s3_range` of each (path, start, stop, tag), concurrently on s3fs's loop:
    each answer, or the exception it ended with."""
    import asyncio

    from fsspec.asyn import sync

    async def each() -> list[Any]:
        return await asyncio.gather(*(_get_s3_range(fs, *one) for one in asked),
                                    return_exceptions=True)

    return sync(fs.loop, each)


async def _s3_get(fs: Any, bucket: str, name: str, **asked: str) -> tuple[bytes, str]:
    """One GET of object ``name`` (``asked``: its Range, IfMatch) with s3fs's client: the
    body and the ETag of the version it came from."""
    got = await fs._call_s3("get_object", Bucket=bucket, Key=name, **asked)
    try:
        return await got["Body"].read(), str(got.get("ETag") or "")
    finally:
        got["Body"].close()


def _precondition_failed(exc: OSError) -> bool:
    """Whether s3fs's ``exc`` is S3's 412 Precondition Failed (another write came first): the
    service's own error code, on the botocore error s3fs keeps as the cause."""
    if isinstance(exc, PreconditionFailedError):  # arraystore.s3_gets
        return True
    response = getattr(exc.__cause__, "response", None) or {}
    return (response.get("Error", {}).get("Code") in ("PreconditionFailed", "412")
            or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412)


def _version(info: Mapping[str, Any]) -> tuple[int, str]:
    """An object's size and version tag from fsspec's ``info``: its ETag where the service
    gives one, else its modification time."""
    tag = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified", "updated")
                if info.get(k)), "")
    return int(info.get("size") or 0), str(tag)


S3_CONNECTIONS = 64  # an S3 client's connection pool (see _connect)


def _connect(url: str, storage_options: Mapping[str, Any]) -> tuple[Any, str]:
    """An fsspec file system for ``url`` and the store's root in it. An S3 client keeps up to
    :data:`S3_CONNECTIONS` connections open unless the options say otherwise
    (``config_kwargs.max_pool_connections``): botocore's default of 10 caps a batch's
    concurrent GETs, and through a link that caps each connection's bandwidth, its
    throughput (measured in the loopback region: a DataLoader's cold reads 18% faster
    with 64)."""
    import fsspec

    if url.startswith("s3://"):
        config = dict(storage_options.get("config_kwargs") or {})
        config.setdefault("max_pool_connections", S3_CONNECTIONS)
        storage_options = {**storage_options, "config_kwargs": config}
    try:
        fs, root = fsspec.url_to_fs(url, **storage_options)
    except ImportError as exc:
        raise MissingExtraError(
            f"{url}: {exc}. Object stores need the 'scale' extra: pip install "
            f"'arraystore[scale]' (s3fs; gcsfs or adlfs for gs:// and az://)") from exc
    return fs, root.rstrip("/")


class ObjectLocation(Location):
    """A prefix of an object store, through fsspec; pickles as its URL and options and opens
    its client again in each process (a client is not fork-safe)."""

    is_local = False
    may_hold_links = False

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None,
                 cache: NodeCache | None = None) -> None:
        from fsspec.registry import known_implementations, registry

        scheme = url.split("://", 1)[0]
        if scheme not in known_implementations and scheme not in registry:
            raise OptionError(f"{url}: unknown URL scheme {scheme!r}; a store is a local path "
                              f"or an object-store URL (s3://, gs://, az://)")
        self.url = url.rstrip("/")
        self.path = self.url
        self.storage_options = dict(storage_options or {})
        self.cache = cache
        # a client per process: its connections and event loop are not a forked child's
        self._client = PerProcess(functools.partial(_connect, self.url, self.storage_options))
        self._fetching = PerProcess(threading.RLock)
        self._tags: PerProcess[OrderedDict[str, str]] = PerProcess(OrderedDict)  # key -> ETag
        # chunk reads on S3: plain GETs of URLs signed once per object (arraystore.s3_gets)
        self._signed = PerProcess(PresignedGets) if scheme == "s3" and \
            presigned_gets_apply(self.storage_options) else None

    def _fs(self) -> tuple[Any, str]:
        return self._client.get()

    def links(self) -> list[str]:
        return []  # an object store has none

    def refuse_links_to(self, folders: Iterable[str]) -> None:
        """An object store has no links."""

    def remove_partials(self, folders: Iterable[str]) -> None:
        """Nothing to remove: an object is written whole or not at all."""

    def check_can_hold_store(self) -> None:
        """Any prefix of a bucket can hold a store."""

    def fetching(self) -> threading.RLock:
        """This process's lock around a fetch of samples: a read-ahead thread and the reader's
        own thread take turns with the readers' shard-index caches."""
        return self._fetching.get()

    def cached(self, cache: NodeCache | None) -> ObjectLocation:
        return self if cache == self.cache else \
            ObjectLocation(self.url, self.storage_options, cache)

    @property
    def fs(self) -> Any:
        return self._fs()[0]

    @property
    def root(self) -> str:
        return self._fs()[1]

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0]

    def key_path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def where(self, key: str) -> str:
        return f"{self.url}/{key}"

    def zarr_store(self, read_only: bool) -> Any:
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.url, storage_options=self.storage_options or None,
                                    read_only=read_only)

    @_remote
    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self.key_path(key))

    @_remote
    def read_range(self, key: str, start: int, stop: int) -> bytes:
        return self.fs.cat_file(self.key_path(key), start=start, end=stop)

    @_remote
    def read_ranges(self, keys: Sequence[str], starts: Sequence[int],
                    stops: Sequence[int | None],
                    versioned: bool = False) -> list[bytes | memoryview | None]:
        """Many ranges at once (concurrent requests); None where the object does not exist. A
        negative start with a stop of None asks for the object's last ``-start`` bytes. Each
        answer is bytes, or (S3 chunk reads) a writable memoryview of a buffer of its own.

        ``versioned`` (the readers' chunk reads): on S3 through URLs signed once per object
        (:mod:`arraystore.s3_gets`: a fraction of botocore's CPU per GET), and every GET of an
        object this process has read so before asks for the version it read then
        (``If-Match`` on its ETag, recorded from the first answer or :meth:`versions`): an
        object replaced since raises :class:`ObjectChangedError` naming it, and is forgotten,
        so that the caller reads it again from the start (its shard index first) rather than
        mixing ranges of two versions. Other services are read without the condition."""
        paths = [self.key_path(k) for k in keys]
        if self.scheme != "s3" or not versioned:
            got = self.fs.cat_ranges(paths, list(starts), list(stops), on_error="return")
            return self._answers(keys, got, lambda data: data)
        tags = self._tags.get()
        asked = [(path, start, stop, tags.get(key))
                 for key, path, start, stop in zip(keys, paths, starts, stops, strict=True)]
        got = self._signed.get().get_many(self.fs, asked) if self._signed is not None \
            else _gather_s3_ranges(self.fs, asked)
        seen: dict[str, str] = {}
        changed = {key for key, answer in zip(keys, got, strict=True)
                   if isinstance(answer, OSError) and _precondition_failed(answer)}
        for key, answer in zip(keys, got, strict=True):
            if isinstance(answer, tuple) and answer[1] and \
                    seen.setdefault(key, answer[1]) != answer[1]:
                changed.add(key)  # replaced between two of these GETs
        if changed:
            self.forget(changed)
            raise ObjectChangedError(
                f"{', '.join(self.where(k) for k in sorted(changed))}: replaced while being "
                f"read (the ETag changed); read again", sorted(changed))
        for key, tag in seen.items():
            _remember(tags, key, tag)
        return self._answers(keys, [a[0] if isinstance(a, tuple) else a for a in got],
                             lambda data: data)

    def forget(self, keys: Iterable[str]) -> None:
        """Forget the versions this process read of objects ``keys`` (they were replaced)."""
        tags = self._tags.get()
        for key in keys:
            tags.pop(key, None)

    def _answers(self, keys: Sequence[str], got: Sequence[Any],
                 value: Callable[[Any], T]) -> list[T | None]:
        """``value`` of each object's answer in ``got``; None where the object does not exist;
        any other failure raised, naming its object."""
        out: list[T | None] = []
        for key, answer in zip(keys, got, strict=True):
            if isinstance(answer, FileNotFoundError):
                out.append(None)
            elif isinstance(answer, BaseException):
                raise OSError(f"{self.where(key)}: {answer}") from answer
            else:
                out.append(value(answer))
        return out

    def read_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return self.read_ranges(keys, [0] * len(keys), [None] * len(keys))

    @_remote
    def versions(self, keys: Sequence[str]) -> list[tuple[int, str] | None]:
        """Each object's size and version tag (its ETag, else its modification time), asked
        of the service now (concurrent HEADs, listings cached by the client ignored); None
        where the object does not exist."""
        fs, paths = self.fs, [self.key_path(k) for k in keys]
        if getattr(fs, "async_impl", False):
            import asyncio

            from fsspec.asyn import sync

            fresh = {"refresh": True} if self.scheme == "s3" else {}

            async def each() -> list[Any]:
                return await asyncio.gather(*(fs._info(p, **fresh) for p in paths),
                                            return_exceptions=True)

            got = sync(fs.loop, each)
        else:
            got = []
            for path in paths:
                try:
                    got.append(fs.info(path))
                except OSError as exc:
                    got.append(exc)
        found = self._answers(keys, got, _version)
        if self.scheme == "s3":  # what this process reads next must be of these versions
            tags = self._tags.get()
            for key, version in zip(keys, found, strict=True):
                if version is not None:
                    _remember(tags, key, version[1])
        return found

    def update(self, key: str, change: Callable[[bytes], bytes | None]) -> bytes:
        """Rewrite ``key`` as ``change`` makes its current bytes (None: leave it), and only if
        nobody rewrote it in between: on S3 a PUT conditioned on the ETag the GET returned
        (``If-Match``), tried again when another write came first; elsewhere a plain read and
        write."""
        return self.update_each([key], change)[0]

    @_remote
    def update_each(self, keys: Sequence[str],
                    change: Callable[[bytes], bytes | None]) -> list[bytes]:
        """:meth:`update` of each of ``keys``, all at once."""
        paths = [self.key_path(key) for key in keys]
        if self.scheme != "s3":
            out = []
            for path in paths:
                current = self.fs.cat_file(path)
                new = change(current)
                if new is not None:
                    self.fs.pipe_file(path, new)
                out.append(current if new is None else new)
            return out
        import asyncio

        from fsspec.asyn import sync

        async def each() -> list[bytes | None]:
            return await asyncio.gather(*(_update_s3_object(self.fs, *path.split("/", 1), change)
                                          for path in paths))

        stored = sync(self.fs.loop, each)
        for key, path, got in zip(keys, paths, stored, strict=True):
            self.fs.invalidate_cache(path)
            if got is None:
                raise StoreAccessError(f"{self.where(key)}: rewritten by other writers 100 "
                                       f"times in a row")
        return stored

    @_remote
    def names(self, prefix: str) -> list[str]:
        path = self.key_path(prefix)
        self.fs.invalidate_cache(path)  # s3fs caches listings; another writer may have added
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    @_remote
    def size(self, key: str) -> int | None:
        try:
            return int(self.fs.size(self.key_path(key)))
        except FileNotFoundError:
            return None

    def exists(self) -> bool:
        return not self.vacant()

    @_remote
    def vacant(self) -> bool:
        self.fs.invalidate_cache(self.root)  # another process may have written since
        try:
            return not self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return True

    @_remote
    def remove(self) -> None:
        self.fs.rm(self.root, recursive=True)
        self.fs.invalidate_cache()

    @_remote
    def usage(self, prefix: str) -> tuple[int, int]:
        found = self.fs.find(self.key_path(prefix), detail=True)
        return sum(int(v.get("size") or 0) for v in found.values()), len(found)

    def sibling_path(self, suffix: str, name: str) -> str:
        return f"{self.url}{suffix}/{name}"

    @_remote
    def write_sibling(self, suffix: str, name: str, data: bytes) -> None:
        self.fs.pipe_file(f"{self.root}{suffix}/{name}", data)  # one PUT: whole or nothing

    def sibling(self, suffix: str) -> str:
        return f"{self.root}{suffix}"

    def problem(self, key: str) -> str | None:
        return None  # object keys are plain names: the schema's field names are identifiers

    def make_durable(self, keys: Iterable[str]) -> None:
        """Nothing to do: an object is durable once its PUT returned."""

    def tensorstore_kvstore(self, key: str) -> dict[str, Any] | None:
        """S3 and GCS, which TensorStore speaks natively; None for the others."""
        bucket, _, prefix = f"{self.root}/{key}".partition("/")
        if self.scheme == "s3":
            spec: dict[str, Any] = {"driver": "s3", "bucket": bucket, "path": f"{prefix}/",
                                    "aws_credentials": {"type": "environment"}}
            options = self.storage_options
            endpoint = (options.get("endpoint_url")
                        or options.get("client_kwargs", {}).get("endpoint_url")
                        or os.environ.get("AWS_ENDPOINT_URL_S3")
                        or os.environ.get("AWS_ENDPOINT_URL"))
            region = (options.get("client_kwargs", {}).get("region_name")
                      or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))
            if endpoint:
                spec["endpoint"] = endpoint
            if region:
                spec["aws_region"] = region
            return spec
        if self.scheme in ("gs", "gcs"):
            return {"driver": "gcs", "bucket": bucket, "path": f"{prefix}/"}
        return None
