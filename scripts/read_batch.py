"""Read a batch from an ``sa1b`` store the way training does, and show its xarray view.

Usage: python scripts/read_batch.py STORE
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import DataLoader

import arraystore
from loaders import ZarrDistillDataset, collate_distill


def main(path: str) -> None:
    dataset = ZarrDistillDataset(path)
    print(f"ZarrDistillDataset: {len(dataset)} samples, backend {dataset.backend}")
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_distill)
    batch = next(iter(loader))
    for key, value in batch.items():
        shown = (f"tensor {tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor)
                 else f"list of {len(value)}: {value[:2]}...")
        print(f"  {key:24s} {shown}")
    print(arraystore.open_xarray(path))


if __name__ == "__main__":
    main(sys.argv[1])
