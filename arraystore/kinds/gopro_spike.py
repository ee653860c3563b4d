"""The ``gopro_spike`` kind: one sample per frame (docs/formats.md), and spike voxels.

Spike voxels: ``frames`` binary spike frames summed into ``bins`` bins.

Bin ``b`` is the sum of the frames ``[b * frames / bins, (b + 1) * frames / bins)``: with 10
frames and 5 bins, each bin sums 2 consecutive frames. The sums are exact integers in
``uint16`` (at most ``frames / bins * 255``, far below 65535 for any spike stream); the Dataset
turns them into float32. NumPy only: the ``gopro`` converter (which precomputes them) and
``SpikeClipDataset`` (which computes them in real time) share this one definition, so the two
modes cannot disagree.
"""

from __future__ import annotations

import numpy as np

from arraystore.schema import Field, Schema

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


VOXEL_DTYPE = np.uint16


def check_bins(frames: int, bins: int) -> None:
    """Refuse a bin count that does not split ``frames`` into equal bins."""
    if bins < 1 or frames % bins:
        divisors = [d for d in range(1, frames + 1) if frames % d == 0]
        raise ValueError(f"bins={bins} does not divide the {frames} spike frames into equal "
                         f"bins; choose one of {divisors}")


def spike_to_voxel(spike: np.ndarray, bins: int, out: np.ndarray | None = None) -> np.ndarray:
    """``(frames, *rest)`` uint8 spikes -> ``(bins, *rest)`` uint16 sums of consecutive frames.

    ``out``: the sums written into it instead (any dtype that holds them exactly, such as the
    float32 a Dataset hands out). They are summed in uint16 and converted once: NumPy's adds
    with a float32 output cast both inputs in buffers, 32 µs for a (10, 141, 128) window
    against 20 µs.
    """
    frames = spike.shape[0]
    check_bins(frames, bins)
    grouped = spike.reshape(bins, frames // bins, *spike.shape[1:])
    if out is None:
        out = np.empty(grouped[:, 0].shape, VOXEL_DTYPE)
    if frames // bins == 1:
        np.copyto(out, grouped[:, 0])
        return out
    sums = out if out.dtype == VOXEL_DTYPE else np.empty(out.shape, VOXEL_DTYPE)
    np.add(grouped[:, 0], grouped[:, 1], out=sums, dtype=VOXEL_DTYPE)
    for k in range(2, frames // bins):  # elementwise adds: several times faster than .sum(axis=1)
        sums += grouped[:, k]
    if sums is not out:
        np.copyto(out, sums)
    return out
