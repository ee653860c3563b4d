"""The busy condition of the benchmarks: another process keeping one core busy, as a training
job's own work (the model step, a logger, a neighbour) does beside its data loading; and for
DataLoader rows, a training step of :data:`STEP_SECONDS` of compute in the main process between
batches.

``conditions()`` yields ``"idle"`` then ``"busy"``: the same measurement runs in both, and each
report shows both columns. The busy loop is a plain Python ``while True`` in its own process,
started before and stopped after each busy measurement.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

CONDITIONS = ("idle", "busy")
STEP_SECONDS = 0.005  # the busy condition's training step between DataLoader batches
SPIN = "while True:\n    pass\n"


@contextmanager
def busy_core() -> Iterator[subprocess.Popen]:
    """A process spinning on one core for the duration of the block."""
    spinner = subprocess.Popen([sys.executable, "-c", SPIN])
    time.sleep(0.2)  # it is running before the measurement starts
    try:
        yield spinner
    finally:
        spinner.kill()
        spinner.wait()


@contextmanager
def condition(name: str) -> Iterator[None]:
    """Run the block ``idle`` or with one core ``busy``."""
    if name not in CONDITIONS:
        raise ValueError(f"condition {name!r}: one of {CONDITIONS}")
    if name == "idle":
        yield
        return
    with busy_core():
        yield


def training_step(seconds: float) -> None:
    """Keep the main process's core busy for ``seconds``, as a training step does between
    batches (the busy condition's DataLoader rows)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
