"""Build the bundled sample shard ``samples/sa1b_sample.tar`` from photographs scikit-image ships.

Six public-domain images: one larger than 1024 on both sides (retina, 1411x1411), the rest
smaller; real pycocotools RLE annotations in the SA-1B JSON schema with overlapping masks; one
image with no annotations (chelsea); one sample with a features NPZ (smooth, compressible P4/P5).
Seeded: re-running gives the same annotations. Usage: python scripts/make_sample_shard.py [OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from skimage import data

from arraystore.testing.sa1b_shards import ShardSample, random_masks, write_shard

IMAGES = {  # key -> (loader, number of annotations)
    "sa_1": (data.astronaut, 5),
    "sa_2": (data.coffee, 4),
    "sa_3": (data.chelsea, 0),
    "sa_4": (data.rocket, 3),
    "sa_5": (data.retina, 6),
    "sa_6": (data.hubble_deep_field, 4),
}


def smooth_features(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """P4/P5-shaped float32 maps, one gentle ramp per channel: small once compressed."""
    def level(size: int) -> np.ndarray:
        ramp = np.linspace(-1, 1, size, dtype=np.float32)
        scale = rng.normal(size=(256, 1, 1)).astype(np.float32)
        return (scale * (ramp[None, :, None] + ramp[None, None, :])).astype(np.float32)
    return level(64), level(32)


def main(out: Path) -> None:
    rng = np.random.default_rng(2024)
    samples = []
    for key, (load, count) in IMAGES.items():
        rgb = np.ascontiguousarray(load()[..., :3])
        h, w = rgb.shape[:2]
        features = smooth_features(rng) if key == "sa_1" else None
        samples.append(ShardSample(key, rgb, random_masks(rng, h, w, count), features))
    write_shard(out, samples)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(samples)} samples)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("samples/sa1b_sample.tar"))
