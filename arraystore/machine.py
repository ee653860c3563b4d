"""What this process may use of the machine: the defaults of worker counts are chosen from it."""

from __future__ import annotations

import os


def available_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (what a job scheduler or
    ``taskset`` granted), or every core where the OS has no such mask."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
