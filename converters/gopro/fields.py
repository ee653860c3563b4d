"""The schema of the ``gopro_spike`` kind: one sample per frame (docs/formats.md)."""

from __future__ import annotations

from arraystore.schema import Field, Schema
from loaders.spike_voxels import check_bins

KIND = "gopro_spike"
SPIKE_FRAMES, SPIKE_HEIGHT, SPIKE_WIDTH = 10, 396, 640
DEFAULT_BINS = 5
VOXEL_MODES = ("none", "precompute")


def gopro_schema(image_shape: tuple[int, int], spike_shape: tuple[int, int, int],
                 bins: int | None = None) -> Schema:
    """Per frame: ``blur`` and ``sharp`` RGB images of ``image_shape`` (H, W), the ``spike``
    stream of ``spike_shape`` (frames, h, w), and with ``bins`` the precomputed ``spike_vox``."""
    height, width = image_shape
    frames, spike_h, spike_w = spike_shape
    image_dims = (f"y{height}", f"x{width}", "rgb")
    fields = [
        Field("blur", (height, width, 3), "uint8", image_dims,
              description="blurred RGB frame"),
        Field("sharp", (height, width, 3), "uint8", image_dims,
              description="sharp RGB frame (the target)"),
        Field("spike", spike_shape, "uint8", (f"t{frames}", f"y{spike_h}", f"x{spike_w}"),
              description="spike-camera frames of the .dat, as stored"),
    ]
    if bins is not None:
        check_bins(frames, bins)
        fields.append(Field("spike_vox", (bins, spike_h, spike_w), "uint16",
                            (f"bin{bins}", f"y{spike_h}", f"x{spike_w}"),
                            description=f"spike frames summed into {bins} bins (exact)"))
    fields += [
        Field("sequence", (), "str", (), "block", "the sequence folder's name"),
        Field("frame", (), "str", (), "block", "the frame's file stem"),
        Field("frame_index", (), "int32", (), "block",
              "position of the stem among its sequence's sorted stems (gaps where frames "
              "were left out)"),
        Field("split", (), "str", (), "block", "the split folder (train, test, ...)"),
    ]
    return Schema(KIND, tuple(fields))
