"""The schema of the ``mask_embeddings`` kind: one row per segment, every field chunked in
blocks of rows (small, read in bulk)."""

from __future__ import annotations

from arraystore.schema import Field, Schema

KIND = "mask_embeddings"


def embeddings_schema(width: int) -> Schema:
    """Rows of ``width``-wide float16 embeddings with the segment's ids, category and boxes."""
    return Schema(KIND, (
        Field("embedding", (width,), "float16", (f"d{width}",), "block",
              "L2-normalised image embedding of the segment's crop"),
        Field("image_id", (), "int64", (), "block", "COCO image id"),
        Field("segment_id", (), "int64", (), "block", "panoptic segment id (R + 256 G + 256^2 B)"),
        Field("category_id", (), "int32", (), "block", "COCO category; -1 when unknown"),
        Field("area", (), "int64", (), "block", "pixels of the segment's mask; -1 when unknown"),
        Field("bbox", (4,), "float32", ("xywh",), "block", "the JSON's bbox, x y w h"),
        Field("crop_box", (4,), "int32", ("x0y0x1y1",), "block",
              "the padded crop: x0 y0 x1 y1, exclusive ends; -1 when unknown"),
    ))
