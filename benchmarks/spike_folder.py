"""The seed's own loading path (docs/formats.md), reimplemented as the benchmark's baseline: per
item, read each frame's ``.dat`` and decode its two PNGs from the folder tree, voxelise with
NumPy, then crop. Same clips, same crops and same item dict as ``SpikeClipDataset``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from arraystore.converters.gopro.source import natural_key
from arraystore.loaders.spike_clips import crop_windows


class FolderClipDataset(Dataset):
    """Clips of ``clip_len`` consecutive frames of each sequence folder of ``root/split``."""

    def __init__(self, root: Path, split: str, clip_len: int, crop_size: int, bins: int,
                 spike_shape: tuple[int, int, int], seed: int = 0) -> None:
        self.clip_len, self.crop, self.bins, self.seed = clip_len, crop_size, bins, seed
        self.spike_shape = spike_shape
        self.clips: list[tuple[Path, list[str]]] = []
        for folder in sorted((Path(root) / split).iterdir()):
            stems = sorted((p.stem for p in (folder / "spike").glob("*.dat")), key=natural_key)
            self.clips += [(folder, stems[i:i + clip_len])
                           for i in range(len(stems) - clip_len + 1)]
        first = cv2.imread(str(self.clips[0][0] / "blur" / f"{self.clips[0][1][0]}.png"))
        self.image_hw = first.shape[:2]

    def __len__(self) -> int:
        return len(self.clips)

    def _voxels(self, path: Path) -> np.ndarray:
        spike = np.fromfile(path, np.uint8)
        if spike.size != int(np.prod(self.spike_shape)):
            raise ValueError(f"Cannot reshape spike data: {path}")
        spike = spike.reshape(self.spike_shape).astype(np.float32)
        return spike.reshape(self.bins, -1, *self.spike_shape[1:]).sum(axis=1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        folder, stems = self.clips[index]
        rng = np.random.default_rng((self.seed, 0, index))
        y = int(rng.integers(0, self.image_hw[0] - self.crop + 1))
        x = int(rng.integers(0, self.image_hw[1] - self.crop + 1))
        image_window, spike_window = crop_windows(self.image_hw, self.spike_shape[1:],
                                                  self.crop, y, x)
        images = {role: [] for role in ("blur", "sharp")}
        voxels = []
        for stem in stems:
            for role, frames in images.items():
                bgr = cv2.imread(str(folder / role / f"{stem}.png"))
                frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)[image_window])
            voxels.append(self._voxels(folder / "spike" / f"{stem}.dat")[(slice(None),
                                                                         *spike_window)])
        item = {role: torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0
                for role, frames in images.items()}
        item.update(spike_vox=torch.from_numpy(np.stack(voxels)), sequence=folder.name,
                    frames=stems, crop_yx=torch.tensor([y, x]))
        return item
