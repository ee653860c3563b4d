"""Generate SA-1B-shaped benchmark data: TAR shards of large JPEGs, many overlapping masks and
compressed feature NPZs, as the old pipeline stored them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from converters.sa1b.shard_writer import ShardSample, random_masks, write_shard

# SA-1B images are about 1500 x 2250; some are portrait, a few smaller than 1024
SIZES = ((1500, 2250), (2250, 1500), (1200, 1800), (768, 1024))


def sa1b_like(num_samples: int, masks_per_image: int, seed: int = 0) -> Iterator[ShardSample]:
    rng = np.random.default_rng(seed)
    for i in range(num_samples):
        h, w = SIZES[i % len(SIZES)]
        small = rng.integers(0, 256, (h // 32, w // 32, 3), np.uint8)
        rgb = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        rgb = cv2.add(rgb, rng.integers(0, 24, (h, w, 3), np.uint8))  # texture, like a photo
        features = (rng.standard_normal((256, 64, 64), np.float32),
                    rng.standard_normal((256, 32, 32), np.float32))
        yield ShardSample(f"sa_{i}", rgb, random_masks(rng, h, w, masks_per_image), features)


def write_sa1b_shard(path: Path, num_samples: int, masks_per_image: int = 24,
                     seed: int = 0) -> Path:
    return write_shard(path, sa1b_like(num_samples, masks_per_image, seed))
