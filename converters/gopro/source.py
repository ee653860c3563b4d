"""The ``gopro`` source: ``ROOT/<split>/<SEQ>/{blur,sharp,spike}/`` -> ``gopro_spike`` samples.

One sample per frame: files matched by stem across the three folders (``000123.png`` in
``blur/`` and ``sharp/``, ``000123.dat`` in ``spike/``; images PNG or JPEG). A sequence folder is
one input unit: provenance records it, so a re-run skips sequences already ingested. Stems sort
naturally (``2`` before ``10``); ``frame_index`` is a stem's position among all stems of its
sequence, so a frame left out (broken, or missing a file) leaves a gap that clips never span.

A ``.dat`` is raw uint8 without a header: ``frames x h x w`` bytes (docs/formats.md: 10 x 396 x
640). Its geometry is therefore an option; the image size is read from the first frame. Any
frame of another size is that frame's error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from arraystore.errors import OptionError, SampleError, SourceError
from arraystore.kinds.gopro_spike import (
    DEFAULT_BINS,
    KIND,
    SPIKE_FRAMES,
    SPIKE_HEIGHT,
    SPIKE_WIDTH,
    VOXEL_MODES,
    check_bins,
    gopro_schema,
    spike_to_voxel,
)
from arraystore.plugins import PluginOption
from arraystore.schema import Schema
from arraystore.sources import Record, Source, SourceUnit

ROLES = ("blur", "sharp", "spike")
SUFFIXES = {"blur": (".png", ".jpg", ".jpeg"), "sharp": (".png", ".jpg", ".jpeg"),
            "spike": (".dat",)}
ALL_SPLITS = "all"
_DIGITS = re.compile(r"(\d+)")


def natural_key(stem: str) -> list[Any]:
    """Sort key that orders digit runs by value: ``frame2`` before ``frame10``."""
    return [int(part) if part.isdigit() else part for part in _DIGITS.split(stem)]


@dataclass
class SequenceUnit(SourceUnit):
    """One sequence folder of one split."""

    split: str = ""
    sequence: str = ""

    @property
    def label(self) -> str:
        return f"{self.split}/{self.sequence}"


@dataclass
class FrameFiles:
    """The files of one stem in a sequence: role -> path, and what is wrong with them."""

    stem: str
    paths: dict[str, Path]
    problems: list[str]


def sequence_frames(folder: Path) -> list[FrameFiles]:
    """Every stem found in ``folder``'s ``blur/``, ``sharp/`` and ``spike/``, naturally sorted.

    Raises :class:`SourceError` when one of the three folders is missing.
    """
    missing = [role for role in ROLES if not (folder / role).is_dir()]
    if missing:
        raise SourceError(str(folder), f"no {', '.join(m + '/' for m in missing)} folder; a "
                                       f"sequence folder holds blur/, sharp/ and spike/")
    frames: dict[str, FrameFiles] = {}
    for role in ROLES:
        for path in sorted((folder / role).iterdir()):
            if not path.is_file() or path.suffix.lower() not in SUFFIXES[role]:
                continue  # notes, thumbnails, other files: not frames
            frame = frames.setdefault(path.stem, FrameFiles(path.stem, {}, []))
            if role in frame.paths:
                frame.problems.append(f"two {role} files for stem {path.stem!r}: "
                                      f"{frame.paths[role].name} and {path.name}")
                continue
            frame.paths[role] = path
    return [frames[stem] for stem in sorted(frames, key=natural_key)]


class GoproSpikeSource(Source):
    """GoPro spike clips: ROOT/<split>/<SEQ>/{blur,sharp,spike}/ frames matched by stem."""

    name = "gopro"
    kind = KIND
    options = (
        PluginOption("split", str, ALL_SPLITS,
                     "the split folder to ingest (train, test, ...), or 'all' of them"),
        PluginOption("voxels", str, "none",
                     "none, or precompute: also store spike_vox (the --bins sums, exact)"),
        PluginOption("bins", int, DEFAULT_BINS, "voxel bins; must divide the spike frames"),
        PluginOption("spike_frames", int, SPIKE_FRAMES, "frames in each .dat (it has no header)"),
        PluginOption("spike_height", int, SPIKE_HEIGHT, "rows of each spike frame"),
        PluginOption("spike_width", int, SPIKE_WIDTH, "columns of each spike frame"),
    )
    image_shape: tuple[int, int] = (0, 0)  # set by schema() from the first frame

    @property
    def spike_shape(self) -> tuple[int, int, int]:
        s = self.settings
        return int(s["spike_frames"]), int(s["spike_height"]), int(s["spike_width"])

    def _check_options(self) -> None:
        if self.settings["voxels"] not in VOXEL_MODES:
            raise OptionError(f"--voxels {self.settings['voxels']!r}: choose one of "
                              f"{VOXEL_MODES}")
        if min(self.spike_shape) < 1:
            raise OptionError(f"spike geometry {self.spike_shape} must be positive")
        try:
            check_bins(self.spike_shape[0], int(self.settings["bins"]))
        except ValueError as exc:
            raise OptionError(f"--bins: {exc}") from exc

    def units(self, inputs: Sequence[str | os.PathLike[str]]) -> list[SourceUnit]:
        self._check_options()
        units: list[SourceUnit] = []
        for item in inputs:
            root = Path(item)
            if not root.is_dir():
                raise SourceError(str(root), "not a folder; expected ROOT/<split>/<SEQ>/"
                                             "{blur,sharp,spike}/")
            splits = sorted(p for p in root.iterdir() if p.is_dir())
            if self.settings["split"] != ALL_SPLITS:
                wanted = root / self.settings["split"]
                if not wanted.is_dir():
                    raise SourceError(str(root), f"no split folder {wanted.name!r} (found: "
                                                 f"{', '.join(p.name for p in splits) or 'none'}"
                                                 f"); use --split all to take every one")
                splits = [wanted]
            for split in splits:
                for folder in sorted((p for p in split.iterdir() if p.is_dir()),
                                     key=lambda p: natural_key(p.name)):
                    size = sum(f.stat().st_size for role in ROLES if (folder / role).is_dir()
                               for f in (folder / role).iterdir() if f.is_file())
                    units.append(SequenceUnit(folder, size, split=split.name,
                                              sequence=folder.name))
            if not units:
                raise SourceError(str(root), "holds no sequence folders (expected "
                                             "ROOT/<split>/<SEQ>/{blur,sharp,spike}/)")
        return units

    def schema(self, units: Sequence[SourceUnit]) -> Schema:
        """The schema, with the image size of the first complete frame."""
        self._check_options()
        first = next((frame for unit in units for frame in self._frames_or_none(unit)
                      if set(frame.paths) == set(ROLES) and not frame.problems), None)
        if first is None:
            raise SourceError(", ".join(str(u.path) for u in units[:3]),
                              "no frame has all of its blur, sharp and spike files")
        image = cv2.imdecode(np.fromfile(first.paths["blur"], np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise SourceError(str(first.paths["blur"]), "the first frame is not a decodable "
                                                        "image; the store's image size is "
                                                        "read from it")
        self.image_shape = (int(image.shape[0]), int(image.shape[1]))
        bins = int(self.settings["bins"]) if self.settings["voxels"] == "precompute" else None
        return gopro_schema(self.image_shape, self.spike_shape, bins)

    @staticmethod
    def _frames_or_none(unit: SourceUnit) -> list[FrameFiles]:
        try:
            return sequence_frames(unit.path)
        except SourceError:
            return []  # reported when the unit is read

    def records(self, unit: SourceUnit) -> Iterator[Record | SampleError]:
        assert isinstance(unit, SequenceUnit)
        for index, frame in enumerate(sequence_frames(unit.path)):
            sample_id = f"{unit.split}/{unit.sequence}/{frame.stem}"
            where = str(next(iter(frame.paths.values())))
            missing = [role for role in ROLES if role not in frame.paths]
            if missing and not frame.problems:
                found = ", ".join(str(p) for p in frame.paths.values())
                frame.problems.append(
                    f"frame {frame.stem!r} has no {' and no '.join(missing)} file (found only "
                    f"{found}); a frame needs blur/ and sharp/ images and a spike/ .dat of the "
                    f"same stem")
            if frame.problems:
                yield SampleError(where, sample_id, "; ".join(frame.problems))
                continue
            data = {}
            for role in ROLES:
                data[role] = frame.paths[role].read_bytes()
                unit.digest.update(data[role])
                unit.bytes_read += len(data[role])
            payload = {"data": data, "files": {r: str(p) for r, p in frame.paths.items()},
                       "split": unit.split, "sequence": unit.sequence, "frame": frame.stem,
                       "frame_index": index}
            yield Record(sample_id, where, payload, unit.bytes_read)

    def derive(self, record: Record) -> dict[str, Any]:
        payload, sid = record.payload, record.sample_id
        files, data = payload["files"], payload["data"]
        values: dict[str, Any] = {
            role: self._image(data[role], files[role], sid) for role in ("blur", "sharp")}
        spike = self._spike(data["spike"], files["spike"], sid)
        values["spike"] = spike
        if self.settings["voxels"] == "precompute":
            values["spike_vox"] = spike_to_voxel(spike, int(self.settings["bins"]))
        values.update(sequence=payload["sequence"], frame=payload["frame"],
                      frame_index=np.int32(payload["frame_index"]), split=payload["split"])
        return values

    def _image(self, data: bytes, path: str, sample_id: str) -> np.ndarray:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise SampleError(path, sample_id, f"not a decodable PNG or JPEG image "
                                               f"({len(data)} bytes)")
        if image.shape[:2] != self.image_shape:
            raise SampleError(path, sample_id,
                              f"image of {image.shape[0]}x{image.shape[1]} pixels; the store's "
                              f"frames are {self.image_shape[0]}x{self.image_shape[1]} (the "
                              f"size of the first frame)")
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def _spike(self, data: bytes, path: str, sample_id: str) -> np.ndarray:
        shape = self.spike_shape
        expected = int(np.prod(shape))
        if len(data) != expected:
            raise SampleError(path, sample_id,
                              f"Cannot reshape spike data: {path} is {len(data)} bytes, expected "
                              f"{expected} ({shape[0]} frames of {shape[1]}x{shape[2]} uint8; "
                              f"--spike-frames/--spike-height/--spike-width set the geometry)")
        return np.frombuffer(data, np.uint8).reshape(shape).copy()

    def prepare_worker(self) -> None:
        cv2.setNumThreads(1)  # one process per core already
