"""One writer at a time: a second is refused naming the holder; a dead holder's lock is taken."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from arraystore import ingest
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.lock import StoreLock, StoreLockedError, lock_path

HOLD_AND_DIE = """
import os, sys
from arraystore.lock import StoreLock
StoreLock(sys.argv[1]).acquire()
os._exit(0)  # dies holding the lock: no release, the lock file stays
"""


def test_second_writer_is_refused_naming_the_holder(tmp_path, shard) -> None:
    out = tmp_path / "s.zarr"
    with StoreLock(out):
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}") as caught:
            _other_process_lock(out)  # (within this process the lock is re-entrant)
        assert isinstance(caught.value, BlockingIOError)
        result = subprocess.run([sys.executable, "-m", "arraystore", "ingest", "sa1b",
                                 str(shard), "--out", str(out), "--workers", "1"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and f"pid {os.getpid()}" in result.stderr
        assert "Traceback" not in result.stderr
    assert not lock_path(out).exists()
    assert ingest(Sa1bTarSource(), [shard], out, workers=1).ingested == 5


def _other_process_lock(out) -> None:
    """Try the lock from another process, re-raising its refusal here."""
    code = ("import sys\nfrom arraystore.lock import StoreLock\n"
            "try:\n    StoreLock(sys.argv[1]).acquire()\n"
            "except BlockingIOError as e:\n    print(e); sys.exit(3)\n")
    result = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True,
                            text=True, timeout=60)
    if result.returncode == 3:
        raise StoreLockedError(result.stdout.strip())
    raise AssertionError(f"the second process got the lock: {result}")


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, shard, caplog) -> None:
    out = tmp_path / "s.zarr"
    dead = subprocess.run([sys.executable, "-c", HOLD_AND_DIE, str(out)], timeout=60)
    assert dead.returncode == 0 and lock_path(out).exists()
    with caplog.at_level(logging.WARNING, logger="arraystore.lock"):
        report = ingest(Sa1bTarSource(), [shard], out, workers=1)
    assert report.ingested == 5
    assert "no longer running" in caplog.text
    assert not lock_path(out).exists()


def test_lock_is_reentrant_within_a_process(tmp_path) -> None:
    with StoreLock(tmp_path / "s.zarr"), StoreLock(tmp_path / "s.zarr"):
        assert lock_path(tmp_path / "s.zarr").exists()
    assert not lock_path(tmp_path / "s.zarr").exists()
