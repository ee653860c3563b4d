"""Spike-camera voxels (docs/formats.md): ``frames`` binary spike frames summed into ``bins`` bins.

Bin ``b`` is the sum of the frames ``[b * frames / bins, (b + 1) * frames / bins)``: with 10
frames and 5 bins, each bin sums 2 consecutive frames. The sums are exact integers in
``uint16`` (at most ``frames / bins * 255``, far below 65535 for any spike stream); the Dataset
turns them into float32. NumPy only: the ``gopro`` converter (which precomputes them) and
``SpikeClipDataset`` (which computes them in real time) share this one definition, so the two
modes cannot disagree.
"""

from __future__ import annotations

import numpy as np

VOXEL_DTYPE = np.uint16


def check_bins(frames: int, bins: int) -> None:
    """Refuse a bin count that does not split ``frames`` into equal bins."""
    if bins < 1 or frames % bins:
        divisors = [d for d in range(1, frames + 1) if frames % d == 0]
        raise ValueError(f"bins={bins} does not divide the {frames} spike frames into equal "
                         f"bins; choose one of {divisors}")


def spike_to_voxel(spike: np.ndarray, bins: int) -> np.ndarray:
    """``(frames, *rest)`` uint8 spikes -> ``(bins, *rest)`` uint16 sums of consecutive frames."""
    frames = spike.shape[0]
    check_bins(frames, bins)
    grouped = spike.reshape(bins, frames // bins, *spike.shape[1:])
    voxels = grouped[:, 0].astype(VOXEL_DTYPE)
    for k in range(1, frames // bins):  # elementwise adds: several times faster than .sum(axis=1)
        voxels += grouped[:, k]
    return voxels
