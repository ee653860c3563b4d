"""Where a reader's time goes: cProfile's own-time per function, as shares of the total.

The report uses it to say *why* a target is missed: how much of an item's read is copying its
bytes (out of the page cache with ``preadv``, out of mapped shards with torch's ``copy_``) and
how much is everything around it. NumPy's ``copyto`` cannot be told apart: its C work counts in
its caller's own time. cProfile sees only the calling thread: a helper thread's reads
(:mod:`arraystore.readers.halves`) are not in the profile.
"""

from __future__ import annotations

import cProfile
import pstats
from collections.abc import Callable
from pathlib import Path

COPY_CALLS = ("preadv", "pread", "copy_")


def _label(filename: str, line: int, name: str) -> str:
    if filename == "~":  # a built-in
        return name.strip("<>").removeprefix("built-in method ").removeprefix("method ")
    return f"{Path(filename).name}:{line} {name}"


def time_shares(run: Callable[[], object], top: int = 6) -> list[tuple[str, float]]:
    """The ``top`` functions by own time while ``run()`` runs under cProfile, with their share
    of the total, largest first."""
    profiler = cProfile.Profile()
    profiler.runcall(run)
    entries = [(_label(*func), own) for func, (_, _, own, _, _) in
               pstats.Stats(profiler).stats.items()]
    total = sum(own for _, own in entries) or 1.0
    entries.sort(key=lambda entry: entry[1], reverse=True)
    return [(label, own / total) for label, own in entries[:top]]


def _call_name(label: str) -> str:
    """A built-in's bare name: ``posix.preadv`` -> ``preadv``, ``'copy_' of 'torch._C.Tensor
    Base' objects`` -> ``copy_``."""
    return label.split("'")[1] if label.startswith("'") else label.rsplit(".", 1)[-1]


def copy_share(shares: list[tuple[str, float]]) -> float:
    """The share of the profiled time spent copying an item's bytes (:data:`COPY_CALLS`)."""
    return sum(share for label, share in shares if _call_name(label) in COPY_CALLS)
