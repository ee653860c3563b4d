"""The old embedding cache (docs/formats.md), both ways: ``inst2feat.tsv`` (``image_id``,
``segment_id``, ``feat_file``) plus one ``<image_id>_<segment_id>.npy`` per segment.

``ingest vis-cache DIR`` imports it exactly: the embeddings as stored, and -- since the cache
never had them -- category, area and box from the COCO panoptic JSON the cache was made from
(``--annotations panoptic_val2017.json``: its ``segments_info``), or -1 without one or for a
segment it does not list. The crop box is not recoverable and stays -1. ``export tsv STORE
DIR`` writes it back: image ids zero-padded to 12 digits as in the seed's example, each file
written whole and renamed into place, the index last. Hostile input is refused row by row: a
``feat_file`` that leaves DIR (absolute, ``..``, a link out), a ``.npy`` that would need pickle,
a wrong shape or dtype.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from arraystore.converters.coco_panoptic.source import part_id
from arraystore.errors import SampleError, SourceError
from arraystore.exporters import Exporter
from arraystore.kinds.mask_embeddings import KIND, embeddings_schema
from arraystore.ownership import refuse_output_inside_store
from arraystore.plugins import PluginOption
from arraystore.reader import SampleReader
from arraystore.schema import Schema
from arraystore.sources import Record, Source, SourceUnit

INDEX = "inst2feat.tsv"
HEADER = ("image_id", "segment_id", "feat_file")
EMBEDDING_DTYPE = np.dtype("float16")


def load_embedding(data: bytes, where: str, sample_id: str) -> np.ndarray:
    """A ``.npy`` of one embedding, never unpickled."""
    try:
        value = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise SampleError(where, sample_id, f"refused: {exc} (object arrays are never "
                                            f"unpickled)") from exc
    except (OSError, EOFError) as exc:
        raise SampleError(where, sample_id, f"not a readable .npy: {exc}") from exc
    if not isinstance(value, np.ndarray):
        raise SampleError(where, sample_id, "not a single array")
    return value


def inside(root: Path, name: str) -> Path | None:
    """``root / name`` when it stays inside ``root`` (links resolved), else None."""
    if not name or os.path.isabs(name) or ".." in Path(name).parts:
        return None
    path = (root / name).resolve()
    return path if path.is_relative_to(root.resolve()) else None


def read_index(root: Path) -> list[list[str]]:
    """The rows of ``root/inst2feat.tsv`` after its header."""
    index = root / INDEX
    if not index.is_file():
        raise SourceError(str(root), f"no {INDEX} (header: {' '.join(HEADER)})")
    lines = index.read_text().splitlines()
    if not lines or tuple(lines[0].split("\t")) != HEADER:
        raise SourceError(str(index), f"header must be {HEADER} separated by tabs, got "
                                      f"{lines[0] if lines else 'nothing'!r}")
    return [line.split("\t") for line in lines[1:] if line.strip()]


UNKNOWN_SEGMENT = (-1, -1, (-1.0, -1.0, -1.0, -1.0))  # category, area, bbox


def segment_facts(path: Path) -> dict[tuple[int, int], tuple[int, int, tuple[float, ...]]]:
    """(image id, segment id) -> (category id, area, bbox) from a COCO panoptic JSON."""
    try:
        doc = json.loads(path.read_bytes())
        return {(int(a["image_id"]), int(s["id"])): (
                    int(s.get("category_id", -1)), int(s.get("area", -1)),
                    tuple(float(v) for v in s.get("bbox", UNKNOWN_SEGMENT[2])))
                for a in doc["annotations"] for s in a["segments_info"]}
    except FileNotFoundError as exc:
        raise SourceError(str(path), "--annotations: no such file") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise SourceError(str(path), f"--annotations: not a COCO panoptic JSON (annotations "
                                     f"with segments_info): {exc!r}") from exc


class VisCacheSource(Source):
    """An inst2feat.tsv + .npy embedding cache (docs/formats.md), imported exactly."""

    name = "vis-cache"
    kind = KIND
    options = (
        PluginOption("annotations", str, None,
                     "the COCO panoptic JSON the cache was made from: category, area and bbox "
                     "of each segment [-1 without it]"),
    )
    width: int = 0  # set by schema() from the first readable embedding

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._facts: dict[tuple[int, int], tuple[int, int, tuple[float, ...]]] | None = None

    def facts(self) -> dict[tuple[int, int], tuple[int, int, tuple[float, ...]]]:
        """The annotations' segments, read once (empty without ``--annotations``)."""
        if self._facts is None:
            path = self.settings["annotations"]
            self._facts = segment_facts(Path(path)) if path else {}
        return self._facts

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_facts": None}  # records carry what derive needs

    def units(self, inputs: Sequence[str | os.PathLike[str]]) -> list[SourceUnit]:
        self.facts()  # a bad --annotations is refused before anything is written
        units = []
        for item in inputs:
            root = Path(item)
            rows = read_index(root)
            units.append(SourceUnit(root / INDEX, max(1, len(rows))))
        return units

    def schema(self, units: Sequence[SourceUnit]) -> Schema:
        for unit in units:
            root = unit.path.parent
            for row in read_index(root):
                path = inside(root, row[2]) if len(row) == 3 else None
                if path is not None and path.is_file():
                    value = load_embedding(path.read_bytes(), str(path), row[2])
                    if value.ndim == 1:
                        self.width = len(value)
                        return embeddings_schema(self.width)
        raise SourceError(", ".join(str(u.path) for u in units),
                          "no readable (D,) embedding to take the width from")

    def records(self, unit: SourceUnit) -> Iterator[Record | SampleError]:
        root = unit.path.parent
        unit.digest.update(unit.path.read_bytes())
        for number, row in enumerate(read_index(root), 1):
            where = f"{unit.path}:{number + 1}"
            if len(row) != 3:
                yield SampleError(where, f"row {number}", f"{len(row)} columns, expected 3")
                continue
            try:
                image_id, segment_id = int(row[0]), int(row[1])
            except ValueError:
                yield SampleError(where, f"row {number}", f"ids must be integers, got {row[:2]}")
                continue
            sample_id = part_id(image_id, segment_id)
            path = inside(root, row[2])
            if path is None:
                yield SampleError(where, sample_id, f"feat_file {row[2]!r} leaves {root}")
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                yield SampleError(str(path), sample_id, f"unreadable: {exc}")
                continue
            unit.digest.update(data)
            unit.bytes_read = number
            facts = self.facts().get((image_id, segment_id), UNKNOWN_SEGMENT)
            yield Record(sample_id, str(path), (image_id, segment_id, data, facts), number)

    def derive(self, record: Record) -> dict[str, Any]:
        image_id, segment_id, data, (category_id, area, bbox) = record.payload
        value = load_embedding(data, record.where, record.sample_id)
        if value.shape != (self.width,) or value.dtype != EMBEDDING_DTYPE:
            raise SampleError(record.where, record.sample_id,
                              f"shape {value.shape} dtype {value.dtype}, expected "
                              f"({self.width},) {EMBEDDING_DTYPE}")
        return {"embedding": value, "image_id": np.int64(image_id),
                "segment_id": np.int64(segment_id), "category_id": np.int32(category_id),
                "area": np.int64(area), "bbox": np.asarray(bbox, np.float32).reshape(4),
                "crop_box": np.full(4, -1, np.int32)}


