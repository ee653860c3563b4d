"""torch Datasets over arraystore stores that return exactly the dicts existing training code
expects (docs/formats.md), plus the reference reader of the raw ``.bin`` format.

Names are imported lazily so that ``loaders.bin_format`` (NumPy only) can be used without
importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ZarrDistillDataset": "loaders.zarr_dataset",
    "BatchLoader": "loaders.batch_loader",
    "BinaryDistillDataset": "loaders.binary_dataset",
    "DISTILL_FIELDS": "loaders.distill_item",
    "ALL_KEYS": "loaders.distill_item",
    "dataloader_kwargs": "loaders.dataloader",
    "distill_item": "loaders.distill_item",
    "collate_distill": "loaders.distill_item",
    "SpikeClipDataset": "loaders.spike_clips",
    "NoValidSamplesError": "loaders.spike_clips",
    "spike_to_voxel": "loaders.spike_voxels",
    "timed": "loaders.dataloader",
    "Mixture": "loaders.mixture",
    "MixSource": "loaders.mixture",
    "StoreItems": "loaders.mixture",
    "packed_default_collate": "loaders.packed_collate",
    "EmbeddingTable": "loaders.embedding_table",
    "MaskEmbeddingDataset": "loaders.embedding_table",
    "LengthGroupedSampler": "loaders.samplers",
    "WeightedSourceSampler": "loaders.samplers",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loaders' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
