"""The ``sa1b`` source: SA-1B TAR shards -> ``sa1b`` samples (``arraystore ingest sa1b``)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from arraystore.converters.device import device_problem
from arraystore.converters.sa1b.derive import derive_fields
from arraystore.converters.sa1b.members import decode_jpeg, load_features, parse_annotations
from arraystore.converters.sa1b.tar_shard import count_sample_keys, read_groups
from arraystore.converters.sa1b.teacher_models import SAM2_CONFIGS
from arraystore.errors import SampleError, SourceError
from arraystore.kinds.sa1b import DEFAULT_MAX_BOXES, KIND, sa1b_schema
from arraystore.plugins import PluginOption
from arraystore.schema import Schema
from arraystore.sources import BatchStage, Record, Source, SourceUnit

TAR_PATTERNS = ("*.tar", "*.tar.gz", "*.tgz")


def expand_inputs(
    inputs: Sequence[str | os.PathLike[str]], patterns: tuple[str, ...]
) -> list[Path]:
    """Files named on the command line, and the files matching ``patterns`` in named folders."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted({p for pattern in patterns for p in path.glob(pattern)})
            if not found:
                raise SourceError(str(path), f"folder holds no files matching {patterns}")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise SourceError(str(path), "no such file or folder")
    return paths


class Sa1bTarSource(Source):
    """SA-1B shards: ``<key>.jpg`` + ``<key>.json`` [+ ``<key>_features.npz``] per sample."""

    name = "sa1b"
    kind = KIND
    options = (
        PluginOption("max_boxes", int, DEFAULT_MAX_BOXES,
                     "boxes and masks kept per sample, largest annotation area first",
                     minimum=1),
        PluginOption("teacher", str, None, f"compute P4/P5 with this SAM2 model during ingest "
                                           f"({', '.join(SAM2_CONFIGS)})"),
        PluginOption("weights", str, None, "the teacher's local checkpoint file"),
        PluginOption("device", str, "cpu", "the teacher's device, e.g. cuda:0",
                     validate=device_problem),
        PluginOption("batch_size", int, 8, "images per teacher forward pass",
                     minimum=1),
        PluginOption("amp", bool, False, "bfloat16 autocast for the teacher on CUDA"),
    )

    @property
    def max_boxes(self) -> int:
        return int(self.settings["max_boxes"])

    def units(self, inputs: Sequence[str | os.PathLike[str]]) -> list[SourceUnit]:
        return [SourceUnit(p, p.stat().st_size) for p in expand_inputs(inputs, TAR_PATTERNS)]

    def schema(self, units: Sequence[SourceUnit]) -> Schema:
        return sa1b_schema(self.max_boxes)

    def records(self, unit: SourceUnit) -> Iterator[Record | SampleError]:
        for group in read_groups(unit):
            where = f"{unit.path}:{group.key}"
            if not group.members and not group.problems:
                continue  # only members of other kinds (a README.txt): not a sample
            if group.problems:
                yield SampleError(where, group.sample_id, "; ".join(group.problems))
                continue
            missing = [role for role in ("jpg", "json") if role not in group.members]
            if missing:
                present = ", ".join(name for name, _ in group.members.values())
                yield SampleError(where, group.sample_id,
                                  f"{' and '.join(m.upper() for m in missing)} member missing "
                                  f"(found only: {present}); a sample needs {group.key}.jpg and "
                                  f"{group.key}.json")
                continue
            payload = {role: data for role, (_, data) in group.members.items()}
            payload["where"] = {role: f"{unit.path}:{name}"
                                for role, (name, _) in group.members.items()}
            yield Record(group.sample_id, where, payload, unit.bytes_read)

    def max_samples(self, unit: SourceUnit) -> int:
        """The sample keys among the shard's member headers (data skipped, not read)."""
        return count_sample_keys(unit.path)

    def derive(self, record: Record) -> dict[str, Any]:
        payload, where, sid = record.payload, record.payload["where"], record.sample_id
        rgb = decode_jpeg(payload["jpg"], where["jpg"], sid)
        height, width = rgb.shape[:2]
        annotations = parse_annotations(payload["json"], where["json"], sid, height, width)
        fields = derive_fields(rgb, annotations, self.max_boxes)
        if "npz" in payload:
            p4, p5, flag = load_features(payload["npz"], where["npz"], sid)
        else:
            p4, p5, flag = (np.zeros((256, 64, 64), np.float32),
                            np.zeros((256, 32, 32), np.float32), 0)
        fields.update(P4_S16=p4, P5_S32=p5, feature_flag=np.uint8(flag), image_id=sid)
        return fields

    def stage_device(self) -> str | None:
        return self.settings["device"] if self.settings["teacher"] else None

    def batch_stage(self) -> BatchStage | None:
        """With ``--teacher``, features come from SAM2 (replacing any NPZ features); the model
        lives in the writer process while the workers decode ahead."""
        from arraystore.converters.sa1b.teacher import Sam2Teacher, TeacherError
        from arraystore.stages import ModelStage

        if not self.settings["teacher"]:
            if self.settings["weights"]:
                raise TeacherError("--weights given without --teacher; name the SAM2 model")
            return None
        if not self.settings["weights"]:
            raise TeacherError(f"--teacher {self.settings['teacher']} needs --weights PATH "
                               f"(a local checkpoint)")
        teacher = Sam2Teacher(self.settings["teacher"], self.settings["weights"],
                              self.settings["device"], self.settings["batch_size"],
                              self.settings["amp"])
        return ModelStage(teacher, "image", ("P4_S16", "P5_S32"), name="teacher",
                          flags={"feature_flag": np.uint8(1)})

    def prepare_worker(self) -> None:
        cv2.setNumThreads(1)  # one process per core already; OpenCV threads would oversubscribe
