"""The batch buffers DataLoader workers reuse (``arraystore.loaders.shared_ring``): a batch crosses
as a reference into its segment and comes back as the same tensors; a segment is reused only once
the main process let go of every tensor of its batch, so a batch kept by the training loop is
never overwritten; without the ring (no memfd) a batch goes into fresh shared memory."""

from __future__ import annotations

import copy
import gc
import os
import pickle
import subprocess
import sys
import textwrap
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch

from arraystore.loaders import ZarrDistillDataset, collate_distill, shared_ring
from arraystore.loaders.batched import allocate
from tests.conftest import assert_same_values


@pytest.fixture(autouse=True)
def own_ring() -> None:
    """Each test starts with an empty ring and no kept mappings of its own."""
    shared_ring._ring.close()
    shared_ring._kept.close()


def ring_batch(nbytes: int = 4096, fill: int = 7) -> dict:
    """A batch of views of one ring buffer, as a collate builds it in a worker."""
    buffer = shared_ring.worker_buffer(nbytes)
    floats = buffer[:1024].view(torch.float32).view(16, 16)
    floats.copy_(torch.arange(256, dtype=torch.float32).view(16, 16) * fill)
    image = buffer[1024:1024 + 2 * 3 * 4 * 5].view(2, 4, 5, 3).permute(0, 3, 1, 2)
    image.copy_(torch.full((2, 3, 4, 5), fill, dtype=torch.uint8))
    return shared_ring.shippable({"features": floats, "image": image, "ids": ["a", "b"],
                                  "masks": [floats[0], torch.ones(3)], "count": 2})


def sent(batch: dict) -> dict:
    """``batch`` through the pickler of a DataLoader's result queue, as the main process gets
    it."""
    return pickle.loads(ForkingPickler.dumps(batch))


def test_a_batch_crosses_as_references_and_comes_back_equal() -> None:
    batch = ring_batch()
    assert isinstance(batch, shared_ring.RingBatch)
    expected = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    received = sent(batch)
    assert type(received) is dict and list(received) == list(batch)
    for key in ("features", "image"):
        assert torch.equal(received[key], expected[key]), key
        assert received[key].stride() == batch[key].stride(), key
    assert torch.equal(received["masks"][0], batch["masks"][0])
    assert torch.equal(received["masks"][1], torch.ones(3))
    assert received["ids"] == ["a", "b"] and received["count"] == 2


def test_a_ring_tensor_nested_among_plain_values_is_found_and_plain_lists_pass() -> None:
    """The segment is found from a tensor deep in lists and tuples after strings and numbers;
    lists of plain values (captions) cross unchanged."""
    buffer = shared_ring.worker_buffer(4096)
    deep = buffer[:64].view(torch.float32).view(4, 4)
    deep.copy_(torch.arange(16, dtype=torch.float32).view(4, 4))
    batch = shared_ring.shippable({"captions": ["a cat", "", "ünïcode"],
                                   "meta": ("x", 3, None, [1.5, [b"raw", deep]])})
    assert isinstance(batch, shared_ring.RingBatch) and len(batch.segments) == 1
    _, (_, _, shipped) = shared_ring.ship(batch)
    assert isinstance(shipped["meta"][3][1][1], shared_ring._Ref)
    received = sent(batch)
    assert received["captions"] == ["a cat", "", "ünïcode"]
    assert received["meta"][:3] == ("x", 3, None) and received["meta"][3][:1] == [1.5]
    assert received["meta"][3][1][0] == b"raw"
    assert torch.equal(received["meta"][3][1][1], torch.arange(16.0).view(4, 4))


@pytest.mark.parametrize("layout_store", ["sharded+crc32c"], indirect=True)
def test_an_sa1b_batch_crosses_with_its_boxes_masks_in_its_segment(layout_store) -> None:
    """The boxes' masks, listed per item (as many as each sample has), are views of the
    batch's segment, not pickled into the queue; what arrives equals the items collated."""
    _, path = layout_store
    dataset = ZarrDistillDataset(path)
    indices = list(range(len(dataset)))
    buffers = allocate(dataset.reader, dataset.batch_slots(), len(indices), shared=True)
    batch = collate_distill(dataset.fill_batch(indices, buffers))
    assert isinstance(batch, shared_ring.RingBatch) and len(batch.segments) == 1
    counts = [len(m) for m in batch["box_prompts_masks_orig"]]
    assert len(set(counts)) > 1, counts  # samples with different numbers of boxes
    _, (_, _, shipped) = shared_ring.ship(batch)
    assert all(type(m) is shared_ring._Ref for m in shipped["box_prompts_masks_orig"])
    expected = collate_distill([dataset[i] for i in indices])
    assert_same_values(sent(batch), expected, "sent")


