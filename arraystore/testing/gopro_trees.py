"""Write GoPro spike folder trees (``ROOT/<split>/<SEQ>/{blur,sharp,spike}/``) of generated
frames: for the tests and the benchmark, the inverse of the ``gopro`` source.

Each frame's spike stream follows the sharp image's brightness: a spike pixel fires in a frame
with probability equal to the brightness (0..1) of the image region it covers. A window of the
voxels therefore looks like the same window of the image, which is how tests check that image
and spike crops are aligned.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np


def smooth_picture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random RGB picture with bright and dark areas, about 8 across its short side."""
    cells = max(2, round(8 * max(height, width) / min(height, width)))
    shape = (8, cells) if height <= width else (cells, 8)
    coarse = rng.integers(0, 256, (*shape, 3), np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def spikes_for(rgb: np.ndarray, spike_shape: tuple[int, int, int],
               rng: np.random.Generator) -> np.ndarray:
    """``(frames, h, w)`` uint8 0/1 spikes firing with the brightness of ``rgb`` as probability."""
    frames, h, w = spike_shape
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    brightness = cv2.resize(gray, (w, h), interpolation=cv2.INTER_AREA)
    return (rng.random((frames, h, w), np.float32) < brightness).astype(np.uint8)


def write_frame(folder: Path, stem: str, sharp: np.ndarray, spike: np.ndarray,
                image_format: str = "png") -> None:
    """One frame: ``blur/<stem>.<fmt>`` (the sharp image blurred), ``sharp/<stem>.<fmt>``,
    ``spike/<stem>.dat`` (raw bytes)."""
    for role in ("blur", "sharp", "spike"):
        (folder / role).mkdir(parents=True, exist_ok=True)
    blur = cv2.blur(sharp, (9, 9))
    for role, image in (("blur", blur), ("sharp", sharp)):
        path = folder / role / f"{stem}.{image_format}"
        if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {path}")
    (folder / "spike" / f"{stem}.dat").write_bytes(np.ascontiguousarray(spike).tobytes())


def write_gopro_tree(
    root: Path,
    sequences: Mapping[str, Mapping[str, int]],
    image_shape: tuple[int, int] = (720, 1280),
    spike_shape: tuple[int, int, int] = (10, 396, 640),
    seed: int = 0,
    image_format: str = "png",
    texture: int = 0,
) -> Path:
    """``sequences``: split -> sequence name -> frame count; stems are ``000000``, ``000001``...
    ``texture`` adds pixel noise up to that value, so PNGs are as large as photographs'."""
    rng = np.random.default_rng(seed)
    for split, names in sequences.items():
        for name, count in names.items():
            for n in range(count):
                sharp = smooth_picture(rng, *image_shape)
                if texture:
                    sharp = cv2.add(sharp, rng.integers(0, texture, sharp.shape, np.uint8))
                write_frame(Path(root) / split / name, f"{n:06d}", sharp,
                            spikes_for(sharp, spike_shape, rng), image_format)
    return Path(root)
