"""Generated NPZ folders shaped like a training mixture's sources, for the mixture demo and tests:
SAV-style video frame pairs and RefCOCO-style referring samples with captions."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

WORDS = ("the", "left", "right", "dog", "man", "red", "car", "behind", "small", "white", "cup",
         "on", "table", "woman", "holding", "umbrella", "near", "window")


def _frame(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    coarse = rng.integers(0, 256, (8, 8, 3), np.uint8)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    mask = np.zeros((size, size), np.uint8)
    centre = tuple(int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
    cv2.circle(mask, centre, int(rng.integers(size // 10, size // 4)), 1, -1)
    return image, mask


def write_sav_pairs(folder: Path, count: int, size: int = 256, seed: int = 0) -> Path:
    """``count`` NPZ files of ``image1, mask1, image2, mask2`` (two frames of one video)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        (image1, mask1), (image2, mask2) = _frame(rng, size), _frame(rng, size)
        np.savez(folder / f"sav_{n:05d}.npz", image1=image1, mask1=mask1, image2=image2,
                 mask2=mask2)
    return folder


def write_referring(folder: Path, count: int, size: int = 256, seed: int = 0) -> Path:
    """``count`` NPZ files of ``image, mask, caption`` and ``modality_length``: the caption's
    token count, which a length-grouped sampler batches by."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        image, mask = _frame(rng, size)
        caption = " ".join(rng.choice(WORDS, int(rng.integers(2, 25))))
        np.savez(folder / f"ref_{n:05d}.npz", image=image, mask=mask, caption=np.str_(caption),
                 modality_length=np.int64(len(caption.split())))
    return folder
