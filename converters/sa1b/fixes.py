"""``arraystore fix features`` and ``arraystore fix edges`` for ``sa1b`` stores (docs/formats.md).

Both select the committed samples whose flag says they need it (all with ``--force``), recompute
the fields, rewrite each affected file once through :class:`StoreUpdater` and set the flags only
after the data is durable: a killed fix resumes where it stopped when run again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from arraystore.converters.device import device_problem
from arraystore.converters.sa1b.derive import MaskAccumulator
from arraystore.converters.sa1b.members import parse_annotations
from arraystore.converters.sa1b.tar_shard import read_groups
from arraystore.converters.sa1b.teacher_models import SAM2_CONFIGS
from arraystore.errors import IncompatibleStoreError, OptionError, SampleError, SourceError
from arraystore.fixes import Fix
from arraystore.kinds.sa1b import EDGE_VERSION, KIND
from arraystore.plugins import PluginOption
from arraystore.reader import SampleReader
from arraystore.sources import SourceUnit
from arraystore.store import Store, utc_now
from arraystore.update import StoreUpdater

EDGE_WRITE_BATCH = 64


def _open_sa1b(path: str | os.PathLike[str]) -> Store:
    store = Store.open(path, mode="r+")
    if store.kind != KIND:
        raise IncompatibleStoreError(f"{path} holds kind {store.kind!r}; this fix works on "
                                     f"{KIND!r} stores")
    return store


def _batches(groups: list[list[int]], size: int) -> Iterator[list[int]]:
    """Whole file groups merged up to at least ``size`` samples (no file is split)."""
    batch: list[int] = []
    for group in groups:
        batch.extend(group)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _record(store: Store, entry: dict[str, Any]) -> None:
    store.provenance.setdefault("fixes", []).append({**entry, "finished": utc_now()})
    store.save_meta()


def fix_features(store_path: str | os.PathLike[str], teacher: Any, *,
                 max_samples: int | None = None, force: bool = False,
                 progress: bool = False) -> dict[str, Any]:
    """Recompute P4/P5 with ``teacher`` (a :class:`Sam2Teacher`) where ``feature_flag`` is 0."""
    store = _open_sa1b(store_path)
    with StoreUpdater(store) as updater:
        flags = np.asarray(store.array("feature_flag")[:])[: len(updater.committed)]
        todo = np.flatnonzero(updater.committed & ((flags == 0) | force))[:max_samples]
        reader = SampleReader(store.location, fields=("image",))
        groups = updater.file_groups(todo.tolist(), ("P4_S16", "P5_S32"))
        with Progress(disable=not progress) as bar:
            task = bar.add_task(f"fix features ({teacher.model_name})", total=len(todo))
            for batch in _batches(groups, teacher.batch_size):
                images = np.stack([reader.read_field("image", p) for p in batch])
                p4, p5 = teacher(images)
                updater.write(batch, {"P4_S16": p4, "P5_S32": p5}, {"feature_flag": 1})
                bar.advance(task, len(batch))
        description = teacher.describe()
        store.provenance["teacher"] = {**description, "used_from": utc_now()}
        _record(store, {"fix": "features", **description, "samples": len(todo)})
    left = int(((np.asarray(store.array("feature_flag")[:]) == 0) & updater.committed).sum())
    return {"ok": True, "fixed": len(todo), "left": left,
            "message": f"features recomputed for {len(todo)} samples with {teacher.model_name}; "
                       f"{left} committed samples still have feature_flag 0"}


class FeaturesFix(Fix):
    """Recompute P4/P5 with a SAM2 teacher where feature_flag is 0 (all with --force)."""

    name = "features"
    kinds = (KIND,)
    options = (
        PluginOption("model", str, None, f"SAM2 model: {', '.join(SAM2_CONFIGS)}",
                     required=True),
        PluginOption("weights", str, None, "the model's local checkpoint file", required=True),
        PluginOption("device", str, "cpu", "e.g. cuda:0",
                     validate=device_problem),
        PluginOption("batch_size", int, 8, "images per forward pass", minimum=1),
        PluginOption("max_samples", int, None, "stop after this many samples",
                     minimum=1),
        PluginOption("force", bool, False, "recompute samples already flagged too"),
        PluginOption("amp", bool, False, "bfloat16 autocast on CUDA"),
    )

    def apply(self, store: str | os.PathLike[str], *, progress: bool = False,
              **options: Any) -> dict[str, Any]:
        from arraystore.converters.sa1b.teacher import Sam2Teacher

        teacher = Sam2Teacher(options["model"], options["weights"], options.get("device", "cpu"),
                              options.get("batch_size", 8), options.get("amp", False))
        return fix_features(store, teacher, max_samples=options.get("max_samples"),
                            force=options.get("force", False), progress=progress)


def iter_annotations(sources: Sequence[str | os.PathLike[str]]) -> Iterator[tuple[str, bytes,
                                                                                    str]]:
    """(sample id, JSON bytes, where) from TAR shards, JSON files or folders of JSON files."""
    for item in sources:
        path = Path(item)
        if path.is_dir():
            for json_file in sorted(path.rglob("*.json")):
                yield json_file.stem, json_file.read_bytes(), str(json_file)
        elif path.suffix == ".json" and path.is_file():
            yield path.stem, path.read_bytes(), str(path)
        elif path.is_file():
            for group in read_groups(SourceUnit(path, path.stat().st_size)):
                if isinstance(group, SampleError) or "json" not in group.members:
                    continue
                name, data = group.members["json"]
                yield group.sample_id, data, f"{path}:{name}"
        else:
            raise SourceError(str(path), "no such file or folder (expected TAR shards or SA-1B "
                                         "JSON files)")


def kernel_size_problem(kernel_size: int) -> str | None:
    """Why ``kernel_size`` cannot be a MORPH_GRADIENT kernel size (it is centred: odd)."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 \
            or kernel_size % 2 == 0:
        return "must be an odd positive integer (3, 5, 7)"
    return None


