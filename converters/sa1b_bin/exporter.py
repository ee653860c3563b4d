"""``arraystore export bin``: an ``sa1b`` store back to a ``.bin`` directory (docs/formats.md).

Committed samples are written in store order. Files are written under temporary names in the
output folder and renamed into place only when all are complete, so an interrupted export never
leaves ``.bin`` files that old training scripts would read as a dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from arraystore.converters.sa1b_bin.source import CONFIG_ATTR
from arraystore.errors import IncompatibleStoreError, StoreExistsError
from arraystore.exporters import Exporter
from arraystore.kinds.sa1b import KIND
from arraystore.kinds.sa1b_bin import CONFIG_FILE, DEFAULT_MAX_BOXES, KEYS_FILE, bin_files
from arraystore.ownership import refuse_output_inside_store
from arraystore.reader import SampleReader

PARTIAL = ".partial"


class BinExporter(Exporter):
    """Write an sa1b store's committed samples as a .bin folder (config.json, keys.txt, *.bin)."""

    name = "bin"
    kinds = (KIND,)

    def export(
        self, store: str | os.PathLike[str], out: str | os.PathLike[str], *,
        overwrite: bool = False, progress: bool = False,
    ) -> dict[str, Any]:
        reader = SampleReader(store)
        if reader.kind not in self.kinds:
            raise IncompatibleStoreError(
                f"{store} holds kind {reader.kind!r}; `export bin` writes kind {KIND!r} only")
        refuse_output_inside_store(out, "export bin")
        out = Path(out)
        max_boxes = reader.schema["bboxes"].shape[0]
        files = bin_files(max_boxes)
        names = [f.name for f in files] + [CONFIG_FILE, KEYS_FILE]
        existing = [n for n in names if (out / n).exists()]
        if existing and not overwrite:
            raise StoreExistsError(f"{out} already holds {existing}; pass --overwrite to "
                                   f"replace them")
        out.mkdir(parents=True, exist_ok=True)
        fields = [part.field for spec in files for part in spec.parts]
        handles = {f.name: open(out / (f.name + PARTIAL), "wb") for f in files}  # noqa: SIM115
        try:
            with Progress(disable=not progress) as bar:
                task = bar.add_task("export bin", total=len(reader))
                for index in range(len(reader)):
                    sample = reader.read(index, fields)
                    for spec in files:
                        for part in spec.parts:
                            value = np.ascontiguousarray(sample[part.field], part.dtype)
                            handles[spec.name].write(value.reshape(part.shape).tobytes())
                    bar.advance(task)
        finally:
            for handle in handles.values():
                handle.close()
        config = dict(reader.extra.get(CONFIG_ATTR) or {})
        config["total_samples"] = len(reader)
        if "max_boxes" in config or max_boxes != DEFAULT_MAX_BOXES:
            config["max_boxes"] = max_boxes
        _write_text(out / CONFIG_FILE, json.dumps(config, indent=2))
        _write_text(out / KEYS_FILE, "".join(f"{k}\n" for k in reader.sample_ids))
        for spec in files:
            os.replace(out / (spec.name + PARTIAL), out / spec.name)
        return {"samples": len(reader), "out": str(out), "files": names}


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + PARTIAL)
    partial.write_text(text)
    os.replace(partial, path)
