"""``BatchLoader``: batches from reader threads into a ring of reused buffers, no worker processes.

A torch DataLoader reads in worker processes, each batch collated into fresh shared memory and
handed to the main process; on a machine with few cores that hand-off, not the reading, is the
limit. Here reader threads (``preadv`` releases the GIL) fill batch buffers allocated once and
reused round-robin -- FFCV's model -- so a batch costs one copy of its bytes, out of the page
cache into its slot, and nothing else. Buffers are page-locked with ``pin_memory`` for fast
copies to a GPU.

The reuse contract: a batch's tensors are views of a ring buffer, valid until ``prefetch + 1``
more batches have been drawn; then that buffer is filled again. Keep a batch longer (or hold
on to its tensors across steps) with ``copy=True``, which hands out owned tensors. Batches
equal a DataLoader's with ``collate_distill`` (or ``default_collate`` for
:class:`~arraystore.loaders.StoreItems`) over the same index sequence.

Across epochs a loader keeps what it made, as a DataLoader's ``persistent_workers`` do: its
ring (``2 * prefetch + 1`` batches of memory, held until the loader is collected), its reader
threads and each thread's copy of the dataset (made again, with the ring, only when the
dataset pickles differently). Made anew each epoch, as they once were, the ring was
allocated again and each new copy of the dataset opened every shard and read every chunk as
a first read (``preadv``, crc32c): 1378 against 1681 items/s kept, interleaved epochs of 192
SA-1B items in batches of 8 on 2 threads (and a spread of ±66% over
``benchmarks.batches`` rounds). Buffers are reused in turn across epochs too, so the reuse
contract runs on from one epoch into the next. Two iterations at once over one loader each
get their own ring.

Resuming (torchdata's ``Stateful`` protocol): ``state_dict()`` counts the batches the caller has
received, not those read ahead; after ``load_state_dict`` the next iteration yields the rest of
that epoch. With one of arraystore's samplers the sampler resumes (any world size); otherwise
the loader draws and skips the consumed batches' indices (nothing is read), so a sampler of
your own must give the same order again. ``shuffle=True`` shuffles with ``seed + epoch`` (a
random ``seed`` when none is given), the epoch counting the loader's completed iterations.
"""

from __future__ import annotations

import functools
import pickle
import threading
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import torch
from torch.utils.data import BatchSampler, RandomSampler, Sampler, SequentialSampler

from arraystore.errors import OptionError
from arraystore.loaders.batched import Batched, allocate
from arraystore.loaders.samplers import ResumableSampler
from arraystore.per_process import PerProcess