def test_small_tensors_outside_the_ring_cross_by_value() -> None:
    """Counts and per-sample boxes a collate makes outside the ring ride inside the pickle
    (no shared-memory file and descriptor each); large ones are left to torch."""
    large = torch.zeros(shared_ring.INLINE_BYTES // 4 + 1)
    counts, flags = torch.tensor([3, 1], dtype=torch.int64), torch.tensor([True, False])
    boxes = torch.arange(12, dtype=torch.float32).view(3, 4).t()  # a non-contiguous view
    batch = ring_batch()
    lazy = torch.tensor([1 + 2j]).conj()  # a conjugate view: resolved, then by value
    batch.update({"counts": counts, "flags": flags, "boxes": [boxes], "large": large,
                  "lazy": lazy})
    _, (_, _, shipped) = shared_ring.ship(batch)
    assert isinstance(shipped["counts"], shared_ring._Inline)
    assert isinstance(shipped["boxes"][0], shared_ring._Inline)
    assert isinstance(shipped["large"], torch.Tensor)
    assert isinstance(shipped["lazy"], shared_ring._Inline)
    received = sent(batch)
    for got, given in ((received["counts"], counts), (received["flags"], flags),
                       (received["boxes"][0], boxes), (received["large"], large),
                       (received["lazy"], lazy)):
        assert got.dtype == given.dtype and torch.equal(got, given)


def test_a_segment_is_reused_only_after_both_sides_let_go() -> None:
    batch = ring_batch(fill=1)
    segment = batch.segments[0]
    received = sent(batch)
    del batch
    gc.collect()
    assert not segment.free()  # the "main process" still holds its batch
    other = ring_batch(fill=2)  # so the next batch goes elsewhere
    assert other.segments[0] is not segment
    assert torch.equal(received["features"],
                       torch.arange(256, dtype=torch.float32).view(16, 16))
    del received
    gc.collect()
    assert segment.free()
    again = ring_batch(fill=3)
    assert again.segments[0] is segment  # released on both sides: reused


def test_a_replaced_or_vanished_segment_is_a_clear_error() -> None:
    batch = ring_batch()
    message = ForkingPickler.dumps(batch)
    batch.segments[0].map[shared_ring.TOKEN] = bytes(16)
    with pytest.raises(RuntimeError, match="replaced before its batch was received"):
        pickle.loads(message)
    _, (_, segments, shipped) = shared_ring.ship(batch)
    with pytest.raises(RuntimeError, match="cannot map the batch buffer"):
        shared_ring._rebuild(2**22 + 1, segments, shipped)  # above any pid_max: no process


def mappings_of(segment: shared_ring.Segment) -> int:
    """How many times this process maps the segment's file."""
    inode = str(os.fstat(segment.fd).st_ino)
    with open("/proc/self/maps") as maps:
        return sum(line.split()[4] == inode for line in maps)


def test_the_main_process_keeps_a_segment_mapped_between_its_batches() -> None:
    first = ring_batch(fill=1)
    segment = first.segments[0]
    received = sent(first)
    address = received["features"].untyped_storage().data_ptr()
    del first, received
    gc.collect()
    assert mappings_of(segment) == 2  # the worker's own, and the main process's, kept
    second = ring_batch(fill=2)
    assert second.segments[0] is segment
    again = sent(second)
    assert again["features"].untyped_storage().data_ptr() == address  # not mapped anew
    assert mappings_of(segment) == 2
    assert torch.equal(again["features"],
                       torch.arange(256, dtype=torch.float32).view(16, 16) * 2)
    del second, again
    gc.collect()
    assert segment.free()  # kept mapped, yet released to the worker


def test_kept_mappings_of_segments_their_worker_dropped_are_let_go() -> None:
    """A segment the worker closed (or whose worker exited) is forgotten by the next batch of
    a new segment: the main process would otherwise hold its memory."""
    batch = ring_batch()
    dropped = batch.segments[0]
    sent(batch)
    del batch
    gc.collect()
    kept = shared_ring._kept.get().kept
    dropped_key = next(iter(kept))
    inode = str(os.fstat(dropped.fd).st_ino)
    shared_ring._ring.get().segments.remove(dropped)
    dropped.close()
    replacement = ring_batch()  # the same descriptor number, another segment
    assert replacement.segments[0].fd == dropped.fd
    sent(replacement)
    assert dropped_key not in kept
    with open("/proc/self/maps") as maps:
        assert not [line for line in maps if line.split()[4] == inode]  # its memory is gone
    assert [key[2] for key in kept] == [replacement.segments[0].token]


def test_a_forked_child_does_not_inherit_the_kept_mappings() -> None:
    """Workers forked for a new epoch would otherwise hold the memory of the last epoch's
    segments for their whole life."""
    batch = ring_batch()
    segment = batch.segments[0]
    held = sent(ring_batch(nbytes=8192))  # a batch still in use
    sent(batch)
    del batch
    gc.collect()
    assert mappings_of(segment) == 2  # the worker side's and the kept one
    child = os.fork()
    if child == 0:  # the child's count as its exit status; its held batch intact (NumPy:
        # torch's thread pool is not for a forked child)
        intact = (held["features"].numpy().ravel() == np.arange(256) * 7).all()
        os._exit(mappings_of(segment) if intact else 99)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 1  # the worker side's own mapping only
    assert mappings_of(segment) == 2


def test_kept_mappings_are_bounded(monkeypatch) -> None:
    monkeypatch.setattr(shared_ring, "KEPT_MAPPINGS", 2)
    held = [ring_batch(nbytes=4096 * (n + 1)) for n in range(3)]  # three segments, all busy
    for batch in held:
        sent(batch)
    kept = shared_ring._kept.get().kept
    assert [key[2] for key in kept] == [b.segments[0].token for b in held[1:]]


def test_without_memfd_batches_go_into_fresh_shared_memory(monkeypatch) -> None:
    monkeypatch.setattr(shared_ring, "SUPPORTED", False)
    with pytest.warns(RuntimeWarning, match="memfd_create or /proc/self/fd is missing"):
        buffer = shared_ring.worker_buffer(256)
    assert buffer.is_shared()
    batch = {"x": buffer[:16]}
    assert shared_ring.shippable(batch) is batch


# a DataLoader script's start: a dataset whose batches say how many segments their worker has
COUNTING_SEGMENTS = textwrap.dedent("""
    import sys
    import torch
    from torch.utils.data import DataLoader
    from arraystore.loaders import ZarrDistillDataset, collate_distill, shared_ring

    class CountingSegments(ZarrDistillDataset):
        def __getitems__(self, indices):
            batched = super().__getitems__(indices)
            batched.batch["segments"] = len(shared_ring._ring.get().segments)
            return batched
""")

FALLBACK_SCRIPT = COUNTING_SEGMENTS + textwrap.dedent("""

    def hidden_main_process(worker):  # as if /proc hid the main process from its workers
        shared_ring.PROCESS_FDS = "/nonexistent/{pid}/fd"

    dataset = CountingSegments(sys.argv[1])
    loader = DataLoader(dataset, batch_size=2, num_workers=2, multiprocessing_context="fork",
                        collate_fn=collate_distill, worker_init_fn=hidden_main_process)
    expected = collate_distill([dataset[i] for i in range(len(dataset))])
    for epoch in range(2):
        for number, batch in enumerate(loader):
            assert batch["segments"] == 0
            rows = slice(2 * number, 2 * number + 2)
            for key in ("image", "teacher_features", "edge_map"):
                assert torch.equal(batch[key], expected[key][rows]), (number, key)
    print("ok")
""")


@pytest.mark.parametrize("layout_store", ["sharded"], indirect=True)
def test_workers_whose_buffers_the_main_process_cannot_map_fall_back(layout_store) -> None:
    """Where the main process could not open a worker's segments, each worker says so once and
    ships its batches in torch's own shared memory: the same values, no exception."""
    _, path = layout_store
    result = subprocess.run([sys.executable, "-W", "always::RuntimeWarning", "-c",
                             FALLBACK_SCRIPT, str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
    warned = [line for line in result.stderr.splitlines() if "/nonexistent/" in line]
    assert len(warned) == 4, result.stderr  # one warning a worker, each epoch's two workers
    assert all("torch's shared memory" in line for line in warned)


HOLDING_SCRIPT = COUNTING_SEGMENTS + textwrap.dedent("""

    path, context, hold = sys.argv[1], sys.argv[2], sys.argv[3] == "hold"
    dataset = CountingSegments(path)
    loader = DataLoader(dataset, batch_size=1, num_workers=1, multiprocessing_context=context,
                        collate_fn=collate_distill, persistent_workers=True, prefetch_factor=2)
    expected = [collate_distill([dataset[i]]) for i in range(len(dataset))]
    held, most = [], 0
    for epoch in range(4):
        for index, batch in enumerate(loader):
            most = max(most, batch["segments"])
            if hold:
                held.append((index, batch))
            else:
                assert torch.equal(batch["image"], expected[index]["image"]), index
    for index, batch in held:  # every kept batch still holds its own values
        for key in ("image", "teacher_features", "edge_256x256", "edge_map"):
            assert torch.equal(batch[key], expected[index][key]), (index, key)
    print(most)
""")


@pytest.mark.parametrize("layout_store", ["sharded"], indirect=True)
@pytest.mark.parametrize("hold", ["hold", "release"])
def test_dataloader_batches_reuse_segments_and_kept_batches_stay_intact(
        layout_store, hold: str) -> None:
    """20 batches from one worker: released as the loop goes on, a few segments serve them
    all; all kept, the ring fills up (then fresh shared memory) and none is overwritten."""
    _, path = layout_store
    result = subprocess.run([sys.executable, "-c", HOLDING_SCRIPT, str(path), "fork", hold],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    most = int(result.stdout.strip())
    if hold == "hold":
        assert most == shared_ring.MAX_SEGMENTS
    else:
        assert 1 <= most <= 4


def test_copies_in_the_worker_do_not_go_through_the_main_process_path() -> None:
    batch = ring_batch(fill=4)
    shallow = copy.copy(batch)
    assert isinstance(shallow, shared_ring.RingBatch) and shallow["image"] is batch["image"]
    deep = copy.deepcopy(batch)
    assert type(deep) is dict and torch.equal(deep["features"], batch["features"])
    assert deep["features"].untyped_storage().data_ptr() != batch.segments[0].data_ptr
    assert batch.segments[0].map[0] == 0  # not marked as sent


def test_any_other_pickle_is_a_plain_self_contained_dict() -> None:
    """Only the DataLoader's queue ships a batch by reference: ``pickle`` (or ``torch.save``)
    in a worker gets ordinary tensors, holds no segment, and reads back anywhere."""
    batch = ring_batch(fill=5)
    message = pickle.dumps(batch)
    assert batch.segments[0].map[0] == 0  # not marked as sent
    expected = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    batch.segments[0].map[shared_ring.TOKEN] = bytes(16)  # the segment gone, in effect
    received = pickle.loads(message)
    assert type(received) is dict and received["ids"] == ["a", "b"]
    for key, value in expected.items():
        assert torch.equal(received[key], value), key
        assert received[key].untyped_storage().data_ptr() != batch.segments[0].data_ptr


EPOCHS_SCRIPT = textwrap.dedent("""
    import sys
    from torch.utils.data import DataLoader
    from arraystore.loaders import ZarrDistillDataset, collate_distill

    def mapped_segments():
        with open("/proc/self/maps") as maps:
            return sum("arraystore-batch" in line for line in maps)

    loader = DataLoader(ZarrDistillDataset(sys.argv[1]), batch_size=1, num_workers=1,
                        multiprocessing_context="fork", collate_fn=collate_distill,
                        persistent_workers=False, prefetch_factor=2)
    counts = []
    for epoch in range(5):
        for batch in loader:
            del batch
        counts.append(mapped_segments())
    print(*counts)
""")


@pytest.mark.parametrize("layout_store", ["sharded"], indirect=True)
def test_segments_of_exited_workers_are_not_kept_mapped(layout_store) -> None:
    """Workers started anew every epoch: the main process keeps the segments of the current
    worker only (each epoch's first batch lets go of the last epoch's), not one set per epoch
    (without letting go: 10 or more after 5 epochs)."""
    _, path = layout_store
    result = subprocess.run([sys.executable, "-c", EPOCHS_SCRIPT, str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = [int(n) for n in result.stdout.split()]
    assert min(counts) >= 1 and max(counts) <= 4, counts  # one worker's few segments
