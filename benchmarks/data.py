"""Generate a ``.bin`` dataset (SEEDS.md 000's format) of random SA-1B-shaped samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from loaders.bin_format import CONFIG_FILE, KEYS_FILE, bin_files


def write_random_bin(root: Path, num_samples: int, seed: int = 0) -> Path:
    """``num_samples`` random items with valid metadata (one box each) in ``root``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for spec in bin_files(1):
        with open(root / spec.name, "wb") as handle:
            for _ in range(num_samples):
                for part in spec.parts:
                    if part.field == "metadata":
                        value = np.array([1, 1, 1500, 2250, 3], "<i4")
                    elif np.dtype(part.dtype).kind == "f":
                        value = rng.standard_normal(part.shape, np.float32)
                    else:
                        value = rng.integers(0, 256, part.shape, np.uint8)
                    handle.write(np.ascontiguousarray(value, part.dtype).tobytes())
    (root / CONFIG_FILE).write_text(json.dumps({"model_type": "sam2.1_hiera_b+",
                                                "total_samples": num_samples}))
    (root / KEYS_FILE).write_text("".join(f"sa_{i}\n" for i in range(num_samples)))
    return root
