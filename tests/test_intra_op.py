"""Items in memory copied on torch's intra-op threads (:mod:`arraystore.readers.intra_op`):
the same values on every layout and backend, only on the thread reading a whole item, never on
reader threads, and torch takes mapped pages as a copy's source without warning."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from arraystore import SampleReader
from arraystore.machine import available_cores
from arraystore.readers import intra_op
from arraystore.readers.intra_op import copies_in_parallel, parallel_copies, writable_view
from loaders import BatchLoader, ZarrDistillDataset, collate_distill
from tests.conftest import BACKENDS, assert_same_values

IN_MEMORY_LAYOUTS = ("sharded", "sharded+crc32c")  # uncompressed shards: mapped reads


def recording_copies(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """(thread name, copied on torch's threads?) of every :func:`intra_op.copy` (the real
    copy still runs)."""
    calls: list[tuple[str, bool]] = []
    real = intra_op.copy

    def copy(dst: np.ndarray, src: np.ndarray) -> None:
        calls.append((threading.current_thread().name, copies_in_parallel()))
        real(dst, src)

    monkeypatch.setattr(intra_op, "copy", copy)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_items_read_again_equal_their_first_read(layout_store, backend: str, torch_threads: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every item read three times equals zarr-python's read; from the second read on, the
    direct backend copies a sharded item's mapped chunks on torch's threads where it has two,
    on the calling thread, and nowhere else."""
    layout, path = layout_store
    reference = SampleReader(path, backend="zarr")
    reader = SampleReader(path, backend=backend)
    calls = recording_copies(monkeypatch)
    later: list[tuple[str, bool]] = []
    for attempt in range(3):
        calls.clear()
        for i in range(len(reader)):
            assert_same_values(reader.read(i), reference.read(i), f"{layout}, sample {i}")
        if attempt:
            later.extend(calls)
    in_memory = layout in IN_MEMORY_LAYOUTS and backend in ("auto", "direct")
    if in_memory and torch_threads > 1 and available_cores() > 1:
        assert later and all(parallel for _, parallel in later)
        assert {name for name, _ in later} == {threading.current_thread().name}
    else:
        assert not any(parallel for _, parallel in later)
        assert bool(later) == in_memory  # mapped chunks copied by NumPy, in halves


def test_items_in_memory_build_the_same_dicts(layout_store, torch_threads: int) -> None:
    layout, path = layout_store
    dataset = ZarrDistillDataset(path)
    first = [dataset[i] for i in range(len(dataset))]
    for i in range(len(dataset)):
        assert_same_values(dataset[i], first[i], f"{layout}, item {i}")


def test_batch_loader_threads_never_copy_on_torch_threads(
        monkeypatch: pytest.MonkeyPatch, layout_store) -> None:
    """Reader threads keep NumPy's copies: each would bring its own OpenMP team."""
    layout, path = layout_store
    if layout not in IN_MEMORY_LAYOUTS:
        pytest.skip("only mapped shards copy out of memory")
    dataset = ZarrDistillDataset(path)
    calls = recording_copies(monkeypatch)
    order = list(range(len(dataset))) * 4  # each thread reads samples again: out of memory
    got = list(BatchLoader(dataset, 2, sampler=order, threads=2, copy=True))
    expected = [collate_distill([dataset[i] for i in order[k:k + 2]])
                for k in range(0, len(order), 2)]
    theirs = [parallel for name, parallel in calls if name.startswith("BatchLoader")]
    assert theirs and not any(theirs)
    for batch, want in zip(got, expected, strict=True):
        assert_same_values(batch, want)


def test_parallel_copies_are_this_threads_alone_and_end_with_the_block() -> None:
    seen: list[bool] = []
    with parallel_copies():
        assert copies_in_parallel()
        other = threading.Thread(target=lambda: seen.append(copies_in_parallel()))
        other.start()
        other.join()
        with parallel_copies():
            pass
        assert copies_in_parallel()  # an inner block restores the outer one's state
    assert seen == [False] and not copies_in_parallel()
    with pytest.raises(RuntimeError), parallel_copies():
        raise RuntimeError
    assert not copies_in_parallel()


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.int64])
def test_copy_is_bytewise_whichever_way(dtype, torch_threads: int) -> None:
    rng = np.random.default_rng(3)
    src = rng.integers(0, 200, (5, 300, 7)).astype(dtype)
    for parallel in (False, True):
        out = np.empty_like(src)
        if parallel:
            with parallel_copies():
                intra_op.copy(out, src)
        else:
            intra_op.copy(out, src)
        np.testing.assert_array_equal(out, src)


def test_writable_view_shares_a_read_only_mapping_and_keeps_it_alive(tmp_path: Path) -> None:
    data = np.arange(1 << 16, dtype=np.uint32)
    (tmp_path / "f").write_bytes(data.tobytes())
    with open(tmp_path / "f", "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    read_only = np.frombuffer(mapping, np.uint32)
    view = writable_view(read_only)
    assert view.flags.writeable and not read_only.flags.writeable
    assert view.ctypes.data == read_only.ctypes.data
    del read_only
    with pytest.raises(BufferError):  # the view still holds the mapping
        mapping.close()
    np.testing.assert_array_equal(view, data)
    del view
    mapping.close()


def test_torch_copies_out_of_a_mapped_shard_without_warning(tmp_path: Path) -> None:
    """torch warns once per process about non-writable arrays; a fresh interpreter with
    warnings as errors proves the mapped copy never triggers it."""
    script = f"""
import mmap, numpy as np, torch
from arraystore.readers.intra_op import copy, parallel_copies, writable_view
with open({str(tmp_path / 'f')!r}, 'rb') as f:
    source = np.frombuffer(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ), np.uint8)
out = np.empty(len(source), np.uint8)
with parallel_copies():
    copy(out, writable_view(source))
assert (out == np.arange(len(source)) % 251).all()
"""
    (tmp_path / "f").write_bytes((np.arange(1 << 20) % 251).astype(np.uint8).tobytes())
    done = subprocess.run([sys.executable, "-W", "error", "-c", script], capture_output=True,
                          text=True, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(available_cores() < 2, reason="copies in parallel need two cores")
def test_a_forked_child_reads_in_halves_instead_of_hanging(tmp_path_factory, shard) -> None:
    """GNU OpenMP does not survive fork: a child entering a parallel region after its parent
    used one hangs. The child of a parent that copied in parallel reads the same items, in
    two halves, and finishes (checked with NumPy only: torch's own parallel ops would hang)."""
    from tests.conftest import _layout_store

    reader = SampleReader(_layout_store("sharded", tmp_path_factory, shard))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(2):
            parent = [reader.read(i) for i in range(len(reader))]
        assert intra_op.torch_threads() == 2
        with pytest.MonkeyPatch.context() as patch:
            calls = recording_copies(patch)
            reader.read(0)
        assert calls and all(parallel for _, parallel in calls)
        pid = os.fork()
        if pid == 0:  # the child: exit status 0 only if every item matches
            ok = intra_op.torch_threads() == 1 and all(
                all(np.array_equal(np.asarray(reader.read(i)[name]), np.asarray(value))
                    for name, value in parent[i].items()) for i in range(len(reader)))
            os._exit(0 if ok else 1)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung reading items")
        assert os.waitstatus_to_exitcode(done[1]) == 0, "the child read other values"
    finally:
        torch.set_num_threads(before)
