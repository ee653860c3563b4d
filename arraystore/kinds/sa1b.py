"""The schema of the ``sa1b`` kind (docs/format.md, "The sa1b kind")."""

from __future__ import annotations

from arraystore.schema import Field, Schema

KIND = "sa1b"
IMAGE_SIZE = 1024
EDGE_SIZES = (256, 64, 32)
MAP_SIZES = (128, 64, 32)
MASK_SIZE = 256
EDGE_VERSION = "B_v1"
DEFAULT_MAX_BOXES = 1


def sa1b_schema(max_boxes: int = DEFAULT_MAX_BOXES) -> Schema:
    """The fields of one SA-1B sample with up to ``max_boxes`` boxes and masks."""
    if max_boxes < 1:
        raise ValueError(f"max_boxes must be >= 1, got {max_boxes}")
    k = max_boxes
    fields = [
        Field("image", (IMAGE_SIZE, IMAGE_SIZE, 3), "uint8", ("y1024", "x1024", "rgb"),
              description="RGB, resized to 1024x1024 (INTER_AREA when both sides >= 1024)"),
        Field("P4_S16", (256, 64, 64), "float32", ("c256", "y64", "x64"),
              description="SAM2 backbone_fpn[2]; zeros when feature_flag is 0"),
        Field("P5_S32", (256, 32, 32), "float32", ("c256", "y32", "x32"),
              description="SAM2 backbone_fpn[3]; zeros when feature_flag is 0"),
        Field("feature_flag", (), "uint8", (), "block", "1 where P4/P5 hold features"),
        *(Field(f"edge_{s}x{s}", (s, s), "uint8", (f"y{s}", f"x{s}"),
                description="Method B edge map") for s in EDGE_SIZES),
        Field("edge_flag", (), "uint8", (), "block", "1 when edges were computed by Method B"),
        Field("edge_version", (), "str", (), "block", f"{EDGE_VERSION!r} for Method B"),
        *(Field(f"fg_map_{s}", (s, s), "float32", (f"y{s}", f"x{s}"),
                description="union of masks, INTER_AREA") for s in MAP_SIZES),
        *(Field(f"bg_map_{s}", (s, s), "float32", (f"y{s}", f"x{s}"),
                description="1 - fg_map") for s in MAP_SIZES),
        Field("bboxes", (k, 4), "float32", ("box", "xyxy"), "block",
              "largest annotations' boxes, xyxy in 1024x1024 pixels; zero rows past num_bboxes"),
        Field("masks", (k, MASK_SIZE, MASK_SIZE), "uint8", ("box", "y256", "x256"),
              description="those annotations' masks, INTER_NEAREST"),
        Field("metadata", (5,), "int32", ("meta",), "block",
              "[num_bboxes, has_bbox, H, W, 3]"),
        Field("image_id", (), "str", (), "block", "the TAR member key"),
        Field("box_annotation_ids", (k,), "int64", ("box",), "block",
              "SA-1B annotation id of each box; -1 past num_bboxes or when unknown"),
        Field("box_areas", (k,), "float64", ("box",), "block",
              "annotation area (pixels at H x W) of each box; -1 past num_bboxes or unknown"),
    ]
    return Schema(KIND, tuple(fields))
