"""DataLoader settings as the spike-camera training configured them, resolved for this machine.

``total_workers``: ``"auto"`` (0.8 x the CPU cores), ``"cpu*F"`` (F x the cores) or an int, split
across ``gpus`` processes. Prefetch 4 batches per worker for training, 2 for validation
(``TRAIN_PREFETCH_FACTOR`` / ``VAL_PREFETCH_FACTOR``); pinned memory where CUDA is; persistent
workers. Workers get one intra-op thread each (they are already one per core).
TensorStore aborts a ``fork()`` in any process that has used it, so when it is loaded here the
workers start with ``forkserver`` instead of ``fork``.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch

from arraystore.machine import available_cores

AUTO_FRACTION = 0.8
TRAIN_PREFETCH, VAL_PREFETCH = 4, 2
T = TypeVar("T")
_CPU_FRACTION = re.compile(r"^cpu\s*\*\s*([0-9]*\.?[0-9]+)$")


def resolve_workers(total_workers: str | int = "auto", cpus: int | None = None) -> int:
    """The number of worker processes ``total_workers`` stands for on ``cpus`` cores."""
    cpus = cpus or available_cores()
    if isinstance(total_workers, bool):
        raise TypeError("total_workers must be 'auto', 'cpu*F' or an int, not a bool")
    if isinstance(total_workers, int):
        if total_workers < 0:
            raise ValueError(f"total_workers must be >= 0, got {total_workers}")
        return total_workers
    if total_workers == "auto":
        return max(1, int(AUTO_FRACTION * cpus))
    match = _CPU_FRACTION.match(str(total_workers).strip())
    if not match:
        raise ValueError(f"total_workers {total_workers!r}: expected 'auto', 'cpu*F' (e.g. "
                         f"'cpu*0.9') or an int")
    return max(1, int(float(match.group(1)) * cpus))


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def dataloader_kwargs(
    total_workers: str | int = "auto",
    gpus: int = 1,
    prefetch_factor: int | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool = True,
    cpus: int | None = None,
    train: bool = True,
) -> dict[str, Any]:
    """Keyword arguments for ``torch.utils.data.DataLoader`` (per GPU process).

    ``prefetch_factor`` defaults to 4 for a training loader and 2 for a validation one
    (``train=False``); ``pin_memory`` to whether CUDA is available.
    """
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if prefetch_factor is None:
        prefetch_factor = TRAIN_PREFETCH if train else VAL_PREFETCH
    workers = resolve_workers(total_workers, cpus) // gpus
    kwargs: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": torch.cuda.is_available() if pin_memory is None else pin_memory,
    }
    if workers > 0:
        kwargs.update(
            prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers,
            worker_init_fn=_one_thread,
        )
        if "tensorstore" in sys.modules:
            kwargs["multiprocessing_context"] = "forkserver"
    return kwargs


def timed(loader: Iterable[T]) -> Iterator[tuple[T, float]]:
    """``(batch, data_time)`` for each batch of ``loader``: the seconds the training loop waited
    for that batch (the ``data_time`` a training log reports per step, as the old loader did).
    Time the loop spends between batches (the training step) is not counted."""
    iterator = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield batch, time.perf_counter() - start
