"""Read a batch from an ``sa1b`` store the way training does, and show its xarray view.

Usage: python scripts/read_batch.py STORE
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import DataLoader

import arraystore
from arraystore.loaders import ZarrDistillDataset, collate_distill


def describe(value: object) -> str:
    """Shape and dtype of a batch entry, never its contents (a list: of what, per item)."""
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        shapes = ", ".join(str(tuple(v.shape)) for v in value)
        return f"list of {len(value)} tensors {value[0].dtype}: {shapes}"
    if isinstance(value, list) and value and isinstance(value[0], list):
        return f"list of {len(value)} lists of {[len(v) for v in value]} entries"
    return f"list of {len(value)} {type(value[0]).__name__}" if isinstance(value, list) \
        else type(value).__name__


def main(path: str) -> None:
    dataset = ZarrDistillDataset(path)
    print(f"ZarrDistillDataset: {len(dataset)} samples, backend {dataset.backend}")
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_distill)
    batch = next(iter(loader))
    for key, value in batch.items():
        print(f"  {key:24s} {describe(value)}")
    print(arraystore.open_xarray(path))


if __name__ == "__main__":
    main(sys.argv[1])
