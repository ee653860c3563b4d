"""SigLIP image embeddings with open_clip (optional extra ``siglip``).

The model is built without weights (``pretrained=None``: nothing is downloaded) and loaded from a
local file (safetensors or a torch checkpoint, read with ``weights_only``). Its preprocessing is
open_clip's own transform built from the *pretrained tag's* configuration (``ViT-B-16-SigLIP`` /
``webli``: 224 squash, bicubic, mean = std = 0.5): a model created without a tag gets open_clip's
default (Resize + CenterCrop, OpenAI mean/std), which would be silently wrong. Embeddings are
``encode_image`` L2-normalised, returned as float16; their width is the model's ``embed_dim``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from arraystore.compat import ensure_torchvision_ops
from arraystore.errors import ArrayStoreError

DEFAULT_MODEL = "ViT-B-16-SigLIP"


class EmbedderError(ArrayStoreError, RuntimeError):
    """The embedder cannot be built: open_clip missing, unknown model or tag, unfit weights."""


def open_clip_module() -> Any:
    """open_clip, importable beside a CPU-only torch."""
    ensure_torchvision_ops()
    try:
        import open_clip
    except ImportError as exc:
        raise EmbedderError(f"SigLIP embeddings need open_clip ({exc}); install the extra: "
                            f"pip install -c constraints.txt 'arraystore[siglip]'") from exc
    return open_clip


def pretrained_config(model: str, tag: str | None) -> tuple[str, dict[str, Any]]:
    """(tag, open_clip's pretrained configuration for ``model`` and ``tag``); the tag defaults
    to the first open_clip lists for the model."""
    open_clip = open_clip_module()
    if model not in open_clip.list_models():
        raise EmbedderError(f"unknown open_clip model {model!r} (e.g. {DEFAULT_MODEL})")
    tags = [t for m, t in open_clip.list_pretrained() if m == model]
    tag = tag or (tags[0] if tags else None)
    config = open_clip.get_pretrained_cfg(model, tag) if tag else {}
    if not config:
        raise EmbedderError(f"no pretrained configuration {tag!r} for {model}; its tags: "
                            f"{tags} (the preprocessing is taken from it)")
    return tag, config


def embedding_width(model: str) -> int:
    """The width D of ``model``'s embeddings, from its open_clip configuration."""
    config = open_clip_module().get_model_config(model)
    if not config:
        raise EmbedderError(f"unknown open_clip model {model!r}")
    return int(config["embed_dim"])


def image_transform(model: str, tag: str | None) -> Any:
    """open_clip's evaluation transform (PIL image -> tensor) for ``model`` and ``tag``."""
    open_clip = open_clip_module()
    _, config = pretrained_config(model, tag)
    size = open_clip.get_model_config(model)["vision_cfg"]["image_size"]
    return open_clip.image_transform(size, is_train=False, mean=config["mean"],
                                     std=config["std"], interpolation=config["interpolation"],
                                     resize_mode=config["resize_mode"])


def _load_weights(model: Any, weights: Path) -> None:
    """Load ``weights`` into ``model``; every image-tower parameter must be there (a checkpoint
    of the image tower alone is enough: only it is used)."""
    import torch

    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise EmbedderError(f"weights {weights}: not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k.startswith("visual.")]
    if missing or result.unexpected_keys:
        raise EmbedderError(f"weights {weights} do not fit the model: image-tower keys missing "
                            f"{missing[:3]}, unexpected keys {result.unexpected_keys[:3]}")


class SiglipEmbedder:
    """``embedder(pixels)`` -> (B, D) float16 L2-normalised embeddings of preprocessed (B, 3,
    224, 224) float32 images (:meth:`transform` makes them from PIL images).

    ``weights=None`` keeps random weights (tests only). ``amp`` runs in bfloat16 autocast on
    CUDA.
    """

    def __init__(self, model: str = DEFAULT_MODEL, weights: str | os.PathLike[str] | None = None,
                 pretrained_tag: str | None = None, device: str = "cpu", batch_size: int = 8,
                 amp: bool = False) -> None:
        import torch

        open_clip = open_clip_module()
        self.model_name, self.batch_size, self.amp = model, batch_size, amp
        self.tag, self.config = pretrained_config(model, pretrained_tag)
        self.weights = None if weights is None else Path(weights)
        if self.weights is not None and not self.weights.is_file():
            raise EmbedderError(f"weights file not found: {self.weights} (a local open_clip "
                                f"checkpoint for {model}, e.g. open_clip_model.safetensors)")
        self.device = torch.device(device)
        logging.disable(logging.WARNING)  # open_clip warns "initialized randomly": not so,
        try:  # the weights are loaded right after
            self.model = open_clip.create_model(model, pretrained=None, device="cpu")
        finally:
            logging.disable(logging.NOTSET)
        if self.weights is not None:
            try:
                _load_weights(self.model, self.weights)
            except EmbedderError:
                raise
            except Exception as exc:  # safetensors / torch.load fail in many ways on bad files
                raise EmbedderError(f"weights {self.weights} cannot be read: {exc}") from exc
        self.model = self.model.to(self.device).eval()
        self.width = embedding_width(model)

    def describe(self) -> dict[str, Any]:
        from arraystore.converters.sa1b.teacher import file_sha256

        return {"model": self.model_name, "pretrained_tag": self.tag,
                "weights": str(self.weights) if self.weights else None,
                "weights_sha256": file_sha256(self.weights) if self.weights else None,
                "device": str(self.device), "amp": self.amp,
                "preprocessing": {k: self.config[k] for k in
                                  ("mean", "std", "interpolation", "resize_mode")}}

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(pixels), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(pixels[start:start + self.batch_size]))
                with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                    enabled=self.amp and self.device.type == "cuda"):
                    features = self.model.encode_image(x.to(self.device))
                features = torch.nn.functional.normalize(features.float(), dim=-1)
                out.append(features.cpu().numpy().astype(np.float16))
        return np.concatenate(out) if out else np.zeros((0, self.width), np.float16)
