"""A node-local cache of the byte ranges readers fetch from an object store.

Readers of a store in an object store fetch byte ranges: a shard's index, a sample's inner
chunk, a per-sample chunk object. With a cache folder (``cache_dir=`` on a reader or loader, or
the ``ARRAYSTORE_CACHE_DIR`` environment variable) each range fetched is kept on the local disk,
and the next read of it, in any process of the node (DataLoader workers, ranks, a restarted
job), is a local file read. On disk::

    DIR/ARRAYSTORE_CACHE              marks the folder as a cache (``cache clear`` checks it)
    DIR/usage                         the bytes the entries hold, kept under a file lock
    DIR/objects/ab/abcd.../object     the object's store, key, size and version tag (its ETag)
    DIR/objects/ab/abcd.../0-4194304  a range: a header (magic, crc32c, length, version),
                                      then the bytes
    DIR/objects/ab/abcd.../last-2064  the object's last 2064 bytes (a shard's index)

Why it can be trusted:

- **Versions.** Before a process uses an object's entries it asks the object store for the
  object's ETag and size (one HEAD per object and process; for the sharded layout a request a
  shard). Each entry's header names the version it was fetched from, and only entries of the
  current version are served; those of another are deleted. The HEAD comes before the GET, so
  bytes of a newer object are at worst filed under an older version (and fetched again), never
  the other way round.
- **Integrity.** Each entry carries the crc32c of its bytes and its length; an entry that fails
  either (a torn write, a flipped bit) is deleted and fetched again. Entries are written to a
  temporary file and renamed into place, so a reader sees a whole entry or none. A process
  holds the entries it reads mapped (the most recently read, up to :data:`HELD_ENTRIES` and
  :data:`HELD_BYTES`; no descriptor each) and checks an entry's crc32c (or its chunk's own)
  on its first read while holding it, as a store's chunk is checked on its first read in a
  process; later reads copy out of the mapping. Measured in one process (32 SA-1B items in
  batches of 8): reading each range with ``preadv`` and checking it every time ran at 615
  items/s against the local store's 1430. A program that truncates a held entry in place
  would end the process with ``SIGBUS`` (arraystore only renames entries into place and
  deletes them).
- **One download per range.** A process fetching a range holds the range's lock file
  (``flock``); another process wanting it waits for the first and reads its entry.
- **A bound.** ``cache_limit`` (bytes or ``"50GB"``; ``ARRAYSTORE_CACHE_LIMIT``) bounds the
  entries' bytes: past it, the least recently used entries (a hit touches the entry's mtime,
  at most once a minute) are deleted down to 90% of the limit. Only files named as entries
  beneath ``objects/`` are ever deleted; anything else in the folder is left alone. A deleted
  entry that a process still holds mapped keeps its disk space until the process lets go of it
  (at most :data:`HELD_BYTES` a process).
- **A full disk** (or any failure to write an entry) turns writing off for the process with one
  :class:`CacheWarning`: reads go through to the object store, as without a cache.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import struct
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np

from arraystore.errors import OptionError
from arraystore.per_process import PerProcess
from arraystore.private_mappings import private_chunk

ENV_DIR = "ARRAYSTORE_CACHE_DIR"
ENV_LIMIT = "ARRAYSTORE_CACHE_LIMIT"
DEFAULT_LIMIT = 50 * 10**9
MARKER = "ARRAYSTORE_CACHE"
OBJECTS = "objects"
OBJECT_FILE = "object"
USAGE_FILE = "usage"
LOW_WATER = 0.9  # eviction deletes down to this share of the limit
TOUCH_SECONDS = 60.0  # a read marks an entry used when it was last marked longer ago
HELD_ENTRIES = 4096  # entries a process holds mapped, most recently read, and at most
HELD_BYTES = 1 << 30  # this many bytes of them (an evicted entry's disk space stays in use
# until no process holds it)
HEADER = struct.Struct("<4sIQ8s")  # magic, crc32c of the bytes, their length, version digest
MAGIC = b"ASC1"
ENTRY_NAME = re.compile(r"^(\d+-\d+|last-\d+)$")
# what a write killed midway leaves: a temporary file (``cache clear`` deletes them)
TEMPORARY = re.compile(r"^\.(\d+-\d+|last-\d+|object)\.\d+\.tmp$")
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
         "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}

Request = tuple[str, int, int]  # key, start, stop (start < 0: the last -start bytes)
Version = tuple[int, str]  # an object's size and tag (ETag, else modification time)
Fetch = Callable[[Sequence[Request]], list[bytes | None]]
Versions = Callable[[Sequence[str]], list[Version | None]]


class CacheWarning(UserWarning):
    """The node-local cache could not write (a full disk, a read-only folder): reads go
    through to the object store."""


def parse_size(value: int | str) -> int:
    """Bytes from ``value``: an int, or a number with an optional unit (``"50GB"``,
    ``"1.5 GiB"``, ``"800M"``; decimal units are powers of 1000, ``*iB`` of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if match is None or match.group(2).upper() not in UNITS:
            raise OptionError(f"cache limit {value!r}: expected a number of bytes with an "
                              f"optional unit, such as 50GB, 800MiB or 1000000")
        number, unit = float(match.group(1)), match.group(2).upper()
    size = int(number * UNITS[unit])
    if size <= 0:
        raise OptionError(f"cache limit {value!r}: must be more than 0 bytes")
    return size


def entry_name(start: int, stop: int) -> str:
    return f"last-{-start}" if start < 0 else f"{start}-{stop}"


def entry_size(start: int, stop: int) -> int:
    return -start if start < 0 else stop - start


@dataclass(frozen=True)
class CacheUsage:
    """What a cache folder holds (``arraystore cache info``)."""

    path: Path
    entries: int
    bytes: int
    objects: int
    stores: tuple[str, ...]


class CachedRange:
    """A range the cache holds for the version a process checked: read when used, into the
    caller's buffers, and checked then (header, length, version, crc32c)."""

    __slots__ = ("_held", "cache", "digest", "path", "size")

    def __init__(self, cache: NodeCache, path: str, size: int, digest: bytes) -> None:
        self.cache, self.path, self.size, self.digest = cache, path, size, digest
        self._held: _Opened | None = None

    def read_into(self, parts: Sequence[memoryview], check_crc: bool = True) -> bool:
        """Fill ``parts`` (writable byte views, ``size`` bytes together) with the range; False
        where the entry is gone (evicted) or does not check out (then it is deleted). Its
        crc32c is checked on its first read while this process holds it (:attr:`verified`),
        as a store's chunk is on its first read. ``check_crc=False``: the caller checks the
        bytes itself (a chunk with its own crc32c) unless :attr:`verified`, calls
        :meth:`discard` when they fail and :meth:`mark_verified` when they pass."""
        opened = self.cache.opened(self.path)
        if opened is None:
            return False
        self._held = opened
        data = opened.data
        good = len(data) == HEADER.size + self.size
        if good:
            magic, crc, length, version = HEADER.unpack_from(data)
            good = magic == MAGIC and length == self.size and version == self.digest
        if good and check_crc and not opened.verified:
            good = opened.verified = crc32c.crc32c(data[HEADER.size:]) == crc
        if not good:
            self.discard()
            return False
        offset = HEADER.size
        for part in parts:
            np.copyto(np.frombuffer(part, np.uint8), data[offset:offset + len(part)])
            offset += len(part)
        if time.monotonic() - opened.touched > TOUCH_SECONDS:
            with contextlib.suppress(OSError):  # most recently used (an inode write: not always)
                os.utime(self.path)
            opened.touched = time.monotonic()
        return True

    @property
    def verified(self) -> bool:
        """Whether this process checked the entry's bytes since it began holding it."""
        return self._held is not None and self._held.verified

    def mark_verified(self) -> None:
        """The caller checked the bytes :meth:`read_into` gave (their own crc32c)."""
        if self._held is not None:
            self._held.verified = True

    def discard(self) -> None:
        """Delete the entry (damaged), taking its bytes off the cache's usage; warns once per
        process, naming the cache folder."""
        self.cache.discard(Path(self.path))


class _Opened:
    """An entry this process holds: its whole file, header included, as a private mapping
    (:mod:`arraystore.private_mappings`: no descriptor is kept), or its bytes where it could
    not be mapped. An entry is never rewritten in place (a new one is renamed over it), so
    what is held stays whole and consistent, even once evicted."""

    __slots__ = ("data", "touched", "verified")

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.touched = float("-inf")  # when this process last marked it used
        self.verified = False  # its crc32c checked since it was opened


class _State:
    """One process's view of a cache: the version of each object it asked for, whether it
    may write, and the entries it holds mapped (at most :data:`HELD_ENTRIES` and
    :data:`HELD_BYTES`; an evicted entry's disk space is freed when its mapping goes)."""

    def __init__(self) -> None:
        self.versions: dict[str, bytes | None] = {}  # object URL -> version digest (None: gone)
        self.folders: dict[tuple[str, str], Path] = {}  # (store URL, key) -> object's folder
        self.opened: OrderedDict[str, _Opened] = OrderedDict()
        self.held_bytes = 0  # of the entries in ``opened``
        self.writing = True
        self.warned = False

    def close(self) -> None:
        self.opened.clear()  # each mapping goes with its last reference
        self.held_bytes = 0

    def hold(self, path: str, entry: _Opened) -> None:
        """Keep ``entry`` mapped, letting go of the least recently read past the bounds."""
        self.opened[path] = entry
        self.held_bytes += len(entry.data)
        while len(self.opened) > HELD_ENTRIES or self.held_bytes > HELD_BYTES:
            self.let_go(next(iter(self.opened)))

    def let_go(self, path: str) -> None:
        entry = self.opened.pop(path, None)
        if entry is not None:
            self.held_bytes -= len(entry.data)


class NodeCache:
    """The cache in folder ``path``, bounded by ``limit`` bytes. Pickles as its path and limit
    (DataLoader workers each open it again)."""

    def __init__(self, path: str | os.PathLike[str], limit: int | str = DEFAULT_LIMIT) -> None:
        self.path = Path(path).expanduser().absolute()
        self.limit = parse_size(limit)
        # a forked child lets go of the mappings it inherited (the parent's stay)
        self._state = PerProcess(_State, close=_State.close, close_in_child=True)

    @classmethod
    def configured(cls, cache_dir: str | os.PathLike[str] | None = None,
                   cache_limit: int | str | None = None) -> NodeCache | None:
        """The cache the arguments name, else the environment's (``ARRAYSTORE_CACHE_DIR``,
        ``ARRAYSTORE_CACHE_LIMIT``); None where neither names a folder (``cache_dir=""``
        turns an environment's cache off)."""
        folder = os.environ.get(ENV_DIR, "") if cache_dir is None else os.fspath(cache_dir)
        if not folder:
            return None
        limit = cache_limit if cache_limit is not None else os.environ.get(ENV_LIMIT)
        return cls(folder, DEFAULT_LIMIT if limit in (None, "") else limit)

    def __repr__(self) -> str:
        return f"NodeCache({str(self.path)!r}, limit={self.limit})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NodeCache) and (self.path, self.limit) == \
            (other.path, other.limit)

    def __hash__(self) -> int:
        return hash((self.path, self.limit))

    # ----------------------------------------------------------------------------- reading

    def get(self, url: str, requests: Sequence[Request], fetch: Fetch, versions: Versions,
            lazy: bool = False) -> list[bytes | memoryview | CachedRange | None]:
        """The bytes of each request (ranges of objects under store ``url``): from the cache
        where it holds them for the object's current version, else by ``fetch`` (then kept).
        ``versions`` asks the object store for objects' current versions. ``lazy``: a range
        the cache holds comes as a :class:`CachedRange`, read later straight into the
        caller's buffer (a batch slot) rather than into bytes now."""
        state = self._state.get()
        digests = self._versions(url, sorted({key for key, _, _ in requests}), versions, state)
        out: list[bytes | memoryview | CachedRange | None] = [None] * len(requests)
        missing: list[int] = []
        for number, (key, start, stop) in enumerate(requests):
            digest = digests[key]
            if digest is not None:
                path = f"{self._object_folder(url, key)}/{entry_name(start, stop)}"
                if not lazy:
                    out[number] = self._read(url, key, start, stop, digest)
                elif path in state.opened or os.path.isfile(path):
                    out[number] = CachedRange(self, path, entry_size(start, stop), digest)
            if out[number] is None:
                missing.append(number)
        if missing:
            self._fill(url, requests, missing, out, fetch, digests, state)
        return out

    def forget(self, url: str, keys: Iterable[str]) -> None:
        """Forget the versions this process learnt of objects ``keys`` of store ``url`` (they
        were replaced): the next read asks the object store again."""
        known = self._state.get().versions
        for key in keys:
            known.pop(f"{url}/{key}", None)

    def _versions(self, url: str, keys: list[str], versions: Versions,
                  state: _State) -> dict[str, bytes | None]:
        """Each object's version digest (None: it does not exist), asked of the object store
        once per object and process; an object's entries of another version are deleted."""
        unknown = [key for key in keys if f"{url}/{key}" not in state.versions]
        if unknown:
            for key, version in zip(unknown, versions(unknown), strict=True):
                state.versions[f"{url}/{key}"] = None if version is None \
                    else self._adopt(url, key, version, state)
        return {key: state.versions[f"{url}/{key}"] for key in keys}

    def _adopt(self, url: str, key: str, version: Version, state: _State) -> bytes:
        """Record ``version`` as the object's, deleting its entries of another version (they
        would never be served: an entry's header names its version); the version's digest."""
        record = {"store": url, "key": key, "size": version[0], "tag": version[1]}
        digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).digest()[:8]
        folder = self._object_folder(url, key)
        try:
            current = json.loads((folder / OBJECT_FILE).read_text())
        except FileNotFoundError:
            current = None
        except (OSError, ValueError):  # not a record this cache wrote: its entries are suspect
            current = None
            self._warn_damaged(folder / OBJECT_FILE)
        if current == record or not state.writing:
            return digest
        for path in [p for p in state.opened if p.startswith(f"{folder}/")]:
            self._close(path)  # entries of the version being replaced
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._mark()
            self._add_usage(-sum(_remove_entry(entry) for entry in _entries(folder)))
            _write_atomic(folder / OBJECT_FILE, json.dumps(record).encode())
        except OSError as exc:
            self._stop_writing(state, exc)
        return digest

    def _read(self, url: str, key: str, start: int, stop: int,
              digest: bytes) -> memoryview | None:
        """A range's bytes from its entry, or None: absent, of another version, or damaged
        (then deleted)."""
        size = entry_size(start, stop)
        data = memoryview(bytearray(size))
        entry = CachedRange(self, f"{self._object_folder(url, key)}/{entry_name(start, stop)}",
                            size, digest)
        return data if entry.read_into([data]) else None

    def opened(self, path: str) -> _Opened | None:
        """The entry at ``path`` held by this process (mapped now if it is not), or None
        where there is none."""
        opened = self._state.get().opened
        entry = opened.get(path)
        if entry is not None:
            opened.move_to_end(path)
            return entry
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            size = os.fstat(descriptor).st_size
            data = private_chunk(descriptor, 0, size, np.dtype(np.uint8)) if size else None
            held = data is not None
            if data is None:  # not mapped (empty, or no mapping to be had): read, not held
                data = np.frombuffer(os.pread(descriptor, size, 0), np.uint8)
        except OSError:
            return None
        finally:
            os.close(descriptor)
        entry = _Opened(data)
        if held:
            self._state.get().hold(path, entry)
        return entry

    def _close(self, path: str) -> None:
        self._state.get().let_go(path)

    def discard(self, entry: Path) -> None:
        """Delete a damaged entry (and take its bytes off the usage), with a warning."""
        self._close(str(entry))
        self._add_usage(-_remove_entry(entry))
        self._warn_damaged(entry)

    def _warn_damaged(self, path: Path) -> None:
        """Warn, once per process and naming the folder, that a file of the cache was damaged
        (it is deleted or rewritten: what it held is read again from the object store)."""
        state = self._state.get()
        if not state.warned:
            state.warned = True
            warnings.warn(f"{self.path}: a cache file was damaged (truncated, overwritten, or "
                          f"of another arraystore version): replaced, what it held read again "
                          f"from the object store ({path.relative_to(self.path)}; later ones "
                          f"are replaced without a warning)", CacheWarning, stacklevel=2)

    def _fill(self, url: str, requests: Sequence[Request], missing: list[int],
              out: list[bytes | memoryview | None], fetch: Fetch,
              digests: dict[str, bytes | None], state: _State) -> None:
        """Fetch the ``missing`` requests and keep them: those whose lock this process gets
        (or that it cannot keep) are fetched together; those another process is fetching
        are waited for, then read from its entry (or fetched, if it failed)."""
        keep = [n for n in missing if digests[requests[n][0]] is not None and state.writing]
        locks = {n: self._lock(url, requests[n]) for n in keep}
        waiting = [n for n in keep if locks[n] is None]
        taken = []
        for number in missing:  # one written since it was missed is read, not fetched again
            if locks.get(number) is not None:
                key, start, stop = requests[number]
                out[number] = self._read(url, key, start, stop, digests[key])
            if out[number] is None and number not in waiting:
                taken.append(number)
        try:
            fetched = fetch([requests[n] for n in taken]) if taken else []
            kept = 0
            for number, data in zip(taken, fetched, strict=True):
                out[number] = data
                if locks.get(number) is not None and data is not None:
                    kept += self._keep(url, requests[number], data,
                                       digests[requests[number][0]], state)
            self._add_usage(kept)
        finally:
            for lock in locks.values():
                if lock is not None:
                    os.close(lock)
        late = []
        for number in waiting:
            key, start, stop = requests[number]
            lock = self._lock(url, requests[number], wait=True)
            if lock is not None:
                os.close(lock)
            out[number] = self._read(url, key, start, stop, digests[key])
            if out[number] is None:
                late.append(number)
        if late:
            for number, data in zip(late, fetch([requests[n] for n in late]), strict=True):
                out[number] = data

    def _keep(self, url: str, request: Request, data: bytes, digest: bytes | None,
              state: _State) -> int:
        """Write a fetched range's entry; the bytes it takes (0 if not written)."""
        key, start, stop = request
        if digest is None or not state.writing or len(data) != entry_size(start, stop):
            return 0
        header = HEADER.pack(MAGIC, crc32c.crc32c(data), len(data), digest)
        try:
            _write_atomic(self._object_folder(url, key) / entry_name(start, stop), header,
                          data)
        except OSError as exc:
            self._stop_writing(state, exc)
            return 0
        return HEADER.size + len(data)

    def _lock(self, url: str, request: Request, wait: bool = False) -> int | None:
        """The range's lock file, locked (a descriptor), or None: another process holds it
        (``wait=False``) or it cannot be made."""
        key, start, stop = request
        path = self._object_folder(url, key) / f".{entry_name(start, stop)}.lock"
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            os.close(descriptor)
            return None
        return descriptor

    # ------------------------------------------------------------------------ housekeeping

    def _object_folder(self, url: str, key: str) -> Path:
        """The folder of object ``key`` of store ``url`` (named by a digest of both)."""
        folders = self._state.get().folders
        folder = folders.get((url, key))
        if folder is None:
            digest = hashlib.sha256(f"{url}/{key}".encode()).hexdigest()[:32]
            folder = folders[(url, key)] = self.path / OBJECTS / digest[:2] / digest
        return folder

    def _mark(self) -> None:
        marker = self.path / MARKER
        if not marker.exists():
            _write_atomic(marker, b"an arraystore node-local cache: arraystore cache info|clear\n")

    def _stop_writing(self, state: _State, exc: OSError) -> None:
        state.writing = False
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        warnings.warn(f"{self.path}: {'the disk is full' if full else exc}; the node-local "
                      f"cache stops keeping what this process fetches and reads go through "
                      f"to the object store", CacheWarning, stacklevel=4)

    def _add_usage(self, delta: int) -> None:
        """Add ``delta`` bytes to the recorded usage; past the limit, evict."""
        if not delta:
            return
        with self._usage_locked() as descriptor:
            if descriptor is None:
                return
            used = max(0, _read_usage(descriptor) + delta)
            if used > self.limit:
                used = self._evict(int(self.limit * LOW_WATER))
            os.pwrite(descriptor, struct.pack("<Q", used), 0)

    @contextlib.contextmanager
    def _usage_locked(self) -> Iterator[int | None]:
        try:
            descriptor = os.open(self.path / USAGE_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                 0o644)
        except OSError:
            yield None
            return
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield descriptor
        finally:
            os.close(descriptor)

    def _evict(self, target: int) -> int:
        """Delete least recently used entries until they hold at most ``target`` bytes (the
        usage lock held); their bytes after."""
        found = []
        for folder in _object_folders(self.path):
            for entry in _entries(folder):
                with contextlib.suppress(OSError):
                    info = entry.stat()
                    found.append((info.st_mtime_ns, info.st_size, entry))
        total = sum(size for _, size, _ in found)
        for _, _size, entry in sorted(found, key=lambda item: item[0]):
            if total <= target:
                break
            total -= _remove_entry(entry)
        return total

    def usage(self) -> CacheUsage:
        """The entries, bytes and objects the folder holds, and the stores they come from."""
        entries = size = objects = 0
        stores = set()
        for folder in _object_folders(self.path):
            objects += 1
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                stores.add(str(json.loads((folder / OBJECT_FILE).read_text())["store"]))
            for entry in _entries(folder):
                with contextlib.suppress(OSError):
                    size += entry.stat().st_size
                    entries += 1
        return CacheUsage(self.path, entries, size, objects, tuple(sorted(stores)))

    def clear(self) -> CacheUsage:
        """Delete every entry (and the objects' records and lock files); what was there."""
        if not (self.path / MARKER).is_file():
            raise OptionError(f"{self.path}: not an arraystore cache folder (it has no "
                              f"{MARKER} file); nothing deleted")
        before = self.usage()
        with self._usage_locked() as descriptor:
            for folder in _object_folders(self.path):
                for entry in _entries(folder):
                    _remove_entry(entry)
                for leftover in folder.iterdir():
                    if TEMPORARY.match(leftover.name) and leftover.is_file():
                        with contextlib.suppress(OSError):
                            leftover.unlink()
                with contextlib.suppress(OSError):
                    (folder / OBJECT_FILE).unlink()
                with contextlib.suppress(OSError):
                    folder.rmdir()
            if descriptor is not None:
                os.pwrite(descriptor, struct.pack("<Q", 0), 0)
        return before


