"""``SpikeClipDataset``: clips never span gaps or sequences, crops of images and spikes are the
same region, realtime voxels equal the precomputed ones and a reference from the .dat bytes, the
RAM cache stays inside its bound, and every error the seed named is a clear exception."""

from __future__ import annotations

import logging
import pickle
import shutil

import cv2
import numpy as np
import pytest
import torch
from conftest import LAYOUTS, assert_same_values, served
from test_gopro import GEOMETRY, IMAGE, SPIKE, reference_voxels
from torch.utils.data import DataLoader, default_collate

from arraystore import ingest
from arraystore.converters.gopro.source import GoproSpikeSource
from arraystore.errors import IncompatibleStoreError, OptionError
from arraystore.kinds.gopro_spike import spike_to_voxel
from arraystore.loaders import (
    MixSource,
    Mixture,
    NoValidSamplesError,
    SpikeClipDataset,
    dataloader_kwargs,
    timed,
)
from arraystore.loaders.frame_cache import FrameCache, worker_share
from arraystore.loaders.spike_clips import crop_windows, unit_floats
from arraystore.testing.gopro_trees import write_gopro_tree

SEQUENCES = {"train": {"A": 8, "B": 5, "C": 2}, "test": {"D": 6}}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_gopro_tree(tmp_path_factory.mktemp("clips") / "root", SEQUENCES, IMAGE, SPIKE,
                            seed=7)


@pytest.fixture(scope="module", params=["raw", "sharded", "sharded+zstd"])
def store(request, tmp_path_factory, tree):
    """The tree with frame 3 of sequence A left out (its .dat is broken): a gap."""
    out = tmp_path_factory.mktemp("store") / "gopro.zarr"
    broken = tmp_path_factory.mktemp("broken") / "root"  # pytest may set a param up twice
    shutil.copytree(tree, broken)
    (broken / "train" / "A" / "spike" / "000003.dat").write_bytes(b"short")
    ingest(GoproSpikeSource(voxels="precompute", **GEOMETRY), [broken], out,
           layout=LAYOUTS[request.param], workers=2, on_error="skip")
    return out


def make(store, **options) -> SpikeClipDataset:
    settings = {"split": "train", "clip_len": 3, "crop_size": 32, "ram_cache_gb": 0.0}
    return SpikeClipDataset(store, **{**settings, **options})


def test_clips_are_consecutive_frames_of_one_sequence(store) -> None:
    ds = make(store)
    # A: frames 0,1,2 | gap | 4..7 -> clips at 0 and 4,5; B: 0..4 -> 3 clips; C: 2 frames -> none
    clips = [(ds[i]["sequence"], ds[i]["frames"]) for i in range(len(ds))]
    assert clips == [
        ("A", ["000000", "000001", "000002"]), ("A", ["000004", "000005", "000006"]),
        ("A", ["000005", "000006", "000007"]), ("B", ["000000", "000001", "000002"]),
        ("B", ["000001", "000002", "000003"]), ("B", ["000002", "000003", "000004"]),
    ]
    strided = make(store, clip_stride=2)
    assert [(strided[i]["sequence"], strided[i]["frames"][0]) for i in range(len(strided))] == \
        [("A", "000000"), ("A", "000004"), ("B", "000000"), ("B", "000002")]
    assert len(make(store, split="all")) == 6 + 4  # test/D adds 4 clips
    assert len(make(store, clip_len=1)) == 7 + 5 + 2


def test_index_is_built_without_reading_a_frame(store, monkeypatch) -> None:
    from arraystore.reader import SampleReader

    def no_frame_reads(*args, **kwargs):
        raise AssertionError("a frame was read while building the index")

    monkeypatch.setattr(SampleReader, "read_region", no_frame_reads)
    monkeypatch.setattr(SampleReader, "read_regions", no_frame_reads)
    monkeypatch.setattr(SampleReader, "read", no_frame_reads)
    assert len(make(store)) == 6


