"""Train-style reading of three stores at once (docs/formats.md): SA-1B from the bundled sample,
SAV-style frame pairs and referring data with captions (generated NPZs), plus an OpenImages
source that is not on disk; RefCOCO repeated 4 times, batches grouped by modality_length.

Usage: python scripts/mix_demo.py [WORKDIR]   (default: demo/mix)
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch.utils.data import DataLoader

from arraystore import ingest
from arraystore.converters.npz.source import NpzDirectorySource
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.loaders import LengthGroupedSampler, MixSource, Mixture, ZarrDistillDataset
from arraystore.testing.npz_examples import write_referring, write_sav_pairs

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "sa1b_sample.tar"


def build(root: Path) -> None:
    """The three stores (workers=1: no decode processes for these few samples)."""
    ingest(Sa1bTarSource(), [SAMPLE], root / "sa1b.zarr", workers=1)
    ingest(NpzDirectorySource(), [write_sav_pairs(root / "sav_npz", 12)], root / "sav.zarr",
           workers=1)
    ingest(NpzDirectorySource(), [write_referring(root / "refcoco_npz", 10, seed=1)],
           root / "refcoco.zarr", workers=1)


def main(root: Path) -> None:
    build(root)
    mix = Mixture([
        MixSource(root / "sav.zarr", dataset_type="sav", modality_length=2 * 256),
        MixSource(ZarrDistillDataset(root / "sa1b.zarr"), dataset_type="sa1b",
                  modality_length=1024),
        MixSource(root / "refcoco.zarr", dataset_type="refcoco", repeats=4),
        MixSource(root / "openimages.zarr", dataset_type="openimages", required=False),
    ])
    print(f"mixture: {len(mix)} items from {mix.dataset_types}; missing: {mix.missing}")
    sampler = LengthGroupedSampler(mix, per_device_batch_size=4, world_size=1, rank=0, seed=42)
    loader = DataLoader(mix, batch_size=4, sampler=sampler, collate_fn=mix.collate,
                        num_workers=2)
    for step, batch in enumerate(loader):
        groups = batch if "dataset_type" not in batch else {batch["dataset_type"][0]: batch}
        shown = ", ".join(f"{name} x{len(sub['dataset_type'])} lengths "
                          f"{sub['modality_length'].tolist()}" for name, sub in groups.items())
        print(f"  batch {step}: {shown}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("demo/mix"))