def _write_whole(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


class TsvExporter(Exporter):
    """A mask_embeddings store back to inst2feat.tsv + one .npy per segment (docs/formats.md)."""

    name = "tsv"
    kinds = (KIND,)

    def export(self, store: str | os.PathLike[str], out: str | os.PathLike[str], *,
               overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
        reader = SampleReader(store, fields=("embedding",), kind=KIND, user="export tsv")
        refuse_output_inside_store(out, "export tsv")
        out = Path(out)
        if (out / INDEX).exists() and not overwrite:
            raise SourceError(str(out), f"{INDEX} exists; pass --overwrite to replace the cache")
        out.mkdir(parents=True, exist_ok=True)
        image_ids, segment_ids = reader.column("image_id"), reader.column("segment_id")
        embeddings = reader.column("embedding")
        lines = ["\t".join(HEADER)]
        with Progress(disable=not progress) as bar:
            task = bar.add_task("export tsv", total=len(reader))
            for image_id, segment_id, embedding in zip(image_ids, segment_ids, embeddings,
                                                       strict=True):
                name = f"{int(image_id):012d}_{int(segment_id)}.npy"
                buffer = io.BytesIO()
                np.save(buffer, embedding, allow_pickle=False)
                _write_whole(out / name, buffer.getvalue())
                lines.append(f"{int(image_id):012d}\t{int(segment_id)}\t{name}")
                bar.advance(task)
        _write_whole(out / INDEX, ("\n".join(lines) + "\n").encode())
        return {"samples": len(reader), "out": str(out)}
