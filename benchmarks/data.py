"""Generate SA-1B-shaped benchmark data: TAR shards of large JPEGs, many overlapping masks and
compressed feature NPZs, as the old pipeline stored them. SA-1B has about 100 masks an image,
most of them small: ``small_fraction`` of the masks are blobs of 4 to 64 pixels' radius, the
rest the generator's large ellipses and polygons."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from arraystore import Store
from arraystore.testing.sa1b_shards import ShardSample, random_masks, write_shard

# SA-1B images are about 1500 x 2250; some are portrait, a few smaller than 1024
SIZES = ((1500, 2250), (2250, 1500), (1200, 1800), (768, 1024))


def small_masks(rng: np.random.Generator, height: int, width: int,
                count: int) -> list[np.ndarray]:
    """``count`` filled ellipses of 4 to 64 pixels' radius, anywhere in the image."""
    masks = []
    for _ in range(count):
        mask = np.zeros((height, width), np.uint8)
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(4, 65)), int(rng.integers(4, 65)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        masks.append(mask)
    return masks


def sa1b_like(num_samples: int, masks_per_image: int, seed: int = 0,
              small_fraction: float = 0.0) -> Iterator[ShardSample]:
    rng = np.random.default_rng(seed)
    for i in range(num_samples):
        h, w = SIZES[i % len(SIZES)]
        small = rng.integers(0, 256, (h // 32, w // 32, 3), np.uint8)
        rgb = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        rgb = cv2.add(rgb, rng.integers(0, 24, (h, w, 3), np.uint8))  # texture, like a photo
        features = (rng.standard_normal((256, 64, 64), np.float32),
                    rng.standard_normal((256, 32, 32), np.float32))
        count = round(small_fraction * masks_per_image)
        masks = random_masks(rng, h, w, masks_per_image - count) + small_masks(rng, h, w, count)
        yield ShardSample(f"sa_{i}", rgb, masks, features)


def write_sa1b_shard(path: Path, num_samples: int, masks_per_image: int = 24,
                     seed: int = 0) -> Path:
    return write_shard(path, sa1b_like(num_samples, masks_per_image, seed))


def fill_store(store: Store, columns: dict[str, np.ndarray]) -> Store:
    """Write whole arrays of a new store in one go (``sample`` and ``committed`` included):
    for benchmarks of what is read of a big store, without ingesting it sample by sample."""
    for name, values in columns.items():
        array = store.array(name)
        array.resize((len(values), *array.shape[1:]))
        array[:] = values
    return store
