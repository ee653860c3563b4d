"""One writer per store: an exclusive ``flock`` on ``<store>.lock``, beside the store.

The kernel releases a ``flock`` when its process dies, however it dies, so a lock left by a killed
writer is never mistaken for a live one: the next writer takes it over and says whose it was. The
file names the holder (pid, host, command, time) so a refused writer can say who holds the store.
It lives beside the store, not in it: zarr warns about files in a group that are not Zarr nodes.
Locks are re-entrant within a process (``ingest`` holds it while its writer takes it again).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path
from types import TracebackType

from arraystore.errors import ArrayStoreError
from arraystore.keys import settle_pending_writes
from arraystore.store import utc_now

LOCK_SUFFIX = ".lock"
log = logging.getLogger(__name__)
_held: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth) held by this process


class StoreLockedError(ArrayStoreError, BlockingIOError):
    """Another live process is writing the store."""


def lock_path(store_path: str | os.PathLike[str]) -> Path:
    path = Path(store_path)
    return path.with_name(path.name + LOCK_SUFFIX)


def _describe(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (ValueError, OSError):
        return {}


class StoreLock:
    """``with StoreLock(path):`` -- hold the store's writer lock or raise StoreLockedError."""

    def __init__(self, store_path: str | os.PathLike[str]) -> None:
        self.store_path = Path(store_path)
        self.path = lock_path(store_path)
        self.key = str(self.path.resolve())

    def acquire(self) -> None:
        if self.key in _held:
            fd, depth = _held[self.key]
            _held[self.key] = (fd, depth + 1)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(fd)
                os.close(fd)
                raise StoreLockedError(
                    f"{self.store_path} is being written by pid {holder.get('pid', '?')} on "
                    f"{holder.get('host', '?')} (since {holder.get('since', '?')}: "
                    f"{holder.get('command', '?')}); wait for it to finish, or stop it"
                ) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # the holder removed the file between our open and our lock: retry
        previous = _describe(fd)
        if previous.get("pid"):
            log.warning("%s: taking over the lock of pid %s on %s, which is no longer running",
                        self.store_path, previous.get("pid"), previous.get("host"))
        record = json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "since": utc_now(),
            "command": " ".join(sys.argv)[:500],
        }).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        _held[self.key] = (fd, 1)

    def release(self) -> None:
        """Release the lock, once every write zarr still has in flight has landed (a failed
        write's siblings may still be running): nothing reaches the store after this."""
        fd, depth = _held[self.key]
        if depth > 1:
            _held[self.key] = (fd, depth - 1)
            return
        settle_pending_writes()
        del _held[self.key]
        os.ftruncate(fd, 0)  # a clean release leaves no holder to report
        self.path.unlink(missing_ok=True)
        os.close(fd)

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