def test_realtime_equals_precomputed_and_the_dat_reference(store, tree) -> None:
    realtime = make(store, crop_size=None, clip_len=1)
    precomputed = make(store, crop_size=None, clip_len=1, voxels="precomputed")
    for i in range(len(realtime)):
        a, b = realtime[i], precomputed[i]
        for key in ("blur", "sharp", "spike_vox"):
            assert torch.equal(a[key], b[key]), key
        dat = tree / "train" / a["sequence"] / "spike" / f"{a['frames'][0]}.dat"
        np.testing.assert_array_equal(a["spike_vox"][0].numpy(), reference_voxels(dat, 5))
    cropped = make(store), make(store, voxels="precomputed")
    for i in range(len(cropped[0])):
        assert torch.equal(cropped[0][i]["spike_vox"], cropped[1][i]["spike_vox"])


def test_item_shapes_dtypes_and_values(store, tree) -> None:
    ds = make(store, bins=2, crop_size=40)
    item = ds[1]
    assert item["blur"].shape == item["sharp"].shape == (3, 3, 40, 40)
    assert item["blur"].dtype == torch.float32 and item["blur"].is_contiguous()
    assert float(item["blur"].min()) >= 0.0 and float(item["blur"].max()) <= 1.0
    # spike window: round(40 * 40 / 72) = 22 rows, round(40 * 64 / 128) = 20 columns
    assert item["spike_vox"].shape == (3, 2, 22, 20)
    y, x = (int(v) for v in item["crop_yx"])
    sharp = cv2.cvtColor(cv2.imread(str(tree / "train" / item["sequence"] / "sharp" /
                                        f"{item['frames'][0]}.png")), cv2.COLOR_BGR2RGB)
    expected = torch.from_numpy(sharp[y:y + 40, x:x + 40]).permute(2, 0, 1).float() / 255
    assert torch.equal(item["sharp"][0], expected)


def test_crop_windows_follow_the_documented_rule() -> None:
    image, spike = (720, 1280), (396, 640)
    assert crop_windows(image, spike, 256, 0, 0) == (
        (slice(0, 256), slice(0, 256)), (slice(0, 141), slice(0, 128)))
    # floor(300 * 396 / 720) = 165, floor(1000 * 640 / 1280) = 500
    assert crop_windows(image, spike, 256, 300, 1000)[1] == (slice(165, 306), slice(500, 628))
    # the last origin: 464 * 396 / 720 = 255.2 -> 255, and 255 + 141 = 396 fits exactly
    assert crop_windows(image, spike, 256, 464, 1024)[1] == (slice(255, 396), slice(512, 640))
    # where rounding would overhang, the window moves back inside
    assert crop_windows((10, 10), (7, 7), 5, 5, 5)[1] == (slice(3, 7), slice(3, 7))


