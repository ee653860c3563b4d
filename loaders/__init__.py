"""torch Datasets over arraystore stores that return exactly the dicts existing training code
expects (docs/formats.md), plus the reference reader of the raw ``.bin`` format.

Names are imported when first used: ``arraystore.loaders.samplers`` and the mixture's parts load
without the Datasets they do not need.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ZarrDistillDataset": "arraystore.loaders.zarr_dataset",
    "BatchLoader": "arraystore.loaders.batch_loader",
    "ReadAhead": "arraystore.loaders.read_ahead",
    "BinaryDistillDataset": "arraystore.loaders.binary_dataset",
    "DISTILL_FIELDS": "arraystore.loaders.distill_item",
    "ALL_KEYS": "arraystore.loaders.distill_item",
    "dataloader_kwargs": "arraystore.loaders.dataloader",
    "distill_item": "arraystore.loaders.distill_item",
    "collate_distill": "arraystore.loaders.distill_item",
    "SpikeClipDataset": "arraystore.loaders.spike_clips",
    "NoValidSamplesError": "arraystore.loaders.spike_clips",
    "spike_to_voxel": "arraystore.kinds.gopro_spike",
    "timed": "arraystore.loaders.dataloader",
    "Mixture": "arraystore.loaders.mixture",
    "MixSource": "arraystore.loaders.mixture",
    "StoreItems": "arraystore.loaders.mixture",
    "packed_default_collate": "arraystore.loaders.packed_collate",
    "EmbeddingTable": "arraystore.loaders.embedding_table",
    "MaskEmbeddingDataset": "arraystore.loaders.embedding_table",
    "LengthGroupedSampler": "arraystore.loaders.samplers",
    "WeightedSourceSampler": "arraystore.loaders.samplers",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'arraystore.loaders' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
