"""A window of one sample: a box of ``[start, stop)`` ranges over the per-sample dimensions.

Region reads (``SampleReader.read_region``) take a tuple of slices as NumPy would; this module
turns it into explicit bounds once, so every backend reads the same window and a bad window is
refused with one message instead of being clipped silently, as NumPy slicing would.
"""

from __future__ import annotations

from collections.abc import Sequence

Region = tuple[slice, ...]


def normalize_region(region: Sequence[slice], shape: tuple[int, ...], what: str) -> Region:
    """``region`` as one ``slice(start, stop)`` per dimension of ``shape`` (missing trailing
    dimensions are taken whole). Steps other than 1, empty or out-of-bounds ranges raise
    :class:`ValueError` naming ``what``."""
    region = tuple(region)
    if len(region) > len(shape):
        raise ValueError(f"{what}: a region of {len(region)} slices for a per-sample shape "
                         f"{shape}")
    bounds = []
    for axis, size in enumerate(shape):
        part = region[axis] if axis < len(region) else slice(None)
        if not isinstance(part, slice) or part.step not in (None, 1):
            raise ValueError(f"{what}: region axis {axis} must be a slice with step 1, got "
                             f"{part!r}")
        start = 0 if part.start is None else int(part.start)
        stop = size if part.stop is None else int(part.stop)
        if not 0 <= start < stop <= size:
            raise ValueError(f"{what}: region axis {axis} is [{start}, {stop}), outside the "
                             f"sample's extent [0, {size}) or empty")
        bounds.append(slice(start, stop))
    return tuple(bounds)


def region_shape(region: Region) -> tuple[int, ...]:
    return tuple(part.stop - part.start for part in region)
