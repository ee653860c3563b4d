"""How ``arraystore show`` draws an ``sa1b`` sample: the 1024² image with its stored boxes and
box masks, the 256² edge map, the 64² foreground map, the P4 teacher feature as RGB (its first
three principal components), and the flags."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from arraystore.kinds.sa1b import KIND
from arraystore.schema import Schema
from arraystore.views import Panel, View, field_panels

COLORS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
          (145, 30, 180), (70, 240, 240), (240, 50, 230)]
MASK_ALPHA = 0.45
SHOWN = ("image", "edge_256x256", "fg_map_64", "P4_S16", "flags")
CONTEXT = {"image": ("masks", "bboxes", "metadata"), "P4_S16": ("feature_flag",),
           "P5_S32": ("feature_flag",),
           "flags": ("metadata", "feature_flag", "edge_flag", "edge_version", "image_id")}


def pca_rgb(features: np.ndarray) -> np.ndarray:
    """(C, H, W) features -> (H, W, 3) uint8: the first three principal components over the
    H*W positions, each stretched over its 1st..99th percentile."""
    channels = features.shape[0]
    x = features.reshape(channels, -1).T.astype(np.float64)
    x -= x.mean(axis=0)
    _, vectors = np.linalg.eigh(x.T @ x)
    projected = x @ vectors[:, ::-1][:, :3]
    low, high = np.percentile(projected, [1, 99], axis=0)
    scaled = np.clip((projected - low) / np.where(high > low, high - low, 1.0), 0, 1)
    return (scaled.reshape(*features.shape[1:], 3) * 255).astype(np.uint8)


class Sa1bView(View):
    kind = KIND

    def fields(self, schema: Schema, asked: Sequence[str]) -> tuple[str, ...]:
        names: list[str] = []
        for name in asked or SHOWN:
            for needed in (*([name] if name in schema else []), *CONTEXT.get(name, ())):
                if needed not in names:
                    names.append(needed)
        return tuple(names)

    def panels(self, sample: Mapping[str, Any], schema: Schema,
               asked: Sequence[str]) -> list[Panel]:
        panels: list[Panel] = []
        for name in asked or SHOWN:
            if name == "image":
                panels.append(self._image(sample))
            elif name in ("P4_S16", "P5_S32"):
                panels.append(self._features(name, sample))
            elif name == "flags":
                panels.append(self._flags(sample))
            else:
                panels.extend(field_panels({name: sample[name]}, schema))
        return panels

    @staticmethod
    def _image(sample: Mapping[str, Any]) -> Panel:
        count = int(sample["metadata"][0])
        image = sample["image"].copy()
        for k in range(count):
            mask = cv2.resize(sample["masks"][k], image.shape[1::-1],
                              interpolation=cv2.INTER_NEAREST).astype(bool)
            color = np.array(COLORS[k % len(COLORS)], np.float32)
            image[mask] = (image[mask] * (1 - MASK_ALPHA) + color * MASK_ALPHA).astype(np.uint8)
        return Panel(f"image, {count} boxes + masks", image=image,
                     boxes=sample["bboxes"][:count],
                     box_colors=[COLORS[k % len(COLORS)] for k in range(count)])

    @staticmethod
    def _features(name: str, sample: Mapping[str, Any]) -> Panel:
        if int(sample["feature_flag"]) == 0:
            return Panel(f"{name} (PCA)", text="not computed\n(feature_flag 0)")
        return Panel(f"{name}: PCA 1-3 as RGB", image=pca_rgb(sample[name]))

    @staticmethod
    def _flags(sample: Mapping[str, Any]) -> Panel:
        boxes, has_bbox, height, width, channels = (int(v) for v in sample["metadata"])
        return Panel("flags", text="\n".join([
            f"image_id     {sample['image_id']}",
            f"image_shape  {height}x{width}x{channels}",
            f"boxes        {boxes} (has_bbox {has_bbox})",
            f"feature_flag {int(sample['feature_flag'])}",
            f"edge_flag    {int(sample['edge_flag'])} {sample['edge_version']!r}",
        ]))
