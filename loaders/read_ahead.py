"""Read-ahead for DataLoader workers: each batch of indices names the batch its worker reads next.

A DataLoader hands batch ``k`` to worker ``k mod W`` (its workers take turns), and a worker reads
one batch at a time: from an object store it waits for a batch's bytes, then fills and ships
it while the link idles. :class:`ReadAhead` wraps a batch sampler and attaches to batch ``k``
the indices of batch ``k + W`` (``k + 1`` without workers). The store datasets'
``__getitems__`` fetch those on a thread of their reader's own while they fill batch ``k``
(:meth:`arraystore.SampleReader.fetch_ahead`), so the next batch's request is already answered
or under way when it arrives. At most one batch is fetched ahead per process.

A wrong guess costs bytes, never values: a batch whose chunks were not fetched ahead is fetched
when it is read. Resuming is unchanged: the wrapped sampler's state is what it was (with
arraystore's samplers, ``state_dict(position=batches_done * batch_size)``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from torch.utils.data import Sampler


class BatchWithNext(list):
    """A batch's indices (a list, as a DataLoader sends them to its worker) and ``then``: the
    indices of the batch that worker reads next (empty at the end)."""

    def __init__(self, indices: Iterable[int], then: Sequence[int] = ()) -> None:
        super().__init__(indices)
        self.then = list(then)

    def __reduce__(self) -> tuple[Any, ...]:
        return BatchWithNext, (list(self), self.then)


def upcoming(indices: Sequence[int]) -> Sequence[int]:
    """The indices read after ``indices`` in this process, where its batch names them."""
    return getattr(indices, "then", ())


class ReadAhead(Sampler[list[int]]):
    """``DataLoader(dataset, batch_sampler=ReadAhead(batches, workers=W), num_workers=W)``.

    ``batches``: a batch sampler (``BatchSampler(sampler, batch_size, drop_last)``) or any
    re-iterable of index lists; ``workers``: the DataLoader's ``num_workers`` (0: batches are
    read in the loop's own process). ``set_epoch`` reaches the wrapped sampler."""

    def __init__(self, batches: Iterable[Sequence[int]], workers: int) -> None:
        if workers < 0:
            raise ValueError(f"workers must be >= 0 (the DataLoader's num_workers), got "
                             f"{workers}")
        self.batches = batches
        self.stride = max(workers, 1)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        for inner in (self.batches, getattr(self.batches, "sampler", None)):
            if hasattr(inner, "set_epoch"):
                inner.set_epoch(epoch)
                return

    def __iter__(self) -> Iterator[BatchWithNext]:
        waiting: deque[list[int]] = deque()
        for batch in self.batches:
            waiting.append(list(batch))
            if len(waiting) > self.stride:
                yield BatchWithNext(waiting.popleft(), waiting[-1])
        while waiting:
            yield BatchWithNext(waiting.popleft())
