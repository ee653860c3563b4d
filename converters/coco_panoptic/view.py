"""How ``arraystore show`` draws a ``mask_embeddings`` store: the embeddings of the rows shown
(2000 by default) as a 2-D PCA scatter coloured by category with a legend, what they are, and
the first rows' crops as the model was fed them.

The crops are not in the store: they are derived again by the ingest's own source from the
COCO files it recorded (its provenance names the panoptic JSON; the store's attributes hold
``pad_ratio``, ``bg_alpha``, the model and its tag), and shown un-normalised. Where those
files are gone, or for a store imported from an old cache, a text panel says why there are no
crops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from arraystore.errors import ArrayStoreError
from arraystore.kinds.mask_embeddings import KIND
from arraystore.schema import Schema
from arraystore.sources import Record
from arraystore.views import Panel, SummaryRow, View

CROPS_SHOWN = 8  # crops of the first rows, one row of panels


class EmbeddingsView(View):
    kind = KIND
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
    """One panel per row: its crop derived again as at ingest, titled with its ids and
    category; or one text panel saying why there are none."""
    try:
        cutter = CropCutter(meta)
        return [Panel(f"{int(s['image_id'])}_{int(s['segment_id'])}\ncategory "
                      f"{int(s['category_id'])}", image=cutter.model_input(s))
                for s in samples]
    except (ArrayStoreError, OSError, KeyError, ValueError) as exc:
        return [Panel("crops", text=f"not shown: {exc}", span=2)]


class CropCutter:
    """Derives rows' crops again through the ingest's own source, with the settings and COCO
    files the store recorded: what is shown is exactly what the model was fed."""

    def __init__(self, meta: Mapping[str, Any]) -> None:
        from arraystore.converters.coco_panoptic.source import CocoEmbeddingsSource

        settings = meta.get("extra", {}).get("embeddings")
        if not settings:
            raise ValueError("this store was not made by `ingest coco-embeddings` (an imported "
                             "cache holds no crop settings)")
        self.preprocessing = settings["preprocessing"]
        self.records: dict[int, tuple[Any, Any]] = {}  # image id -> (its source, its record)
        for entry in meta.get("provenance", {}).get("sources", []):
            annotations = Path(entry["path"])  # <root>/annotations/panoptic_<split>.json
            source = CocoEmbeddingsSource(
                split=annotations.stem.removeprefix("panoptic_"), model=settings["model"],
                weights="(not needed to cut crops)", pretrained_tag=settings["pretrained_tag"],
                bg_alpha=settings["bg_alpha"], pad_ratio=settings["pad_ratio"])
            for unit in source.units([annotations.parent.parent]):
                for record in source.records(unit):
                    if isinstance(record, Record):  # malformed entries were reported at ingest
                        self.records[int(record.payload["image_id"])] = (source, record)
        self._prepared: set[int] = set()

    def model_input(self, row: Mapping[str, Any]) -> np.ndarray:
        """The row's crop as the model saw it: preprocessed, then mapped back to RGB uint8."""
        from arraystore.converters.coco_panoptic.source import PIXELS, part_id

        image_id, segment_id = int(row["image_id"]), int(row["segment_id"])
        if image_id not in self.records:
            raise KeyError(f"image {image_id} is in no recorded COCO annotations file")
        source, record = self.records[image_id]
        if id(source) not in self._prepared:
            source.prepare_worker()  # builds the pretrained tag's transform
            self._prepared.add(id(source))
        wanted = part_id(image_id, segment_id)
        parts = [p for p in source.derive(record) if p.sample_id == wanted and hasattr(
            p, "values")]
        if not parts:
            raise ValueError(f"segment {segment_id} of image {image_id} is no longer in its "
                             f"panoptic PNG")
        mean = np.asarray(self.preprocessing["mean"]).reshape(3, 1, 1)
        std = np.asarray(self.preprocessing["std"]).reshape(3, 1, 1)
        pixels = parts[0].values[PIXELS]
        return np.clip(np.rint((pixels * std + mean) * 255), 0, 255).astype(
            np.uint8).transpose(1, 2, 0)