def fix_edges(store_path: str | os.PathLike[str], annotations: Sequence[str | os.PathLike[str]],
              *, kernel_size: int = 3, force: bool = False,
              progress: bool = False) -> dict[str, Any]:
    """Recompute the Method B edge maps from the original annotations; set edge_flag and
    edge_version (``B_v1``; ``B_v1_k<n>`` for another kernel size)."""
    problem = kernel_size_problem(kernel_size)
    if problem:
        raise OptionError(f"--kernel-size {kernel_size!r} {problem}")
    version = EDGE_VERSION if kernel_size == 3 else f"{EDGE_VERSION}_k{kernel_size}"
    store = _open_sa1b(store_path)
    failures: list[str] = []
    fixed = 0
    with StoreUpdater(store) as updater:
        count = len(updater.committed)
        versions = np.asarray(store.array("edge_version")[:count])
        ids = [str(s) for s in store.sample_ids()[:count]]
        metadata = np.asarray(store.array("metadata")[:count])
        todo = np.flatnonzero(updater.committed & ((versions != version) | force))
        wanted = {ids[p]: int(p) for p in todo}
        pending: list[tuple[int, dict[str, np.ndarray]]] = []

        def write() -> None:
            if pending:
                positions = [p for p, _ in pending]
                values = {name: np.stack([e[name] for _, e in pending]) for name in pending[0][1]}
                updater.write(positions, values, {"edge_flag": 1, "edge_version": version})
                pending.clear()

        with Progress(disable=not progress) as bar:
            task = bar.add_task("fix edges", total=len(wanted))
            for sample_id, data, where in iter_annotations(annotations):
                position = wanted.pop(sample_id, None)
                if position is None:
                    continue
                height, width = (int(v) for v in metadata[position][2:4])
                try:
                    parsed = parse_annotations(data, where, sample_id, height, width)
                except SampleError as exc:
                    failures.append(str(exc))
                    continue
                masks = MaskAccumulator((height, width), kernel_size)
                for annotation in parsed:
                    masks.add_rle(annotation.rle)
                pending.append((position, masks.edge_maps()))
                fixed += 1
                bar.advance(task)
                if len(pending) >= EDGE_WRITE_BATCH:
                    write()
            write()
        failures += [f"sample {sid!r}: no annotation JSON found in {list(map(str, annotations))}"
                     for sid in wanted]
        _record(store, {"fix": "edges", "version": version, "kernel_size": kernel_size,
                        "samples": fixed, "failed": len(failures)})
    return {"ok": not failures, "fixed": fixed, "failures": failures,
            "message": f"edges recomputed ({version}) for {fixed} samples"
                       + (f"; {len(failures)} not fixed: " + "; ".join(failures[:5])
                          if failures else "")}


class EdgesFix(Fix):
    """Recompute edge maps by Method B from the SA-1B annotations; skips samples already done."""

    name = "edges"
    kinds = (KIND,)
    options = (
        PluginOption("annotations", str, None, "TAR shards, SA-1B JSON files or folders of them",
                     required=True, multiple=True),
        PluginOption("kernel_size", int, 3, "MORPH_GRADIENT kernel size (odd: 3, 5, 7)",
                     validate=kernel_size_problem),
        PluginOption("force", bool, False, "recompute samples already at this version too"),
    )

    def apply(self, store: str | os.PathLike[str], *, progress: bool = False,
              **options: Any) -> dict[str, Any]:
        return fix_edges(store, options["annotations"], kernel_size=options.get("kernel_size", 3),
                         force=options.get("force", False), progress=progress)
