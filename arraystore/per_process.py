"""State that belongs to one process, and the one fork hook that keeps it there.

Readers hold things a forked child must not share with its parent: file descriptors and
mappings of open shards, a helper thread (threads do not survive ``fork``), an object-store
client (its connections and event loop are the parent's), a DataLoader worker's batch buffers.
DataLoader workers are forked (or spawned, which pickles the dataset). Each such value is a
:class:`PerProcess`: made on first use in a process, forgotten in a forked child by the one
``fork`` hook registered here (the child makes its own when it first needs one), and made anew
wherever the object holding it is unpickled. The hook also gives the child its own selectors
for the event loops it inherits (:func:`arraystore.compat.detach_event_loops`).
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from arraystore.compat import detach_event_loops, inherited_event_loops

T = TypeVar("T")

_instances: weakref.WeakSet[PerProcess[Any]] = weakref.WeakSet()


class PerProcess(Generic[T]):
    """A value ``make()`` builds on first use in each process.

    ``close``: how to let go of it, when :meth:`close` is called or the holder is collected.
    ``close_in_child``: whether a forked child closes its inherited copy (mappings whose memory
    the child would otherwise keep alive) or only forgets it (descriptors, threads, clients,
    which the parent still uses and closing which in the child gains nothing).
    ``make`` and ``close`` are pickled with their holder, so they must be picklable (a
    function, class or ``functools.partial`` of one), unless the holder never is.
    """

    __slots__ = ("__weakref__", "_close", "_close_in_child", "_made", "_make", "_value")

    def __init__(self, make: Callable[[], T], close: Callable[[T], None] | None = None,
                 close_in_child: bool = False) -> None:
        self._make, self._close, self._close_in_child = make, close, close_in_child
        self._made = False
        self._value: T | None = None
        _instances.add(self)

    def get(self) -> T:
        """This process's value, made now if it has none yet."""
        if not self._made:
            self._value, self._made = self._make(), True
        return self._value  # type: ignore[return-value]

    def peek(self) -> T | None:
        """This process's value if it made one, else None (nothing is made)."""
        return self._value if self._made else None

    def close(self) -> None:
        """Let go of this process's value (the next :meth:`get` makes a new one)."""
        if self._made:
            value, self._value, self._made = self._value, None, False
            if self._close is not None:
                self._close(value)  # type: ignore[arg-type]

    def _forget_after_fork(self) -> None:
        if self._close_in_child:
            self.close()
        self._value, self._made = None, False

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit its modules may be gone
            self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return PerProcess, (self._make, self._close, self._close_in_child)


_parent_loops: list[Any] = []  # set just before a fork: see compat.detach_event_loops


def _note_loops_before_fork() -> None:
    _parent_loops[:] = inherited_event_loops()


def _forget_all_after_fork() -> None:
    detach_event_loops(_parent_loops)
    _parent_loops.clear()
    for instance in list(_instances):
        instance._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_note_loops_before_fork, after_in_child=_forget_all_after_fork,
                        after_in_parent=_parent_loops.clear)
