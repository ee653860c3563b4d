"""Per-process state (arraystore.per_process): made on first use in each process, forgotten (or
closed) in a forked child by the one fork hook, made anew where its holder is unpickled."""

from __future__ import annotations

import asyncio
import gc
import io
import itertools
import logging
import os
import pickle
import shutil
import socket
import sys
import types
import uuid
from pathlib import Path

import pytest
from conftest import _layout_store, assert_same_values

from arraystore import SampleReader
from arraystore.compat import inherited_event_loops
from arraystore.per_process import PerProcess
from arraystore.testing.cloud_region import Region

MADE = itertools.count()
CLOSED: list[int] = []


def make() -> int:
    return next(MADE)


def close(value: int) -> None:
    CLOSED.append(value)


class Holder:
    def __init__(self) -> None:
        self.state = PerProcess(make, close=close)


def in_child(check) -> int:
    """``check()``'s exit status in a forked child (a value that is not 0 means it failed)."""
    child = os.fork()
    if child == 0:
        try:
            os._exit(check())
        except BaseException:  # the child must exit here, whatever failed
            os._exit(98)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def test_made_once_per_process_and_closed_when_let_go() -> None:
    state = PerProcess(make, close=close)
    assert state.peek() is None
    first = state.get()
    assert state.get() == first and state.peek() == first
    state.close()
    assert CLOSED[-1] == first and state.peek() is None
    assert state.get() != first  # made again on the next use


def test_a_forked_child_makes_its_own_and_leaves_the_parents_alone() -> None:
    state = PerProcess(make, close=close)
    parents = state.get()
    closed_before = len(CLOSED)

    def child() -> int:
        nothing = state.peek() is None and len(CLOSED) == closed_before  # forgotten, not closed
        return 0 if nothing and state.get() != parents else 1

    assert in_child(child) == 0
    assert state.get() == parents  # the parent keeps its own


def test_close_in_child_closes_the_inherited_copy() -> None:
    state = PerProcess(make, close=close, close_in_child=True)
    parents = state.get()
    assert in_child(lambda: 0 if CLOSED[-1] == parents and state.peek() is None else 1) == 0
    assert state.peek() == parents


def test_an_unpickled_holder_starts_with_nothing() -> None:
    holder = Holder()
    made = holder.state.get()
    copy = pickle.loads(pickle.dumps(holder))
    assert copy.state.peek() is None and copy.state.get() != made
    assert holder.state.peek() == made


def test_a_forked_child_unregisters_nothing_from_its_parents_event_loop(monkeypatch) -> None:
    """A child that closes a connection of its parent's event loop (as an inherited client's
    finalizer does) leaves the parent's registration in place: the parent still hears the
    socket. Without a selector of its own, the child's ``remove_reader`` would delete it from
    the epoll instance both share."""
    loop = asyncio.new_event_loop()
    ours, theirs = socket.socketpair()
    try:
        loop.add_reader(ours.fileno(), lambda: None)
        # fsspec keeps its loop as fsspec.asyn.loop[0]: stand in for it
        monkeypatch.setitem(sys.modules, "fsspec.asyn", types.SimpleNamespace(loop=[loop]))
        assert in_child(lambda: 0 if loop.remove_reader(ours.fileno()) is False else 1) == 0
        theirs.send(b"x")
        assert [key.fd for key, _ in loop._selector.select(1)] == [ours.fileno()]
    finally:
        loop.close()
        ours.close()
        theirs.close()


def test_the_loops_a_child_inherits_are_fsspecs_and_zarrs() -> None:
    """Both libraries' I/O loops, once running, are the ones a fork detaches (the clients of
    an object store run on them: s3fs on fsspec's, zarr's FsspecStore on zarr's)."""
    from fsspec.asyn import get_loop
    from zarr.core.sync import _get_loop

    assert {id(get_loop()), id(_get_loop())} <= {id(loop) for loop in inherited_event_loops()}


def test_a_forked_child_lets_go_of_its_parents_s3_clients_quietly_and_at_once(
        folder_s3: Region, tmp_path_factory: pytest.TempPathFactory, shard: Path) -> None:
    """A reader of an S3 store opened in the parent (its clients: ours, zarr's) is collected
    in a forked child, as in a DataLoader worker: nothing is reported (aiohttp's "Unclosed
    client session", seen on every worker's stderr) and no finalizer waits on the parent's
    loop (0.1 s a client), which says it is not running; the child reads with clients of its
    own, the parent reads on after."""
    bucket = f"fork-{uuid.uuid4().hex[:8]}"
    shutil.copytree(_layout_store("sharded", tmp_path_factory, shard),
                    folder_s3.root / bucket / "store.zarr")
    url = f"s3://{bucket}/store.zarr"
    options = folder_s3.storage_options(direct=True)
    parents = [SampleReader(url, storage_options=options, cache_dir="")]
    expected = parents[0][1]
    loops = inherited_event_loops()
    assert loops and all(loop.is_running() for loop in loops)

    def collect_them() -> int:
        reports: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = reports.append  # type: ignore[method-assign]
        logging.getLogger("asyncio").addHandler(handler)
        sys.stderr = io.StringIO()
        parents.clear()
        gc.collect()
        got = SampleReader(url, storage_options=options, cache_dir="")[1]  # fsspec forgets
        gc.collect()  # the parent's clients now
        if got.keys() != expected.keys():
            return 1
        if any(loop.is_running() for loop in loops):
            return 2
        return 3 if reports or sys.stderr.getvalue() else 0

    assert in_child(collect_them) == 0
    assert_same_values(parents[0][1], expected)
