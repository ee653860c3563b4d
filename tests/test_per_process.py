"""Per-process state (arraystore.per_process): made on first use in each process, forgotten (or
closed) in a forked child by the one fork hook, made anew where its holder is unpickled."""

from __future__ import annotations

import itertools
import os
import pickle

from arraystore.per_process import PerProcess

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
