"""DataLoader settings as SEEDS.md 003 configured them, resolved for this machine.

``total_workers``: ``"auto"`` (0.8 x the CPU cores), ``"cpu*F"`` (F x the cores) or an int, split
across ``gpus`` processes. Workers get one intra-op thread each (they are already one per core).
TensorStore aborts a ``fork()`` in any process that has used it, so when it is loaded here the
workers start with ``forkserver`` instead of ``fork``.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import torch

AUTO_FRACTION = 0.8
_CPU_FRACTION = re.compile(r"^cpu\s*\*\s*([0-9]*\.?[0-9]+)$")


def resolve_workers(total_workers: str | int = "auto", cpus: int | None = None) -> int:
    """The number of worker processes ``total_workers`` stands for on ``cpus`` cores."""
    cpus = cpus or os.cpu_count() or 1
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
    prefetch_factor: int = 4,
    pin_memory: bool | None = None,
    persistent_workers: bool = True,
    cpus: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``torch.utils.data.DataLoader`` (per GPU process)."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
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
