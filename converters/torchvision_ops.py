"""Let ``torchvision`` import beside a CPU-only torch (open_clip and timm import it).

PyPI's torchvision 0.28.0 is a CUDA build: its C++ library (``torchvision/_C``) does not load
with the CPU torch, and then ``import torchvision`` fails on registering fake kernels for
``torchvision::nms`` ("operator torchvision::nms does not exist"). When -- and only when -- that
library cannot be loaded, :func:`ensure_torchvision_ops` declares the two operator schemas
torchvision's Python side needs (``nms``, ``qnms``). Nothing here implements them: the crops and
transforms this project uses never call them, and a call would fail loudly.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor qscores, float iou_threshold) -> Tensor",
)
_library: Any = None  # the declared schemas live as long as this module


def native_ops_load() -> bool:
    """Whether torchvision's own C++ operators load in this torch (True if not installed)."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True
    folder = os.path.dirname(spec.origin)
    names = [n for n in os.listdir(folder) if n.startswith("_C.") or n == "_C.so"]
    if not names:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, names[0]))
    except OSError:
        return False
    return True


def ensure_torchvision_ops() -> bool:
    """Declare the missing operators if torchvision's library cannot load; True if it did."""
    global _library
    if _library is not None or "torchvision" in sys.modules or native_ops_load():
        return False
    import torch

    _library = torch.library.Library("torchvision", "DEF")  # schemas only, no kernels
    for schema in OPS:
        _library.define(schema)
    return True