def _object_folders(root: Path) -> Iterator[Path]:
    objects = root / OBJECTS
    if not objects.is_dir():
        return
    for group in sorted(objects.iterdir()):
        if group.is_dir() and not group.is_symlink() and re.fullmatch(r"[0-9a-f]{2}", group.name):
            for folder in sorted(group.iterdir()):
                if folder.is_dir() and not folder.is_symlink() \
                        and re.fullmatch(r"[0-9a-f]{32}", folder.name):
                    yield folder


def _entries(folder: Path) -> Iterator[Path]:
    """The entries in an object's folder: files named as ranges, nothing else."""
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            if ENTRY_NAME.match(entry.name) and entry.is_file() and not entry.is_symlink():
                yield entry


def _remove_entry(entry: Path) -> int:
    """Delete an entry and its lock file; the bytes it held (0 if it was gone)."""
    try:
        size = entry.stat().st_size
        entry.unlink()
    except OSError:
        return 0
    with contextlib.suppress(OSError):
        (entry.parent / f".{entry.name}.lock").unlink()
    return size


def _read_usage(descriptor: int) -> int:
    raw = os.pread(descriptor, 8, 0)
    return struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0


def _write_atomic(path: Path, *parts: bytes) -> None:
    """Write ``parts`` to ``path`` whole or not at all: a temporary file beside it
    (:data:`TEMPORARY`), renamed into place."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            for part in parts:
                file.write(part)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