def test_image_and_spike_crops_show_the_same_region(store) -> None:
    """The generated spikes fire with the image's brightness: the voxel window must correlate
    with the image window shrunk to its size, and much better than with a shifted window."""
    ds = make(store, crop_size=48, clip_len=1, bins=1)
    aligned, shifted = [], []
    for i in range(len(ds)):
        item = ds[i]
        gray = item["sharp"][0].mean(0).numpy()
        density = item["spike_vox"][0, 0].numpy() / SPIKE[0]
        shrunk = cv2.resize(gray, density.shape[::-1], interpolation=cv2.INTER_AREA)
        coarse = (density.shape[1] // 2, density.shape[0] // 2)  # 2x2 blocks average the noise
        density = cv2.resize(density, coarse, interpolation=cv2.INTER_AREA)
        shrunk = cv2.resize(shrunk, coarse, interpolation=cv2.INTER_AREA)
        aligned.append(np.corrcoef(shrunk.ravel(), density.ravel())[0, 1])
        shifted.append(np.corrcoef(np.roll(shrunk, 4, axis=1).ravel(), density.ravel())[0, 1])
    # measured: 0.79 aligned against -0.12 shifted; binomial spike noise caps the former
    assert np.mean(aligned) > 0.7
    assert np.mean(aligned) > np.mean(shifted) + 0.5


def test_crops_are_reproducible_per_seed_epoch_and_index(store) -> None:
    a, b = make(store, seed=1), make(store, seed=1)
    assert [a.crop_origin(i) for i in range(len(a))] == [b.crop_origin(i) for i in range(len(b))]
    first = [a.crop_origin(i) for i in range(len(a))]
    a.set_epoch(1)
    assert [a.crop_origin(i) for i in range(len(a))] != first
    assert [make(store, seed=2).crop_origin(i) for i in range(len(a))] != first
    assert torch.equal(b[2]["blur"], make(store, seed=1)[2]["blur"])


def test_crop_origins_are_uniform_over_the_frame(store) -> None:
    ds = make(store, seed=3)
    draws = np.array([ds.crop_origin(i) for i in range(20000)])
    for axis, size in enumerate(ds.image_hw):
        span = size - ds.crop_size + 1
        assert draws[:, axis].min() == 0 and draws[:, axis].max() == span - 1
        counts = np.bincount(draws[:, axis], minlength=span)
        chi2 = np.sum((counts - counts.mean()) ** 2 / counts.mean())
        assert chi2 < (span - 1) + 4 * np.sqrt(2 * (span - 1)), counts  # ~4 sigma
    assert abs(np.corrcoef(draws[:, 0], draws[:, 1])[0, 1]) < 0.05  # y and x independent


def test_unit_floats_are_torchs_division_bit_for_bit() -> None:
    frame = np.arange(3 * 40 * 300, dtype=np.int64).astype(np.uint8).reshape(3, 40, 300)
    plane = frame[1, 5:37, 7:263]  # rows strided, as a window of a cached frame
    out = torch.full((32, 256), -1.0)
    unit_floats(plane, out)
    assert torch.equal(out, torch.from_numpy(np.ascontiguousarray(plane)) / 255.0)
    every = torch.empty(1, 256)
    unit_floats(np.arange(256, dtype=np.uint8).reshape(1, 256), every)
    assert torch.equal(every, torch.arange(256, dtype=torch.uint8).reshape(1, 256) / 255.0)


@pytest.mark.parametrize("frames", [10, 20])
@pytest.mark.parametrize("bins", [1, 2, 5, 10])
def test_voxels_summed_into_floats_equal_the_uint16_definition(frames: int, bins: int) -> None:
    """``spike_to_voxel(..., out=)`` (how realtime clips sum straight into their float32
    tensor) gives the uint16 sums' values, whatever the frames per bin, on strided windows."""
    spike = np.random.default_rng(bins).integers(0, 256, (frames, 40, 70)).astype(np.uint8)
    window = spike[:, 3:37, 5:69]
    sums = spike_to_voxel(window, bins)
    assert sums.dtype == np.uint16
    np.testing.assert_array_equal(
        sums, window.reshape(bins, frames // bins, 34, 64).sum(axis=1, dtype=np.int64))
    into = np.full((bins, 34, 64), -1, np.float32)
    assert spike_to_voxel(window, bins, out=into) is into
    np.testing.assert_array_equal(into, sums.astype(np.float32))


def test_cache_never_exceeds_its_bound_and_serves_the_same_items(store, torch_threads) -> None:
    frame_bytes = 2 * IMAGE[0] * IMAGE[1] * 3 + int(np.prod(SPIKE))
    bound = 4 * frame_bytes  # fewer frames than a clip pass touches: evictions happen
    cached = make(store, ram_cache_gb=bound / 2**30)
    plain = make(store)
    for _ in range(2):
        for i in range(len(cached)):
            got, expected = cached[i], plain[i]
            for key in ("blur", "sharp", "spike_vox"):
                assert torch.equal(got[key], expected[key])
            cache = cached.cache.get()
            assert cache.nbytes <= cache.capacity <= bound
            assert cache.nbytes == sum(v.nbytes for v in cache._items.values())
    assert cache.hits > 0 and cache.misses > 0


def test_frame_cache_is_lru_in_bytes() -> None:
    cache = FrameCache(100)
    cache.put("a", np.zeros(40, np.uint8))
    cache.put("b", np.zeros(40, np.uint8))
    cache.get("a")
    cache.put("c", np.zeros(40, np.uint8))  # evicts b, the least recently used
    assert set(cache._items) == {"a", "c"} and cache.nbytes == 80
    cache.put("huge", np.zeros(101, np.uint8))
    assert "huge" not in cache._items and cache.nbytes == 80


class _Share(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return worker_share(1000)


def test_the_budget_is_split_across_dataloader_workers() -> None:
    assert worker_share(1000) == 1000
    shares = list(DataLoader(_Share(), batch_size=None, num_workers=2))
    assert shares == [500, 500]


@pytest.mark.parametrize("options", [{}, {"crop_size": None}, {"voxels": "precomputed"},
                                     {"ram_cache_gb": 0.01}])
def test_a_batch_read_at_once_equals_default_collate_of_its_items(store, options) -> None:
    ds = make(store, **options)
    indices = [2, 0, 3, 3]
    batched = ds.__getitems__(indices)
    expected = default_collate([ds[i] for i in indices])
    assert default_collate(batched) is batched.batch  # a DataLoader's default collate_fn
    assert_same_values(batched.batch, expected, str(options))
    assert_same_values(default_collate(list(batched)), expected, "the items, collated again")
    for item, index in zip(batched, indices, strict=True):
        assert_same_values(dict(item), ds[index], f"item {index}")


def test_dataloader_with_workers_and_timed(store) -> None:
    ds = make(store, ram_cache_gb=0.01)
    kwargs = dataloader_kwargs(total_workers=2, gpus=1, pin_memory=False)
    assert kwargs["prefetch_factor"] == 4
    assert dataloader_kwargs(total_workers=2, train=False)["prefetch_factor"] == 2
    loader = DataLoader(ds, batch_size=2, **{**kwargs, "multiprocessing_context": "spawn"})
    steps = list(timed(loader))
    assert len(steps) == 3
    batch, data_time = steps[0]
    assert batch["blur"].shape == (2, 3, 3, 32, 32) and data_time >= 0
    assert batch["crop_yx"].shape == (2, 2) and batch["sequence"] == ["A", "A"]
    for number, (got, _) in enumerate(steps):  # read in the workers, the same as here
        assert_same_values(got, default_collate([ds[i] for i in range(2 * number,
                                                               min(2 * number + 2, len(ds)))]))
    assert len(pickle.dumps(ds)) < 20_000


def test_all_zero_voxels_are_returned_and_counted(tmp_path, caplog) -> None:
    root = write_gopro_tree(tmp_path / "dark", {"train": {"s": 2}}, IMAGE, SPIKE)
    for dat in (root / "train" / "s" / "spike").iterdir():
        dat.write_bytes(bytes(int(np.prod(SPIKE))))
    out = tmp_path / "dark.zarr"
    ingest(GoproSpikeSource(**GEOMETRY), [root], out, workers=1)
    ds = SpikeClipDataset(out, clip_len=2, crop_size=16, ram_cache_gb=0)
    with caplog.at_level(logging.WARNING):
        item = ds[0]
    assert not item["spike_vox"].any()
    assert ds.stats["all_zero_voxels"] == 1 and "all zero" in caplog.text


def test_errors_the_seed_named(store, tmp_path) -> None:
    with pytest.raises(NoValidSamplesError,
                       match=r"No valid samples found in .* split 'train' with clip_len 9"):
        make(store, clip_len=9)
    with pytest.raises(NoValidSamplesError, match="split 'val'"):
        make(store, split="val")
    root = write_gopro_tree(tmp_path / "novox", {"train": {"s": 2}}, IMAGE, SPIKE)
    ingest(GoproSpikeSource(**GEOMETRY), [root], tmp_path / "n.zarr", workers=1)
    with pytest.raises(OptionError, match=r"no precomputed voxels.*--voxels precompute"):
        SpikeClipDataset(tmp_path / "n.zarr", voxels="precomputed")
    with pytest.raises(OptionError, match="holds voxels of 5 bins"):
        make(store, voxels="precomputed", bins=2)
    with pytest.raises(OptionError, match="does not divide"):
        make(store, bins=3)
    with pytest.raises(OptionError, match="crop_size=100 does not fit"):
        make(store, crop_size=100)
    with pytest.raises(OptionError, match="voxels='cached'"):
        make(store, voxels="cached")


def test_other_kinds_are_refused(layout_store) -> None:
    _, path = layout_store
    with pytest.raises(IncompatibleStoreError, match="SpikeClipDataset reads 'gopro_spike'"):
        SpikeClipDataset(path)


def test_a_saved_state_draws_the_same_crops_again(store) -> None:
    """The state (torchdata's Stateful, also through a Mixture) holds what decides an
    epoch's crops."""
    ds = make(store, seed=5)
    ds.set_epoch(3)
    origins = [ds.crop_origin(i) for i in range(len(ds))]
    resumed = make(store, seed=5)
    resumed.load_state_dict(pickle.loads(pickle.dumps(ds.state_dict())))
    assert [resumed.crop_origin(i) for i in range(len(resumed))] == origins
    mixture = Mixture([MixSource(make(store, seed=5), dataset_type="spike")])
    mixture.set_epoch(3)
    assert mixture.state_dict() == {"sources": {"spike": ds.state_dict()}}
    fresh = Mixture([MixSource(make(store, seed=5), dataset_type="spike")])
    fresh.load_state_dict(mixture.state_dict())
    assert fresh.datasets[0].epoch == 3
    with pytest.raises(OptionError, match="not this dataset's"):
        make(store, seed=6).load_state_dict(ds.state_dict())


def test_a_stateful_dataloader_resumes_the_clips_and_their_crops(store) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader(ds):
        ds.set_epoch(2)
        return StatefulDataLoader(ds, batch_size=2, shuffle=True,  # workers: test_resume.py
                                  generator=torch.Generator().manual_seed(4))

    expected = [(b["crop_yx"], b["blur"]) for b in loader(make(store, seed=5))]
    interrupted = loader(make(store, seed=5))
    received = [(b["crop_yx"], b["blur"]) for _, b in zip(range(2), interrupted, strict=False)]
    state = interrupted.state_dict()
    resumed = loader(make(store, seed=5))
    resumed.load_state_dict(state)
    got = received + [(b["crop_yx"], b["blur"]) for b in resumed]
    assert len(got) == len(expected)
    for (crops, blur), (want_crops, want_blur) in zip(got, expected, strict=True):
        assert torch.equal(crops, want_crops) and torch.equal(blur, want_blur)


def test_clips_from_an_object_store_fetch_only_their_windows(store, region, request) -> None:
    layout = request.node.callspec.params["store"]
    if "zstd" in layout:
        pytest.skip("compressed chunks are read whole (TensorStore)")
    shutil.copytree(store, region.root / "stores" / f"gopro-{layout}.zarr", dirs_exist_ok=True)
    remote = make(f"s3://stores/gopro-{layout}.zarr", storage_options=region.storage_options())
    indices = [2, 0, 3]
    got = []
    windows = served(region, lambda: got.append(remote.__getitems__(indices)))
    assert_same_values(got[0].batch, make(store).__getitems__(indices).batch)
    frames = sorted({f for i in indices for f in remote.clip_frames(i)})
    spikes = "spike_vox" if remote.voxels == "precomputed" else "spike"
    whole = served(region, lambda: [remote.reader.read(f, ("blur", "sharp", spikes))
                                    for f in frames])
    assert windows["bytes"] < 0.6 * whole["bytes"]