class BatchLoader:
    """``for batch in BatchLoader(dataset, batch_size, ...)``: see the module docstring.

    ``dataset``: a :class:`~arraystore.loaders.ZarrDistillDataset` or
    :class:`~arraystore.loaders.StoreItems` (any store kind): anything with ``batch_slots()`` and
    ``fill_batch(indices, buffers)``. ``sampler`` or ``shuffle`` (with ``seed``) choose the index
    sequence, as in a DataLoader.
    """

    def __init__(self, dataset: Any, batch_size: int, *, sampler: Sampler | Iterable[int] |
                 None = None, shuffle: bool = False, drop_last: bool = False, threads: int = 2,
                 prefetch: int = 2, pin_memory: bool = False, copy: bool = False,
                 seed: int | None = None) -> None:
        if not hasattr(dataset, "fill_batch") or not hasattr(dataset, "batch_slots"):
            raise TypeError(f"BatchLoader reads stores: {type(dataset).__name__} has no "
                            f"fill_batch/batch_slots (use ZarrDistillDataset or StoreItems, or "
                            f"a torch DataLoader)")
        if sampler is not None and shuffle:
            raise ValueError("give a sampler or shuffle=True, not both")
        if batch_size < 1 or threads < 1 or prefetch < 1:
            raise ValueError("batch_size, threads and prefetch must be >= 1")
        if pin_memory and not torch.cuda.is_available():
            warnings.warn("pin_memory=True but no CUDA device: batches are not pinned",
                          stacklevel=2)
            pin_memory = False
        self._generator = torch.Generator() if sampler is None and shuffle else None
        self.seed = None if self._generator is None else \
            int(torch.randint(2**62, ()).item()) if seed is None else int(seed)
        if sampler is None:
            sampler = RandomSampler(dataset, generator=self._generator) if shuffle \
                else SequentialSampler(dataset)
        self.sampler = sampler
        self.epoch = 0  # completed iterations
        self._received = 0  # batches of this iteration handed to the caller
        self._skip: int | None = None  # set by load_state_dict for the next iteration
        # where arraystore's sampler stood in the epoch when this iteration began (a resumed
        # sampler counts its stage from there), and where a loaded state puts it
        self._from = self._loaded_from = 0
        self.dataset = dataset
        self.batch_size = batch_size
        self.batch_sampler = BatchSampler(sampler, batch_size, drop_last)
        self.threads, self.prefetch = threads, prefetch
        self.pin_memory, self.copy = pin_memory, copy
        # kept across epochs (see the module docstring): the ring with the number of the next
        # batch to fill and the dataset's generation it was made for, the reader threads (a
        # forked child makes its own), the pickled dataset the threads' copies were made
        # from, and those copies
        self._ring: tuple[list[dict[str, torch.Tensor]], int, int] | None = None
        self._pool = PerProcess(functools.partial(ThreadPoolExecutor, threads,
                                                  thread_name_prefix="BatchLoader"),
                                close=functools.partial(ThreadPoolExecutor.shutdown,
                                                        cancel_futures=True))
        self._blueprint, self._generation = b"", 0
        self._own = threading.local()

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def state_dict(self) -> dict[str, Any]:
        """The epoch and the batches of it the caller received (and the sampler's state at
        that point, when it is one of arraystore's)."""
        resumable = isinstance(self.sampler, ResumableSampler)
        return {"epoch": self.epoch, "batches": self._received, "seed": self.seed,
                "sampler": self.sampler.state_dict(
                    position=self._from + self._received * self.batch_size)
                if resumable else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next iteration yield the rest of ``state``'s epoch."""
        if state["seed"] != self.seed:
            raise OptionError(f"the saved BatchLoader state has seed={state['seed']}, this "
                              f"loader {self.seed}: resume with the same shuffle and seed= "
                              f"(a loader given no seed draws one)")
        self.epoch = int(state["epoch"])
        if state["sampler"] is not None and isinstance(self.sampler, ResumableSampler):
            self.sampler.load_state_dict(state["sampler"])
            self._skip, self._loaded_from = 0, self.sampler.position
        else:
            self._skip = int(state["batches"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        blueprint = pickle.dumps(self.dataset)
        if blueprint != self._blueprint:  # a changed dataset: each thread copies it again,
            self._blueprint, self._generation = blueprint, self._generation + 1
            self._ring = None  # into a ring made for it
        ring, number = self._take_ring()
        generation, own = self._generation, self._own

        def read(indices: Sequence[int], slot: int) -> Batched:
            # each thread reads through its own copy: no shared handles
            if getattr(own, "generation", None) != generation:
                own.dataset, own.generation = pickle.loads(blueprint), generation
            return own.dataset.fill_batch(indices, ring[slot % len(ring)])

        if self._generator is not None:
            self._generator.manual_seed(self.seed + self.epoch)
        batches = iter(self.batch_sampler)
        skip, self._skip = self._skip or 0, None
        self._from, self._loaded_from = self._loaded_from, 0
        for _ in range(skip):  # drawn, not read
            next(batches, None)
        self._received = skip
        pending: deque[Future] = deque()
        pool = self._pool.get()
        try:
            for _ in range(self.prefetch):
                indices = next(batches, None)
                if indices is None:
                    break
                pending.append(pool.submit(read, indices, number))
                number += 1
            while pending:
                batch = pending.popleft().result().batch
                indices = next(batches, None)
                if indices is not None:
                    pending.append(pool.submit(read, indices, number))
                    number += 1
                self._received += 1
                yield _owned(batch) if self.copy else batch
            self.epoch, self._received = self.epoch + 1, 0
        finally:
            for future in pending:
                future.cancel()
            wait(pending)  # nothing still fills a buffer of the ring once it is handed back
            self._give_back(ring, number, generation)

    def _take_ring(self) -> tuple[list[dict[str, torch.Tensor]], int]:
        """The loader's ring and the number of the next batch to fill (buffers are used in
        turn across epochs); a new ring while another iteration holds it."""
        kept, self._ring = self._ring, None
        if kept is not None:
            return kept[:2]
        slots = self.dataset.batch_slots()
        return [allocate(self.dataset.reader, slots, self.batch_size, pin=self.pin_memory,
                         shared=False) for _ in range(2 * self.prefetch + 1)], 0

    def _give_back(self, ring: list[dict[str, torch.Tensor]], number: int,
                   generation: int) -> None:
        """Keep ``ring`` for the next iteration, unless one is kept or the dataset changed
        since it was made."""
        if self._ring is None and generation == self._generation:
            self._ring = (ring, number, generation)


def _owned(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
