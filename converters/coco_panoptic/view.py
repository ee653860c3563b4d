"""How ``arraystore show`` draws a ``mask_embeddings`` store: the embeddings of the rows shown
(2000 by default) as a 2-D PCA scatter coloured by category, and what they are."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from arraystore.schema import Schema
from arraystore.views import Panel, View


class EmbeddingsView(View):
    kind = "mask_embeddings"
    per_sample = False
    default_count = 2000

    def fields(self, schema: Schema, asked: Sequence[str]) -> tuple[str, ...]:
        return ("embedding", "category_id", "image_id")

    def summary(self, samples: Sequence[Mapping[str, Any]], schema: Schema) -> list[Panel]:
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
        return [
            Panel(f"PCA 1-2 of {len(samples)} embeddings, by category", points=points,
                  point_labels=categories, span=2),
            Panel("rows", text="\n".join([
                f"rows        {len(samples)} from {images} images",
                f"width D     {embeddings.shape[1]}",
                f"norm        {norms.min():.4f} .. {norms.max():.4f}",
                f"categories  {len(set(categories.tolist()))}",
            ])),
        ]
