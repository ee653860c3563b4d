"""A model on the CPU reuses the memory its last batch freed (``arraystore.allocator``).

Measured by the process's minor page faults (``getrusage``): memory glibc handed back to the
kernel faults again when it is next used; memory kept does not. Each case runs in a new
interpreter: whether a block faults also depends on what a process allocated and freed before
(a test process whose heap holds enough freed memory serves a block from it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from arraystore import SampleReader, ingest
from arraystore.allocator import _glibc, keeping_freed_memory
from arraystore.converters.npz.source import NpzDirectorySource
from arraystore.stages import ModelStage
from arraystore.testing.npz_examples import write_sav_pairs

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc's allocator only")
SCRATCH = 64 << 20  # above the largest block glibc ever keeps on its own (32 MiB)
LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
LIBC.malloc.restype = ctypes.c_void_p


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def faults_of_scratch() -> int:
    """Page faults of filling and freeing a scratch buffer with the C library, as torch
    allocates a model's activations (NumPy would ask the kernel for huge pages)."""
    before = faults()
    scratch = LIBC.malloc(SCRATCH)
    ctypes.memset(scratch, 1, SCRATCH)
    LIBC.free(ctypes.c_void_p(scratch))
    return faults() - before


def few_faults() -> int:
    """At most this many faults means the block was reused: a tenth of what filling it
    afresh costs (glibc maps and unmaps a block this big by default), room left for a page
    or two that other allocations of the process touch on the way."""
    faults_of_scratch()
    return faults_of_scratch() // 10


UNTUNED = {k: v for k, v in os.environ.items()  # Dask leaves MALLOC_TRIM_THRESHOLD_ here
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}


def in_a_new_process(case: str, *args: str) -> None:
    """Run the function ``case`` of this module in a new interpreter; fail with its error."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import test_allocator as t; t.{case}(*sys.argv[1:])")
    done = subprocess.run([sys.executable, "-c", code, *args], env=UNTUNED,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_freed_memory_is_kept_within_and_returned_after() -> None:
    in_a_new_process("kept_within_and_returned_after")


def test_nested_and_concurrent_uses_reset_once_the_last_leaves() -> None:
    in_a_new_process("reset_once_the_last_leaves")


def test_inactive_does_nothing() -> None:
    in_a_new_process("inactive_does_nothing")


def test_an_ingest_with_a_cpu_model_reuses_its_batches_memory(tmp_path) -> None:
    in_a_new_process("an_ingest_reuses_its_batches_memory", str(tmp_path))


def kept_within_and_returned_after() -> None:
    few = few_faults()
    with keeping_freed_memory():
        faults_of_scratch()  # the first one grows the heap
        assert all(faults_of_scratch() <= few for _ in range(3))
    faults_of_scratch()
    assert faults_of_scratch() > few  # left: given back to the kernel again


def reset_once_the_last_leaves() -> None:
    entered, leave = threading.Event(), threading.Event()

    def other() -> None:
        with keeping_freed_memory():
            entered.set()
            leave.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    entered.wait(10)
    with keeping_freed_memory(), keeping_freed_memory():
        pass
    faults_of_scratch()
    kept = faults_of_scratch()  # the other thread is still inside
    leave.set()
    thread.join()
    assert kept < few_faults()  # reset: the block faults afresh again


def inactive_does_nothing() -> None:
    with keeping_freed_memory(active=False):
        faults_of_scratch()
        assert faults_of_scratch() > 0


def test_an_allocator_its_user_tuned_is_left_alone() -> None:
    check = "from arraystore.allocator import _glibc; print(_glibc() is None)"
    for name, value in (("MALLOC_MMAP_THRESHOLD_", "1048576"),
                        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1"), ("LANG", "C")):
        out = subprocess.run([sys.executable, "-c", check], env={**UNTUNED, name: value},
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == str(name != "LANG"), name


def test_a_variable_set_after_start_tuned_nothing(monkeypatch) -> None:
    """Dask sets ``MALLOC_TRIM_THRESHOLD_`` in a running process for the workers it spawns."""
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    _glibc.cache_clear()
    assert _glibc() is not None


class ScratchModel:
    """A model on the CPU: its output is its input, and each batch fills and frees a buffer as
    big as a SigLIP batch's activations; it records the page faults of each batch."""

    batch_size = 2

    def __init__(self) -> None:
        self.faults: list[int] = []

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        self.faults.append(faults_of_scratch())
        return inputs

    def describe(self) -> dict[str, Any]:
        return {"model": "scratch"}


class NpzWithCpuModel(NpzDirectorySource):
    """The NPZ converter with a model stage on the CPU over its ``mask1`` field."""

    def __init__(self, model: ScratchModel) -> None:
        super().__init__()
        self.model = model

    def stage_device(self) -> str | None:
        return "cpu"

    def batch_stage(self) -> ModelStage:
        return ModelStage(self.model, "mask1", ("mask1",), name="scratch")


def an_ingest_reuses_its_batches_memory(folder: str) -> None:
    tmp_path = Path(folder)
    write_sav_pairs(tmp_path / "in", count=20, size=64)
    model = ScratchModel()
    few = few_faults()
    report = ingest(NpzWithCpuModel(model), [tmp_path / "in"], tmp_path / "s.zarr", workers=1)
    assert report.ingested == 20 and len(model.faults) == 10
    # after the first, a batch reuses the memory of the one before; now and then the samples
    # decoded in between take a piece of it, and that piece faults again
    assert statistics.median(model.faults[1:]) <= few, (model.faults, few)
    reader = SampleReader(tmp_path / "s.zarr")
    assert reader.read(0)["mask1"].shape == (64, 64)
    assert few_faults() > few // 2  # after: the process's own policy again
