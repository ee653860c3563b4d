"""The ``bin`` source: a ``.bin`` dataset directory (docs/formats.md) -> an ``sa1b`` store, exactly.

Every byte of every ``.bin`` item lands in the store unchanged, so ``export bin`` reproduces the
files byte for byte. The format holds no annotation ids, areas or flags: ids and areas are stored
as -1, ``feature_flag`` is 1 where the features are not all zero, and ``edge_flag`` is 0 with an
empty ``edge_version`` (the method that made the edges is unknown; ``fix edges`` can redo them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from arraystore.errors import SampleError, SourceError
from arraystore.kinds.sa1b import KIND, sa1b_schema
from arraystore.kinds.sa1b_bin import (
    BinFile,
    bin_files,
    max_boxes_of,
    open_bin_directory,
    read_config,
)
from arraystore.schema import Schema
from arraystore.sources import Record, Source, SourceUnit

CONFIG_ATTR = "bin_config"


def split_item(files: tuple[BinFile, ...], items: Mapping[str, bytes]) -> dict[str, np.ndarray]:
    """The store fields of one sample from the raw bytes of its item in each file."""
    fields: dict[str, np.ndarray] = {}
    for spec in files:
        data, offset = items[spec.name], 0
        for part in spec.parts:
            value = np.frombuffer(data, part.dtype, int(np.prod(part.shape)), offset)
            fields[part.field] = value.reshape(part.shape).astype(part.dtype[1:], copy=True)
            offset += part.nbytes
    fields["P4_S16"] = fields["P4_S16"][0]
    fields["P5_S32"] = fields["P5_S32"][0]
    return fields


class BinDirectorySource(Source):
    """Folders holding ``config.json``, ``keys.txt`` and the seven ``.bin`` files."""

    name = "bin"
    kind = KIND

    def units(self, inputs: Sequence[str | os.PathLike[str]]) -> list[SourceUnit]:
        units = []
        for item in inputs:
            root = Path(item)
            if not root.is_dir():
                raise SourceError(str(root), "not a folder; `ingest bin` takes .bin dataset "
                                             "folders (config.json, keys.txt, *.bin)")
            try:
                files = open_bin_directory(root).files
            except (FileNotFoundError, OSError) as exc:
                raise SourceError(str(root), str(exc)) from exc
            size = sum((root / f.name).stat().st_size for f in files)
            units.append(SourceUnit(root, size))
        return units

    def schema(self, units: Sequence[SourceUnit]) -> Schema:
        boxes = {max_boxes_of(read_config(u.path)) for u in units}
        if len(boxes) > 1:
            raise SourceError(", ".join(str(u.path) for u in units),
                              f"the folders disagree on max_boxes ({sorted(boxes)})")
        return sa1b_schema(boxes.pop())

    def store_attrs(self, units: Sequence[SourceUnit]) -> Mapping[str, Any]:
        return {CONFIG_ATTR: read_config(units[0].path)} if units else {}

    def records(self, unit: SourceUnit) -> Iterator[Record | SampleError]:
        directory = open_bin_directory(unit.path)
        keys, files = directory.keys, directory.files
        handles = {f.name: open(unit.path / f.name, "rb") for f in files}  # noqa: SIM115
        try:
            for index, key in enumerate(keys):
                items = {}
                for spec in files:
                    data = handles[spec.name].read(spec.item_size)
                    if len(data) != spec.item_size:
                        raise SourceError(str(unit.path / spec.name),
                                          f"Failed to read item at index {index}: expected "
                                          f"{spec.item_size} bytes, got {len(data)}")
                    unit.digest.update(data)
                    unit.bytes_read += len(data)
                    items[spec.name] = data
                yield Record(key, f"{unit.path}[{index}]", items, unit.bytes_read)
        finally:
            for handle in handles.values():
                handle.close()

    def derive(self, record: Record) -> dict[str, Any]:
        config_boxes = record.payload["bboxes.bin"]
        files = bin_files(len(config_boxes) // 16)
        fields = split_item(files, record.payload)
        k = fields["bboxes"].shape[0]
        fields.update(
            feature_flag=np.uint8(bool(fields["P4_S16"].any() or fields["P5_S32"].any())),
            edge_flag=np.uint8(0),
            edge_version="",
            image_id=record.sample_id,
            box_annotation_ids=np.full((k,), -1, np.int64),
            box_areas=np.full((k,), -1.0, np.float64),
        )
        return fields
