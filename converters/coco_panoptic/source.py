"""``arraystore ingest coco-embeddings ROOT --split val2017 --weights FILE``: one SigLIP
embedding per COCO panoptic segment (docs/formats.md).

A record is an image with its listed segments; workers decode the image and its panoptic PNG,
cut each segment's faded crop (:mod:`arraystore.converters.coco_panoptic.crops`) and preprocess it
with the pretrained tag's transform; the model runs as a batch stage in the writer process, as the
SAM2 teacher does. A segment listed in the JSON but absent from the PNG is left out with a report
line. A record names its segments, so an image whose segments are all committed is skipped
without being decoded: a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from arraystore.converters.coco_panoptic.crops import crop_segment, segment_ids
from arraystore.converters.coco_panoptic.embedder import (
    DEFAULT_MODEL,
    embedding_width,
    pretrained_config,
)
from arraystore.converters.device import device_problem
from arraystore.errors import OptionError, SampleError, SourceError
from arraystore.kinds.mask_embeddings import KIND, embeddings_schema
from arraystore.plugins import PluginOption
from arraystore.schema import Schema
from arraystore.sources import BatchStage, Part, Record, Skip, Source, SourceUnit
from arraystore.stages import ModelStage

PIXELS = "_pixels"  # the preprocessed crop, consumed by the model stage


def part_id(image_id: int, segment_id: int) -> str:
    return f"{image_id}_{segment_id}"


def read_image(path: str, sample_id: str) -> np.ndarray:
    """An RGB uint8 image (JPEG or PNG), or a :class:`SampleError` naming the file."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise SampleError(path, sample_id, "missing, or not a decodable image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class CocoEmbeddingsSource(Source):
    """COCO panoptic segments -> one SigLIP embedding each (a model stage of the ingest)."""

    name = "coco-embeddings"
    kind = KIND
    options = (
        PluginOption("split", str, "val2017", "train2017, val2017, ..."),
        PluginOption("model", str, DEFAULT_MODEL, "open_clip model"),
        PluginOption("weights", str, None, "the model's local checkpoint (.safetensors or .pt)",
                     required=True),
        PluginOption("pretrained_tag", str, None,
                     "the tag whose preprocessing the weights expect [the model's first, e.g. "
                     "webli]"),
        PluginOption("device", str, "cpu", "e.g. cuda:0",
                     validate=device_problem),
        PluginOption("batch_size", int, 32,
                     "crops per forward pass (larger batches hold up better on busy CPU cores; "
                     "see benchmarks/results/embeddings.md)",
                     minimum=1),
        PluginOption("amp", bool, False, "bfloat16 autocast on CUDA"),
        PluginOption("bg_alpha", float, 0.3, "background brightness outside the mask, 0..1"),
        PluginOption("pad_ratio", float, 0.1, "crop padding, a fraction of the box size"),
    )

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._transform: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_transform": None}  # rebuilt in each worker

    def _check_options(self) -> None:
        s = self.settings
        if not 0.0 <= float(s["bg_alpha"]) <= 1.0 or float(s["pad_ratio"]) < 0:
            raise OptionError(f"--bg-alpha {s['bg_alpha']} must be in [0, 1] and --pad-ratio "
                              f"{s['pad_ratio']} >= 0")
        if not s["weights"]:
            raise OptionError("--weights FILE is required: a local checkpoint of the model "
                              "(nothing is downloaded)")
        if int(s["batch_size"]) < 1:
            raise OptionError(f"--batch-size must be >= 1, got {s['batch_size']}")
        self.settings["pretrained_tag"], _ = pretrained_config(s["model"], s["pretrained_tag"])

    def units(self, inputs: Sequence[str | os.PathLike[str]]) -> list[SourceUnit]:
        self._check_options()
        units = []
        for item in inputs:
            root = Path(item)
            annotations = root / "annotations" / f"panoptic_{self.settings['split']}.json"
            if not annotations.is_file():
                raise SourceError(str(root), f"no {annotations.relative_to(root)} (expected the "
                                             f"COCO layout: {self.settings['split']}/, panoptic_"
                                             f"{self.settings['split']}/, annotations/)")
            units.append(SourceUnit(annotations, annotations.stat().st_size))
        return units

    def schema(self, units: Sequence[SourceUnit]) -> Schema:
        return embeddings_schema(embedding_width(self.settings["model"]))

    def store_attrs(self, units: Sequence[SourceUnit]) -> Mapping[str, Any]:
        s = self.settings
        _, config = pretrained_config(s["model"], s["pretrained_tag"])
        return {"embeddings": {
            "model": s["model"], "pretrained_tag": s["pretrained_tag"],
            "bg_alpha": float(s["bg_alpha"]), "pad_ratio": float(s["pad_ratio"]),
            "preprocessing": {k: config[k] for k in ("mean", "std", "interpolation",
                                                     "resize_mode")}}}

    def records(self, unit: SourceUnit) -> Iterator[Record | SampleError]:
        data = unit.path.read_bytes()
        unit.digest.update(data)
        unit.bytes_read = len(data)
        try:
            doc = json.loads(data)
            images = {int(i["id"]): i for i in doc["images"]}
            annotations = list(doc["annotations"])
        except (ValueError, KeyError, TypeError) as exc:
            raise SourceError(str(unit.path), f"not a COCO panoptic JSON (images, annotations "
                                              f"with segments_info): {exc}") from exc
        root, split = unit.path.parent.parent, self.settings["split"]
        for number, annotation in enumerate(annotations):
            try:
                image_id = int(annotation["image_id"])
                segments = [dict(s) for s in annotation["segments_info"]]
                ids = [int(s["id"]) for s in segments]
            except (KeyError, TypeError, ValueError) as exc:
                yield SampleError(f"{unit.path}:annotations[{number}]", f"#{number}",
                                  f"malformed annotation: {exc}")
                continue
            where = f"{unit.path}:image {image_id}"
            if image_id not in images:
                yield SampleError(where, str(image_id), "annotated, but not in 'images'")
                continue
            if len(set(ids)) != len(ids):
                yield SampleError(where, str(image_id), f"segment ids repeat: {ids}")
                continue
            payload = {"image": str(root / split / images[image_id]["file_name"]),
                       "png": str(root / f"panoptic_{split}" / annotation["file_name"]),
                       "image_id": image_id, "segments": segments}
            yield Record(str(image_id), payload["image"], payload, unit.size * number //
                         max(1, len(annotations)),
                         parts=tuple(part_id(image_id, i) for i in ids))

    def prepare_worker(self) -> None:
        from arraystore.converters.coco_panoptic.embedder import image_transform

        cv2.setNumThreads(1)
        self._transform = image_transform(self.settings["model"], self.settings["pretrained_tag"])

    def derive(self, record: Record) -> list[Part | Skip]:
        from PIL import Image

        payload, sid = record.payload, record.sample_id
        image = read_image(payload["image"], sid)
        panoptic = read_image(payload["png"], sid)
        if panoptic.shape != image.shape:
            raise SampleError(payload["png"], sid, f"PNG of {panoptic.shape[:2]} for an image of "
                                                   f"{image.shape[:2]}")
        ids = segment_ids(panoptic)
        results: list[Part | Skip] = []
        for segment in payload["segments"]:
            sample_id = part_id(payload["image_id"], int(segment["id"]))
            crop = crop_segment(image, ids == int(segment["id"]), float(
                self.settings["pad_ratio"]), float(self.settings["bg_alpha"]))
            if crop is None:
                results.append(Skip(payload["png"], sample_id, "segment listed in the JSON but "
                                                               "absent from the PNG"))
                continue
            pixels = self._transform(Image.fromarray(crop.pixels)).numpy()
            results.append(Part(sample_id, {
                PIXELS: pixels,
                "image_id": np.int64(payload["image_id"]),
                "segment_id": np.int64(segment["id"]),
                "category_id": np.int32(segment.get("category_id", -1)),
                "area": np.int64(crop.area),
                "bbox": np.asarray(segment.get("bbox", [-1] * 4), np.float32).reshape(4),
                "crop_box": np.asarray(crop.crop_box, np.int32),
            }))
        return results

    def stage_device(self) -> str | None:
        return self.settings["device"]

    def batch_stage(self) -> BatchStage | None:
        from arraystore.converters.coco_panoptic.embedder import SiglipEmbedder

        s = self.settings
        embedder = SiglipEmbedder(s["model"], s["weights"], s["pretrained_tag"], s["device"],
                                  int(s["batch_size"]), bool(s["amp"]))
        return ModelStage(embedder, PIXELS, ("embedding",), consume_input=True, name="embedder")
