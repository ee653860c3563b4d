"""Where a reader's time goes: cProfile's own-time per function, as shares of the total.

The report uses it to say *why* a target is missed: how much of an item's read is the copy out of
the page cache (``preadv``) and how much is everything around it.
"""

from __future__ import annotations

import cProfile
import pstats
from collections.abc import Callable
from pathlib import Path

COPY_CALLS = ("preadv", "pread")


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


def copy_share(shares: list[tuple[str, float]]) -> float:
    """The share of the profiled time spent in ``pread``/``preadv`` (the page-cache copy)."""
    return sum(share for label, share in shares if label.rsplit(".", 1)[-1] in COPY_CALLS)
