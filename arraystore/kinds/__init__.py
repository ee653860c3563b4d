"""The contract of each dataset kind, in one place: its schema, field names, constants and the
NumPy-only helpers that writing and reading must agree on.

Converters (which write a kind) and loaders (which read it) both import from here; neither
re-declares a kind's name, fields or layout, and nothing here imports torch, a converter or a
loader (docs/architecture.md).

- :mod:`.sa1b`: the SA-1B distillation sample (docs/format.md defines every field).
- :mod:`.sa1b_bin`: the fixed-stride ``.bin`` layout the same samples had before (docs/formats.md).
- :mod:`.gopro_spike`: GoPro frames with their spike stream, and spike voxels.
- :mod:`.mask_embeddings`: one row per COCO panoptic segment with its image embedding.
"""
