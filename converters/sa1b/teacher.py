"""The SAM2 teacher: P4/P5 features of the stored 1024x1024 images (optional extra ``sam2``).

Built with ``build_sam2(config, weights, device, hydra_overrides_extra=["++model.image_encoder.
scalp=0"])`` -- the default ``scalp=1`` drops the 32x32 level. Input: the stored image, ToTensor
(``/255``) and ImageNet normalisation, two lines of torch (no torchvision). P4 is
``backbone_fpn[2]`` (256x64x64), P5 ``backbone_fpn[3]`` (256x32x32).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arraystore.converters.sa1b.teacher_models import SAM2_CONFIGS
from arraystore.errors import ArrayStoreError

KEEP_ALL_LEVELS = "++model.image_encoder.scalp=0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TeacherError(ArrayStoreError, RuntimeError):
    """The teacher cannot be built: unknown model, sam2 missing, weights missing or unfit."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


class Sam2Teacher:
    """``teacher(images)`` -> (P4, P5) for uint8 images of shape (B, 1024, 1024, 3).

    ``weights`` is a local checkpoint (``{"model": state_dict}``, as sam2 saves them); ``None``
    builds random weights, for tests only. ``amp`` runs in bfloat16 autocast on CUDA.
    """

    def __init__(self, model: str, weights: str | os.PathLike[str] | None, device: str = "cpu",
                 batch_size: int = 8, amp: bool = False) -> None:
        if model not in SAM2_CONFIGS:
            raise TeacherError(f"unknown teacher model {model!r}; choose one of "
                               f"{sorted(SAM2_CONFIGS)}")
        try:
            from sam2.build_sam import build_sam2
        except ImportError as exc:
            raise TeacherError(f"the SAM2 teacher needs the sam2 package ({exc}); install the "
                               f"extra: pip install -c constraints.txt 'arraystore[sam2]'") from exc
        if weights is not None and not Path(weights).is_file():
            raise TeacherError(f"weights file not found: {weights} (pass a local SAM2 "
                               f"checkpoint for {model}, e.g. sam2.1_hiera_base_plus.pt)")
        self.model_name, self.device, self.amp = model, torch.device(device), amp
        self.batch_size = batch_size
        self.weights = str(weights) if weights is not None else None
        try:
            self.model = build_sam2(SAM2_CONFIGS[model], self.weights, device,
                                    hydra_overrides_extra=[KEEP_ALL_LEVELS])
        except Exception as exc:  # torch.load / load_state_dict fail in many ways on a bad file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TeacherError(f"weights {weights} do not fit {model}: {first[:300]}") from exc
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def describe(self) -> dict[str, Any]:
        return {
            "teacher": self.model_name,
            "weights": self.weights,
            "weights_sha256": file_sha256(self.weights) if self.weights else None,
            "device": str(self.device),
            "amp": self.amp,
        }

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """ToTensor + ImageNet normalisation of uint8 (B, H, W, 3) images."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._mean) / self._std

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p4, p5 = [], []
        for start in range(0, len(images), self.batch_size):
            x = self.preprocess(images[start:start + self.batch_size])
            with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                enabled=self.amp and self.device.type == "cuda"):
                levels = self.model.image_encoder(x)["backbone_fpn"]
            p4.append(levels[2].float().cpu().numpy())
            p5.append(levels[3].float().cpu().numpy())
        return np.concatenate(p4), np.concatenate(p5)
