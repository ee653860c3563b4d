"""One writer per store: a lock beside the store, ``<store>.lock``, naming its holder.

On a local disk the lock is an exclusive ``flock`` on that file. The kernel releases a ``flock``
when its process dies, however it dies, so a lock left by a killed writer is never mistaken for a
live one: the next writer takes it over and says whose it was.

In an object store there is no ``flock``: the lock is an object created with a conditional write
(``If-None-Match: *``: the PUT fails if it exists), holding pid, host, command, a random token
and a heartbeat the holder rewrites every ``heartbeat_s``. A second writer is refused with the
holder's name. A lock whose heartbeat stopped ``stale_after_s`` ago (its writer was killed) is
taken over only when the caller says so (``--break-lock``), never silently; a live one never.

Fencing: a writer paused (``SIGSTOP``, a long GC pause, a partition) past the stale time may
wake up after its lock was broken. It reads the lock object again before every commit and every
growth of the arrays (:meth:`StoreLock.ensure_held`, one request) and stops at the first it no
longer holds; the writer that took over writes only in a fresh region past everything the paused
one could still reach (:mod:`arraystore.writer`), so the chunks the paused one writes before its
next check land where nothing committed ever lives. What a writer frozen right after a check
does next is fenced by the store (:meth:`arraystore.store.Store.claim`): its metadata writes
check its token, and its late commits fall in revoked ranges.

The file names the holder so a refused writer can say who holds the store; it lives beside the
store's real folder (links resolved: any two spellings of a store share its lock), not in it
(zarr warns about files in a group that are not Zarr nodes). Locks are re-entrant within a
process (``ingest`` holds it while its writer takes it again).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import secrets
import socket
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from arraystore.errors import StoreLockedError
from arraystore.keys import settle_pending_writes
from arraystore.location import LocalLocation, Location, ObjectLocation, remote_failures
from arraystore.store import StoreTarget, utc_now

LOCK_SUFFIX = ".lock"
STALE_AFTER_S = float(os.environ.get("ARRAYSTORE_LOCK_STALE_S", 300))
log = logging.getLogger(__name__)
_held: dict[str, tuple[Any, int]] = {}  # lock key -> (held lock, depth) in this process


def lock_path(store_path: str | os.PathLike[str]) -> Path:
    """The lock file of the local store at ``store_path``: beside the store's real folder, so
    that two spellings of one store share one lock and exclude each other."""
    return Path(LocalLocation(Path(store_path)).sibling(LOCK_SUFFIX))


def _holder_record(**extra: Any) -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now(),
            "command": " ".join(sys.argv)[:500], **extra}


def holder_record(raw: bytes) -> dict[str, Any]:
    """The holder a lock file records; {} for one that is empty or not a record (garbage left
    by something else: treated as a holder that says nothing, never trusted or executed)."""
    try:
        record = json.loads(raw or b"{}")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _who(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} (since "
            f"{holder.get('since', '?')}: {holder.get('command', '?')})")


class StoreLock:
    """``with StoreLock(store):`` -- hold the store's writer lock or raise StoreLockedError.

    ``store`` is a local path, an object-store URL or a :class:`Location`; ``break_lock`` lets
    an object-store writer take over a stale lock (a local lock needs no breaking)."""

    def __init__(self, store: StoreTarget, *, break_lock: bool = False,
                 stale_after_s: float = STALE_AFTER_S) -> None:
        self.location = Location.of(store)
        self.break_lock = break_lock
        self.stale_after_s = stale_after_s
        self.key = self.location.sibling(LOCK_SUFFIX)

    def acquire(self) -> None:
        if self.key in _held:
            lock, depth = _held[self.key]
            _held[self.key] = (lock, depth + 1)
            return
        if self.location.is_local:
            lock = _FileLock(self.location.path, Path(self.key))
        else:
            lock = _ObjectLock(self.location, self.key, self.break_lock, self.stale_after_s)
        lock.acquire()
        _held[self.key] = (lock, 1)

    def ensure_held(self) -> None:
        """Raise StoreLockedError if the lock was lost (an object-store lock broken by
        another writer: the lock object is read again, one request); a writer calls this
        before each commit and each growth of the arrays (its metadata writes are fenced by
        the store: :meth:`arraystore.store.Store.claim`)."""
        _held[self.key][0].ensure_held()

    @property
    def token(self) -> str:
        """This holder's random token: the store records it as its writer's
        (:meth:`arraystore.store.Store.claim`), a fencing token for its metadata writes."""
        return _held[self.key][0].record["token"]

    @property
    def took_over(self) -> bool:
        """Whether this process broke a stale object-store lock to take the store: its
        former holder may be paused, not dead, and write again when it wakes."""
        return _held[self.key][0].took_over

    def release(self) -> None:
        """Release the lock, once every write zarr still has in flight has landed (a failed
        write's siblings may still be running): nothing reaches the store after this."""
        lock, depth = _held[self.key]
        if depth > 1:
            _held[self.key] = (lock, depth - 1)
            return
        settle_pending_writes()
        del _held[self.key]
        lock.release()

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class _FileLock:
    """An ``flock`` on ``<store>.lock``."""

    took_over = False  # a flock is never broken: its holder is dead (the kernel released it)

    def __init__(self, store_path: Path, path: Path) -> None:
        self.store_path, self.path = store_path, path
        self.fd = -1
        self.record = _holder_record(store=os.path.realpath(store_path),
                                     token=secrets.token_hex(16))

    @staticmethod
    def _describe(fd: int) -> dict:
        try:
            return holder_record(os.pread(fd, 4096, 0))
        except OSError:
            return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._describe(fd)
                os.close(fd)
                raise StoreLockedError(
                    f"{self.store_path} is being written by {_who(holder)}; wait for it to "
                    f"finish, or stop it"
                ) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # the holder removed the file between our open and our lock: retry
        previous = self._describe(fd)
        if previous.get("pid"):
            log.warning("%s: taking over the lock of pid %s on %s, which is no longer running",
                        self.store_path, previous.get("pid"), previous.get("host"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.record).encode(), 0)
        self.fd = fd

    def ensure_held(self) -> None:
        """An ``flock`` cannot be taken away from a live process."""

    def release(self) -> None:
        os.ftruncate(self.fd, 0)  # a clean release leaves no holder to report
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


class _ObjectLock:
    """A lock object with a heartbeat (see the module docstring)."""

    def __init__(self, location: ObjectLocation, key: str, break_lock: bool,
                 stale_after_s: float) -> None:
        self.location, self.key = location, key
        self.break_lock, self.stale_after_s = break_lock, stale_after_s
        self.heartbeat_s = max(0.2, stale_after_s / 10)
        self.record = _holder_record(token=secrets.token_hex(16))
        self.lost: str | None = None
        self.took_over = False
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    def _put(self, exclusive: bool) -> None:
        self.record["heartbeat"] = utc_now()
        self.location.fs.pipe_file(self.key, json.dumps(self.record).encode(),
                                   mode="create" if exclusive else "overwrite")

    def _holder(self) -> dict[str, Any] | None:
        try:
            return holder_record(self.location.fs.cat_file(self.key))
        except FileNotFoundError:
            return None

    def acquire(self) -> None:
        with remote_failures(self.location.url):
            try:
                self._put(exclusive=True)
            except FileExistsError:
                holder = self._holder() or {}
                self._refuse_or_break(holder)
                self._put(exclusive=True)  # a FileExistsError: another writer won the race
        self._beating = threading.Thread(target=self._beat, name=f"lock {self.key}",
                                         daemon=True)
        self._beating.start()

    def _refuse_or_break(self, holder: dict[str, Any]) -> None:
        try:
            beat = dt.datetime.fromisoformat(holder["heartbeat"])
            silent = (dt.datetime.now(dt.UTC) - beat).total_seconds()
        except (KeyError, ValueError, TypeError):
            silent = float("inf")  # unreadable: no heartbeat to wait for
        where = f"{self.location} is being written by {_who(holder)}"
        if silent < self.stale_after_s:
            raise StoreLockedError(
                f"{where}, last heartbeat {silent:.0f} s ago; wait for it to finish, or stop "
                f"it (its lock goes stale {self.stale_after_s:.0f} s after its last heartbeat, "
                f"and can then be taken over with --break-lock)")
        if not self.break_lock:
            raise StoreLockedError(
                f"{where}, but its last heartbeat was {silent:.0f} s ago: that writer is "
                f"probably gone. If it is, re-run with --break-lock to take the store over "
                f"(the next run resumes where it stopped)")
        log.warning("%s: breaking the stale lock of %s (no heartbeat for %.0f s)",
                    self.location, _who(holder), silent)
        self.location.fs.rm_file(self.key)
        self.took_over = True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = self._holder()
            if holder is None or holder.get("token") != self.record["token"]:
                self.lost = (f"{self.location}: this writer's lock was broken"
                             + (f" and taken by {_who(holder)}" if holder else ""))
                log.error("%s", self.lost)
                return
            try:
                self._put(exclusive=False)
            except OSError as exc:  # a missed beat is survivable; the next one retries
                log.warning("%s: lock heartbeat failed: %s", self.location, exc)

    def ensure_held(self) -> None:
        """The lock object read again now (not at the last heartbeat: a writer paused for
        longer than the stale time wakes up with a heartbeat thread that has not run yet)."""
        if not self.lost:
            with remote_failures(self.location.url):
                holder = self._holder()
            if holder is None or holder.get("token") != self.record["token"]:
                self.lost = (f"{self.location}: this writer's lock was broken"
                             + (f" and taken by {_who(holder)}" if holder else ""))
        if self.lost:
            raise StoreLockedError(f"{self.lost}; nothing more is committed by this run")

    def release(self) -> None:
        self._stop.set()
        if self._beating is not None:
            self._beating.join()
        holder = self._holder()
        if holder is not None and holder.get("token") == self.record["token"]:
            self.location.fs.rm_file(self.key)
