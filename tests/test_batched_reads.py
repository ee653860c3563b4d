"""Batched and grouped reads return exactly the per-item values: an item's fields read together
(from S3: concurrently), ``__getitems__`` straight into one buffer, in DataLoader workers under
fork, spawn and forkserver, on every layout and backend (and from S3)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BACKENDS

from arraystore import SampleReader
from arraystore.errors import StoreFormatError
from arraystore.loaders import ZarrDistillDataset, collate_distill
from arraystore.loaders.batched import Batched, allocate_arrays
from arraystore.machine import available_cores
from tests.conftest import assert_same_values


@pytest.mark.parametrize("backend", BACKENDS)
def test_getitems_equals_per_item_reads_and_collate(located_store, backend: str) -> None:
    layout, path = located_store
    dataset = ZarrDistillDataset(path, backend=backend)
    indices = [4, 0, 2, 2, 3]
    batched = dataset.__getitems__(indices)
    expected = collate_distill([dataset[i] for i in indices])
    assert_same_values(collate_distill(batched), expected, f"{layout}/{backend}")
    for item, index in zip(batched, indices, strict=True):  # any collate_fn sees real items
        assert_same_values(collate_distill([item]), collate_distill([dataset[index]]),
                             f"{layout}/{backend} item {index}")


def test_item_reads_equal_field_by_field_reads(located_store) -> None:
    layout, path = located_store
    reader = SampleReader(path)
    for index in range(len(reader)):
        together = reader.read(index)
        for name, value in together.items():
            alone = reader.read_field(name, reader.position(index))
            np.testing.assert_array_equal(value, alone, err_msg=f"{layout}: {name}")


def test_a_subset_of_keys_batches_too(layout_store) -> None:
    _, path = layout_store
    keys = ("image", "edge_map", "num_bboxes", "image_id")
    dataset = ZarrDistillDataset(path, keys=keys)
    batch = collate_distill(dataset.__getitems__([1, 3]))
    assert_same_values(batch, collate_distill([dataset[1], dataset[3]]), "subset")
    assert batch["image_id"] == [dataset.sample_ids[1], dataset.sample_ids[3]]
    only_stacked = ZarrDistillDataset(path, keys=("teacher_features",))
    assert isinstance(only_stacked.__getitems__([0]), Batched)


LOADER_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from torch.utils.data import DataLoader
    from arraystore.loaders import ZarrDistillDataset, collate_distill

    path, *contexts = sys.argv[1:]
    dataset = ZarrDistillDataset(path)
    for context in contexts:
        loader = DataLoader(dataset, batch_size=2, num_workers=2,
                            multiprocessing_context=context, collate_fn=collate_distill)
        got = list(loader)  # workers call __getitems__; the reference is read after, here
        for start, batch in zip(range(0, len(dataset), 2), got, strict=True):
            expected = collate_distill([dataset[i] for i in range(start, min(start + 2,
                                                                               len(dataset)))])
            assert list(batch) == list(expected), context
            for key, value in expected.items():
                same = (torch.equal(batch[key], value) if isinstance(value, torch.Tensor) else
                        all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                            for a, b in zip(batch[key], value, strict=True)))
                assert same, (context, key)
        print(context, len(got))
""")


