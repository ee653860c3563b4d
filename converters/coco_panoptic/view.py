"""How ``arraystore show`` draws a ``mask_embeddings`` store: the embeddings of the rows shown
(2000 by default) as a 2-D PCA scatter coloured by category with a legend, what they are, and
the first rows' crops as the model was fed them.

The crops are not in the store: they are cut again from the COCO files the ingest recorded
(its provenance names the panoptic JSON; the store's attributes hold ``pad_ratio``,
``bg_alpha`` and the preprocessing), then passed through the same preprocessing and shown
un-normalised. Where those files are gone, or for a store imported from an old cache, a text
panel says why there are no crops.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from arraystore.errors import ArrayStoreError
from arraystore.schema import Schema
from arraystore.views import Panel, SummaryRow, View

CROPS_SHOWN = 8  # crops of the first rows, one row of panels


class EmbeddingsView(View):
    kind = "mask_embeddings"
    per_sample = False
    default_count = 2000

    def fields(self, schema: Schema, asked: Sequence[str]) -> tuple[str, ...]:
        return ("embedding", "category_id", "image_id", "segment_id")

    def summary(self, samples: Sequence[Mapping[str, Any]], schema: Schema,
                meta: Mapping[str, Any]) -> list[SummaryRow]:
        embeddings = np.stack([s["embedding"] for s in samples]).astype(np.float64)
        categories = np.array([int(s["category_id"]) for s in samples])
        centred = embeddings - embeddings.mean(axis=0)
        if len(samples) > 1:
            _, _, axes = np.linalg.svd(centred, full_matrices=False)
            points = centred @ axes[:2].T
        else:
            points = np.zeros((1, 2))
        norms = np.linalg.norm(embeddings, axis=1)
        images = len({int(s["image_id"]) for s in samples})
        overview = [
            Panel(f"PCA 1-2 of {len(samples)} embeddings, by category", points=points,
                  point_labels=categories, legend_title="category_id (rows)", span=3),
            Panel("rows", text="\n".join([
                f"rows        {len(samples)} from {images} images",
                f"width D     {embeddings.shape[1]}",
                f"norm        {norms.min():.4f} .. {norms.max():.4f}",
                f"categories  {len(set(categories.tolist()))}",
            ])),
        ]
        shown = samples[:CROPS_SHOWN]
        return [SummaryRow(f"{len(samples)} rows: embeddings", overview),
                SummaryRow(f"the first {len(shown)} crops as fed to the model",
                           crop_panels(shown, meta))]


def crop_panels(samples: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> list[Panel]:
    """One panel per row: its crop cut again from the COCO files and preprocessed as at
    ingest, titled with its ids and category; or one text panel saying why there are none."""
    try:
        cutter = CropCutter(meta)
        return [Panel(f"{int(s['image_id'])}_{int(s['segment_id'])}\ncategory "
                      f"{int(s['category_id'])}", image=cutter.model_input(s))
                for s in samples]
    except (ArrayStoreError, OSError, KeyError, ValueError) as exc:
        return [Panel("crops", text=f"not shown: {exc}", span=2)]


class CropCutter:
    """Cuts a row's crop from the COCO files an ingest recorded, with its settings."""

    def __init__(self, meta: Mapping[str, Any]) -> None:
        settings = meta.get("extra", {}).get("embeddings")
        if not settings:
            raise ValueError("this store was not made by `ingest coco-embeddings` (an imported "
                             "cache holds no crop settings)")
        self.settings = settings
        self.files: dict[int, tuple[Path, Path]] = {}  # image id -> (image, panoptic PNG)
        for source in meta.get("provenance", {}).get("sources", []):
            annotations = Path(source["path"])
            doc = json.loads(annotations.read_text())
            root, split = annotations.parent.parent, annotations.stem.removeprefix("panoptic_")
            names = {int(i["id"]): i["file_name"] for i in doc["images"]}
            for entry in doc["annotations"]:
                image_id = int(entry["image_id"])
                self.files[image_id] = (root / split / names[image_id],
                                        root / f"panoptic_{split}" / entry["file_name"])
        self._transform: Any = None

    def model_input(self, row: Mapping[str, Any]) -> np.ndarray:
        """The row's crop as the model saw it: preprocessed, then mapped back to RGB uint8."""
        from PIL import Image

        from converters.coco_panoptic.crops import crop_segment, segment_ids
        from converters.coco_panoptic.embedder import image_transform
        from converters.coco_panoptic.source import read_image

        image_id = int(row["image_id"])
        if image_id not in self.files:
            raise KeyError(f"image {image_id} is in no recorded COCO annotations file")
        image_path, png_path = self.files[image_id]
        image = read_image(str(image_path), str(image_id))
        ids = segment_ids(read_image(str(png_path), str(image_id)))
        crop = crop_segment(image, ids == int(row["segment_id"]),
                            float(self.settings["pad_ratio"]), float(self.settings["bg_alpha"]))
        if crop is None:
            raise ValueError(f"segment {int(row['segment_id'])} is no longer in {png_path}")
        if self._transform is None:
            self._transform = image_transform(self.settings["model"],
                                              self.settings["pretrained_tag"])
        pixels = self._transform(Image.fromarray(crop.pixels)).numpy()
        mean = np.asarray(self.settings["preprocessing"]["mean"]).reshape(3, 1, 1)
        std = np.asarray(self.settings["preprocessing"]["std"]).reshape(3, 1, 1)
        return np.clip(np.rint((pixels * std + mean) * 255), 0, 255).astype(
            np.uint8).transpose(1, 2, 0)
