"""``SpikeClipDataset``: clips of consecutive GoPro frames with their spike voxels, randomly
cropped, from a ``gopro_spike`` store (docs/formats.md).

A clip is ``clip_len`` frames of one sequence whose ``frame_index`` values are consecutive: it
never spans a frame left out at ingest, nor two sequences. Clips start every ``clip_stride``
frames of a sequence. The clip index is built from the small ``split``, ``sequence`` and
``frame_index`` arrays of the committed samples, never by reading a frame.

Crops. Each item draws one crop origin, reproducibly from ``(seed, epoch, index)`` (hashed with
splitmix64: a NumPy generator seeded per item cost ~40-200 µs, 5% of a cached clip), and uses
it for every frame of the clip. The image window is ``crop_size`` x ``crop_size`` at ``(y, x)`` of
the H x W frame. The spike stream has its own grid (h x w, e.g. 396 x 640 for 720 x 1280
images); its window is the same region of the scene on that grid: size
``(round(crop * h / H), round(crop * w / W))`` (halves rounded up) and origin
``(floor(y * h / H), floor(x * w / W))``, moved back inside the grid where it would overhang.

Reads. Without a cache only the window is read (the direct backend ``pread`` s the rows it
covers). With ``ram_cache_gb`` > 0 whole frames are read once into a RAM cache (LRU, bounded in
bytes for the whole loader, split across DataLoader workers) and windows are cut from RAM.

Voxels. ``voxels="realtime"`` sums the stored spike frames into ``bins`` bins on the fly;
``"precomputed"`` reads the ``spike_vox`` array an ``ingest gopro --voxels precompute`` stored.
Both give identical tensors (one definition: :mod:`arraystore.kinds.gopro_spike`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from arraystore.errors import ArrayStoreError, OptionError
from arraystore.kinds.gopro_spike import KIND, check_bins, spike_to_voxel
from arraystore.loaders.batched import Batched, allocate_arrays
from arraystore.loaders.frame_cache import ProcessLocalCache
from arraystore.reader import SampleReader
from arraystore.region import Region, region_shape

ALL_SPLITS = "all"
VOXEL_MODES = ("realtime", "precomputed")
log = logging.getLogger(__name__)
_MASK64 = (1 << 64) - 1


def splitmix64(word: int) -> int:
    """SplitMix64's output function of ``word`` (any int, taken mod 2**64): a 64-bit value in
    which every input bit flips about half the output bits; what draws crops (a modulus of a
    64-bit draw is uniform to within 1e-16 for crop ranges)."""
    z = (word + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def unit_floats(pixels: np.ndarray, out: torch.Tensor) -> None:
    """uint8 ``pixels`` into ``out`` (the same shape) as float32 ``/ 255``: the IEEE float32
    division ToTensor does, so its values bit for bit, by NumPy on this thread. Its cast-then-
    divide loops ran fastest here on one thread: the 30 split planes of 10 windows of 256² RGB
    into buffers in turn, 1.42 ms against 1.62 with ``torch.div`` and 1.71 with a ``cv2.LUT``
    table; uncached clips through a DataLoader (2 workers) 262 -> 310 and 290 -> 332 clips/s
    from ``torch.div`` to the table, 340 -> 347 from the table to this. OpenCV's ``divide``
    (also exact, and a single pass from a cached window) ran a cached clip faster idle (641 ->
    785 clips/s) but its own thread pool stalled it with a core busy (704 -> 470): kept out."""
    np.divide(pixels, np.float32(255.0), out=out.numpy(), dtype=np.float32)


class NoValidSamplesError(ArrayStoreError, RuntimeError):
    """A split of a store holds no clip of the asked length (the old loader's "No valid samples
    found")."""


def crop_windows(image_hw: tuple[int, int], spike_hw: tuple[int, int], crop: int, y: int,
                 x: int) -> tuple[Region, Region]:
    """The image window ``crop`` x ``crop`` at ``(y, x)`` and the spike window covering the same
    region of the scene (see the module docstring), as (rows, columns) slices."""
    (height, width), (spike_h, spike_w) = image_hw, spike_hw
    size_y = min(spike_h, max(1, (2 * crop * spike_h + height) // (2 * height)))
    size_x = min(spike_w, max(1, (2 * crop * spike_w + width) // (2 * width)))
    origin_y = min(y * spike_h // height, spike_h - size_y)
    origin_x = min(x * spike_w // width, spike_w - size_x)
    return ((slice(y, y + crop), slice(x, x + crop)),
            (slice(origin_y, origin_y + size_y), slice(origin_x, origin_x + size_x)))


class SpikeClipDataset(Dataset):
    """Random crops of clips of a ``gopro_spike`` store; see the module docstring.

    ``split``: a split name, or ``"all"``. ``crop_size=None`` returns whole frames. Items:
    ``blur``, ``sharp`` (T, 3, c, c) float32 in [0, 1]; ``spike_vox`` (T, bins, h', w')
    float32; ``sequence``; ``frames`` (stems); ``crop_yx`` (y, x in image pixels). Clips whose
    voxels are all zero are returned and counted in ``stats["all_zero_voxels"]`` (per process).
    ``storage_options``, ``cache_dir``, ``cache_limit``: for a store in an object store.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        split: str = "train",
        clip_len: int = 5,
        crop_size: int | None = 256,
        bins: int = 5,
        voxels: Literal["realtime", "precomputed"] = "realtime",
        ram_cache_gb: float = 4.0,
        seed: int = 0,
        clip_stride: int = 1,
        backend: str = "auto",
        storage_options: Mapping[str, Any] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_limit: int | str | None = None,
    ) -> None:
        if voxels not in VOXEL_MODES:
            raise OptionError(f"voxels={voxels!r}: choose one of {VOXEL_MODES}")
        if clip_len < 1 or clip_stride < 1:
            raise OptionError(f"clip_len ({clip_len}) and clip_stride ({clip_stride}) must be "
                              f">= 1")
        if ram_cache_gb < 0:
            raise OptionError(f"ram_cache_gb must be >= 0, got {ram_cache_gb}")
        self.split, self.clip_len, self.clip_stride = split, clip_len, clip_stride
        self.bins, self.voxels, self.seed, self.epoch = bins, voxels, seed, 0
        self.spike_field = "spike" if voxels == "realtime" else "spike_vox"
        self.reader = SampleReader(path, backend=backend, fields=(),  # reads name their field
                                   storage_options=storage_options, cache_dir=cache_dir,
                                   cache_limit=cache_limit, kind=KIND, user="SpikeClipDataset")
        schema = self.reader.schema
        self._check_voxels(path)
        self.image_hw = schema["blur"].shape[:2]
        self.spike_hw = schema[self.spike_field].shape[1:]
        if crop_size is not None and not 1 <= crop_size <= min(self.image_hw):
            raise OptionError(f"crop_size={crop_size} does not fit the store's "
                              f"{self.image_hw[0]}x{self.image_hw[1]} frames")
        self.crop_size = crop_size
        self.cache = ProcessLocalCache(int(ram_cache_gb * 2**30))
        self.stats: Counter[str] = Counter()
        self._build_index()

    def _check_voxels(self, path: str | os.PathLike[str]) -> None:
        schema = self.reader.schema
        if self.spike_field not in schema:
            raise OptionError(f"{path} has no precomputed voxels (no spike_vox array); ingest "
                              f"with --voxels precompute, or use voxels='realtime'")
        if self.voxels == "precomputed":
            stored = schema["spike_vox"].shape[0]
            if stored != self.bins:
                raise OptionError(f"{path} holds voxels of {stored} bins; bins={self.bins} "
                                  f"needs voxels='realtime' (or bins={stored})")
        else:
            try:
                check_bins(schema["spike"].shape[0], self.bins)
            except ValueError as exc:
                raise OptionError(f"{path}: {exc}") from exc

    def _build_index(self) -> None:
        """Clip starts from the split/sequence/frame_index arrays alone (no frame is read)."""
        reader = self.reader
        splits, sequences = reader.column("split"), reader.column("sequence")
        frame_index = reader.column("frame_index").astype(np.int64)
        self._stems = reader.column("frame")
        self._sequences = sequences
        chosen = (np.arange(len(reader)) if self.split == ALL_SPLITS
                  else np.flatnonzero(splits == self.split))
        _, split_code = np.unique(splits, return_inverse=True)
        _, sequence_code = np.unique(sequences, return_inverse=True)
        code = split_code.astype(np.int64) * (int(sequence_code.max(initial=0)) + 1) \
            + sequence_code
        order = chosen[np.lexsort((frame_index[chosen], code[chosen]))]
        t = self.clip_len
        starts = np.arange(max(0, len(order) - t + 1))
        codes, frames = code[order], frame_index[order]
        valid = (codes[starts + t - 1] == codes[starts]) & \
                (frames[starts + t - 1] - frames[starts] == t - 1)
        first_of_sequence = frames[np.searchsorted(codes, codes[starts], side="left")]
        valid &= (frames[starts] - first_of_sequence) % self.clip_stride == 0
        self._order, self._starts = order, starts[valid]
        if not len(self._starts):
            present = sorted({str(s) for s in np.unique(splits)})
            raise NoValidSamplesError(
                f"No valid samples found in {reader.path} split {self.split!r} with clip_len "
                f"{t}: {len(chosen)} committed frames in that split (splits present: "
                f"{present}); no {t} consecutive frames of one sequence")

    def __len__(self) -> int:
        return len(self._starts)

    def set_epoch(self, epoch: int) -> None:
        """Draw other crops this epoch (the crop seed is ``(seed, epoch, index)``)."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        """What decides this epoch's crops (torchdata's ``Stateful``): epoch and seed."""
        return {"epoch": self.epoch, "seed": self.seed, "clips": len(self)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Draw the crops of the saved epoch again."""
        if state["seed"] != self.seed or state["clips"] != len(self):
            raise OptionError(f"the saved SpikeClipDataset state (seed {state['seed']}, "
                              f"{state['clips']} clips) is not this dataset's (seed "
                              f"{self.seed}, {len(self)} clips of {self.reader.path} split "
                              f"{self.split!r}): resume with the same store and options")
        self.epoch = int(state["epoch"])

    def clip_frames(self, index: int) -> np.ndarray:
        """Reader indices of the frames of clip ``index``."""
        start = self._starts[index]
        return self._order[start:start + self.clip_len]

    def crop_origin(self, index: int) -> tuple[int, int]:
        """The crop's ``(y, x)`` in image pixels for item ``index`` in this epoch: uniform
        over the origins that keep the crop inside the frame."""
        if self.crop_size is None:
            return 0, 0
        height, width = self.image_hw
        draw = splitmix64(splitmix64(splitmix64(int(self.seed)) ^ int(self.epoch)) ^ int(index))
        return (draw % (height - self.crop_size + 1),
                splitmix64(draw) % (width - self.crop_size + 1))

    def _image_into(self, out: torch.Tensor, name: str, frame: int, region: Region,
                    staging: torch.Tensor, stored: np.ndarray | None) -> None:
        """The ``region`` of one frame's image into ``out`` (3, c, c) as float32 in [0, 1]
        (ToTensor's ``/ 255``, fused with the conversion: one pass over the output). From the
        RAM cache when there is one: cached frames are kept channels-first, and a window is
        first copied into ``staging``, a contiguous uint8 buffer of ``out``'s shape (row
        copies from a frame in RAM run far faster than converting straight from it), then
        divided by :func:`unit_floats` on the calling thread. torch's division on two
        intra-op threads was faster on an idle machine (10 windows: 0.49 against 0.83 ms),
        but an OpenMP team in the caller's process stalls whenever another process takes one
        of its cores, and hangs in a forked child. Without a cache, ``stored`` is the window
        read from the store (:meth:`_read_windows`), its channels split by OpenCV (several
        times faster than a permuted copy), each converted by :func:`unit_floats`."""
        cache = self.cache.get()
        if cache is None:  # the window as read (:meth:`_read_windows`)
            for channel, plane in enumerate(cv2.split(stored)):
                unit_floats(plane, out[channel])
            return
        channels_first = cache.get_or_load((name, frame), lambda: np.ascontiguousarray(
            self.reader.read(frame, (name,))[name].transpose(2, 0, 1)))
        window = channels_first[(slice(None), *region)]
        np.copyto(staging.numpy(), window)
        unit_floats(staging.numpy(), out)

    def _voxels_into(self, out: np.ndarray, frame: int, region: Region,
                     stored: np.ndarray | None) -> np.ndarray:
        """The (bins, h', w') voxels of the spike ``region`` (rows, columns) of one frame into
        ``out`` (float32); returns what they were made from (not zero where a voxel is not:
        the caller looks for a spike in it). Without a cache, ``stored`` is the window
        alone as read (:meth:`_read_windows`), summed straight into ``out`` when voxels are
        computed in real time; with one, a frame's voxels are read (and summed) once, whole,
        and kept, and the window is copied out of them contiguous before it is converted
        (gathering its rows first makes the conversion to float32 ~25% cheaper than
        converting straight from the frame)."""
        name = self._spike_field()
        cache = self.cache.get()
        if cache is None:  # the window as read (:meth:`_read_windows`)
            if name == "spike_vox":
                np.copyto(out, stored)
            else:
                spike_to_voxel(stored, self.bins, out=out)
            return stored

        def whole() -> np.ndarray:
            stored = self.reader.read(frame, (name,))[name]
            return stored if name == "spike_vox" else spike_to_voxel(stored, self.bins)

        window = np.ascontiguousarray(cache.get_or_load(("voxels", frame), whole)
                                      [(slice(None), *region)])
        np.copyto(out, window)
        return window

    def _spike_field(self) -> str:
        return "spike_vox" if self.voxels == "precomputed" else "spike"

    def _read_windows(self, frames: np.ndarray, image_region: Region,
                      spike_region: Region) -> dict[tuple[str, int], np.ndarray]:
        """Without a RAM cache, every window of a clip, read at once (from an object store,
        one round of requests for all of them, not one per window): (field, frame) -> the
        stored window. With a cache, nothing: frames are read whole, through it."""
        if self.cache.get() is not None:
            return {}
        asked = [(int(frame), name, image_region) for frame in frames
                 for name in ("blur", "sharp")]
        asked += [(int(frame), self._spike_field(), (slice(None), *spike_region))
                  for frame in frames]
        return {(name, frame): window for (frame, name, _), window
                in zip(asked, self.reader.read_regions(asked), strict=True)}

    def _windows(self, y: int, x: int) -> tuple[Region, Region]:
        """The image and spike windows of a crop at ``(y, x)``; whole frames without crops."""
        if self.crop_size is None:
            return ((slice(0, self.image_hw[0]), slice(0, self.image_hw[1])),
                    (slice(0, self.spike_hw[0]), slice(0, self.spike_hw[1])))
        return crop_windows(self.image_hw, self.spike_hw, self.crop_size, y, x)

    def _clip_arrays(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each tensor of an item (the same for every clip: a window's
        size does not depend on where it is)."""
        image_region, spike_region = self._windows(0, 0)
        (ch, cw), (sh, sw) = region_shape(image_region), region_shape(spike_region)
        t = self.clip_len
        return {"blur": ((t, 3, ch, cw), torch.float32), "sharp": ((t, 3, ch, cw), torch.float32),
                "spike_vox": ((t, self.bins, sh, sw), torch.float32),
                "crop_yx": ((2,), torch.int64)}

    def _fill(self, index: int, out: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Clip ``index`` written into the tensors ``out`` (see :meth:`_clip_arrays`), each
        window straight into its slot; returns the item's other values."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"clip {index} out of range: {len(self)} clips")
        index %= len(self)
        frames = self.clip_frames(index)
        y, x = self.crop_origin(index)
        image_region, spike_region = self._windows(y, x)
        voxels = out["spike_vox"].numpy()
        staging = torch.empty(out["blur"].shape[1:], dtype=torch.uint8)
        any_spike = False
        stored = self._read_windows(frames, image_region, spike_region)
        for k, frame in enumerate(frames):
            for name in ("blur", "sharp"):
                self._image_into(out[name][k], name, frame, image_region, staging,
                                 stored.get((name, int(frame))))
            source = self._voxels_into(voxels[k], frame, spike_region,
                                       stored.get((self._spike_field(), int(frame))))
            any_spike = any_spike or bool(source.any())
        out["crop_yx"][0], out["crop_yx"][1] = y, x
        self.stats["clips"] += 1
        if not any_spike:
            self.stats["all_zero_voxels"] += 1
            log.warning("clip %d (%s, frames %s): the spike voxels are all zero", index,
                        self._sequences[frames[0]], list(self._stems[frames]))
        return {"sequence": str(self._sequences[frames[0]]),
                "frames": [str(s) for s in self._stems[frames]]}

    @staticmethod
    def _item(tensors: Mapping[str, Any], others: Mapping[str, Any]) -> dict[str, Any]:
        return {"blur": tensors["blur"], "sharp": tensors["sharp"],
                "spike_vox": tensors["spike_vox"], "sequence": others["sequence"],
                "frames": others["frames"], "crop_yx": tensors["crop_yx"]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        out = {name: torch.empty(shape, dtype=dtype)
               for name, (shape, dtype) in self._clip_arrays().items()}
        return self._item(out, self._fill(index, out))

    def __getitems__(self, indices: Sequence[int]) -> Batched:
        """The clips ``indices`` written straight into one batch buffer (in a DataLoader
        worker a shared segment it reuses: :mod:`arraystore.loaders.shared_ring`). The batch equals
        ``default_collate`` of the items, which hands it on unchanged (a DataLoader's default
        ``collate_fn``); any other ``collate_fn`` gets the items."""
        buffers = allocate_arrays({name: ((len(indices), *shape), dtype)
                                   for name, (shape, dtype) in self._clip_arrays().items()})
        items = []
        for row, index in enumerate(indices):
            out = {name: buffer[row] for name, buffer in buffers.items()}
            items.append(self._item(out, self._fill(int(index), out)))
        others = default_collate([{"sequence": i["sequence"], "frames": i["frames"]}
                                  for i in items])
        return Batched(items, self._item(buffers, others), default_format=True)