@pytest.mark.parametrize("layout_store", ["raw", "sharded+zstd+crc32c"], indirect=True)
def test_getitems_in_dataloader_workers(layout_store) -> None:
    """Under fork, spawn and forkserver in turn, in a fresh interpreter, as a training script
    runs (TensorStore, used by this pytest process elsewhere, forbids a later fork); the
    reference items are read in that parent after each DataLoader's workers have read."""
    _, path = layout_store
    contexts = ("fork", "spawn", "forkserver")  # fork first: before the parent has read
    result = subprocess.run([sys.executable, "-c", LOADER_SCRIPT, str(path), *contexts],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [f"{c} 3" for c in contexts]


def test_split_by_size_balances_bytes_and_skips_small_items() -> None:
    from arraystore.readers.halves import MIN_SPLIT_BYTES, split_by_size

    sizes = [4 << 20, 3 << 20, 1 << 20, 64, 16, 1 << 20]
    split = split_by_size(sizes)
    if available_cores() < 2:
        assert split is None  # one core: in turn
        return
    assert split is not None and sorted(split[0] + split[1]) == list(range(len(sizes)))
    totals = [sum(sizes[i] for i in group) for group in split]
    assert abs(totals[0] - totals[1]) <= max(sizes)  # greedy: within the largest field
    assert split_by_size([MIN_SPLIT_BYTES // 4] * 3) is None  # too small to pay
    assert split_by_size([8 << 20]) is None  # one field: nothing to share


FORKED_HALVES = textwrap.dedent("""
    import multiprocessing as mp
    import sys
    import numpy as np
    from arraystore import SampleReader

    reader = SampleReader(sys.argv[1], backend="direct")

    def check(indices):
        for index in indices:
            item = reader.read(index)
            for name, value in item.items():
                alone = reader.read_field(name, reader.position(index))
                assert np.array_equal(value, alone), name
        return len(indices)

    check([0])
    splits = reader._open.get().backends["direct"]._splits.values()
    assert any(s is not None for s in splits), "the halves were not used"
    with mp.get_context("fork").Pool(2) as pool:  # the children start their own helper
        print(sum(pool.map(check, [[1, 2], [3, 4]])) + 1)
""")


@pytest.mark.skipif(available_cores() < 2, reason="halves need two cores")
@pytest.mark.parametrize("layout_store", ["raw", "sharded+crc32c"], indirect=True)
def test_halves_read_the_same_before_and_after_fork(layout_store) -> None:
    """An item read in two halves (this process's helper thread) equals its fields read one
    by one, and forked children, where the parent's thread does not exist, read the same."""
    _, path = layout_store
    result = subprocess.run([sys.executable, "-c", FORKED_HALVES, str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "5"


def test_a_failure_in_the_helper_half_reaches_the_caller(tmp_path, shard) -> None:
    from arraystore import Layout, ingest
    from arraystore.converters.sa1b.source import Sa1bTarSource

    path = tmp_path / "s.zarr"
    ingest(Sa1bTarSource(), [shard], path, layout=Layout("raw"), progress=False)
    reader = SampleReader(path, backend="direct")
    reader.read(0)
    split = next(iter(reader._open.get().backends["direct"]._splits.values()))
    if split is None:
        pytest.skip("one core: no helper half")
    names = [n for n in reader.fields if reader.schema[n].chunking == "sample"]
    helper_field = names[split[0][0]]  # the heavier half: the helper thread's
    chunk = next((path / helper_field / "c" / "1").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.write_bytes(b"\0" * 10)
    with pytest.raises(StoreFormatError, match=helper_field):
        reader.read(1)


def _mapping_of(address: int) -> tuple[str, list[str]]:
    """The ``/proc/self/smaps`` range holding ``address`` and its ``VmFlags``."""
    found = ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, stop = (int(part, 16) for part in head.split("-"))
            found = head if start <= address < stop else ""
        elif line.startswith("VmFlags:") and found:
            return found, line.split()[1:]
    return "", []


@pytest.mark.skipif(not os.path.isdir("/sys/kernel/mm/transparent_hugepage"),
                    reason="a Linux kernel with transparent huge pages")
def test_main_process_batches_are_advised_huge_pages_and_unmapped_when_dropped() -> None:
    buffers = allocate_arrays({"a": ((3, 1000, 1000), torch.float32), "b": ((3, 7), torch.uint8)})
    assert buffers["a"].shape == (3, 1000, 1000) and buffers["b"].shape == (3, 7)
    mapping, flags = _mapping_of(buffers["a"].data_ptr())
    assert mapping and "hg" in flags  # MADV_HUGEPAGE: first writes fault 2 MiB at a time
    assert _mapping_of(buffers["b"].data_ptr())[0] == mapping  # one allocation for the batch
    view = buffers["b"][1]
    del buffers
    gc.collect()
    view.fill_(9)  # a view alone keeps the memory
    assert view.tolist() == [9] * 7 and _mapping_of(view.data_ptr())[0] == mapping
    del view
    gc.collect()
    assert _mapping_of(int(mapping.split("-")[0], 16))[0] != mapping
    assert allocate_arrays({"none": ((0, 5), torch.float32)})["none"].shape == (0, 5)


def test_importing_the_packages_changes_nothing_of_torch() -> None:
    """``default_collate`` learns this project's pre-batched items only in a process that
    builds such a batch; importing the packages leaves torch's collate map as it was."""
    code = ("from torch.utils.data._utils.collate import default_collate_fn_map as m\n"
            "before = dict(m)\n"
            "import arraystore, arraystore.loaders, arraystore.loaders.batched\n"
            "import arraystore.loaders.spike_clips, arraystore.loaders.mixture\n"
            "assert dict(m) == before, set(m) - set(before)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
