"""Per-segment SigLIP embeddings of COCO panoptic (docs/formats.md): every stored embedding equals
a direct call of a real, random-weight ViT-B-16-SigLIP on the crop computed here from the
definition; the preprocessing is the pretrained tag's; resume; the old cache both ways; lookups."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from arraystore import SampleReader, Store, ingest
from arraystore.compat import ensure_torchvision_ops
from arraystore.converters.coco_panoptic.embedder import (
    EmbedderError,
    SiglipEmbedder,
    image_transform,
)
from arraystore.converters.coco_panoptic.source import CocoEmbeddingsSource
from arraystore.converters.coco_panoptic.vis_cache import VisCacheSource
from arraystore.errors import OptionError, SourceError
from arraystore.loaders import EmbeddingTable, MaskEmbeddingDataset
from arraystore.testing.coco_panoptic_trees import ABSENT_SEGMENT, write_coco_panoptic
from tests.conftest import run_cli

pytestmark = pytest.mark.slow
MODEL = "ViT-B-16-SigLIP"
WEBLI = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # the numbers, not open_clip's


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("coco") / "coco"
    return root, write_coco_panoptic(root, "val2017", images=4, segments_per_image=3)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A random-weight image tower, saved as a local safetensors checkpoint (fp16 to stay
    small; loading widens it to the model's float32)."""
    ensure_torchvision_ops()
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, pretrained=None)
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()
             if k.startswith("visual.")}
    path = tmp_path_factory.mktemp("weights") / "open_clip_model.safetensors"
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory, coco, weights) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("store") / "coco_vis.zarr"
    report = ingest(CocoEmbeddingsSource(weights=str(weights), batch_size=4), [coco[0]], out,
                    workers=2)
    return out, report


def reference_crop(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, tuple]:
    """The issue's crop, written out again: tight box, round(0.1 * size) padding clipped to
    the image, background round(0.3 * value)."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    px, py = round(0.1 * (x1 - x0 + 1)), round(0.1 * (y1 - y0 + 1))
    top, bottom = max(0, y0 - py), min(image.shape[0] - 1, y1 + py)
    left, right = max(0, x0 - px), min(image.shape[1] - 1, x1 + px)
    crop = image[top:bottom + 1, left:right + 1].astype(np.float64)
    inside = mask[top:bottom + 1, left:right + 1]
    faded = np.where(inside[..., None], crop, np.round(0.3 * crop)).astype(np.uint8)
    return faded, (int(left), int(top), int(right) + 1, int(bottom) + 1)


def test_every_embedding_equals_a_direct_call_on_the_crop(store, coco, weights) -> None:
    out, report = store
    root, doc = coco
    ensure_torchvision_ops()
    import open_clip
    from PIL import Image
    from safetensors.torch import load_file

    model = open_clip.create_model(MODEL, pretrained=None)
    model.load_state_dict(load_file(str(weights)), strict=False)
    model.eval()
    preprocess = open_clip.image_transform(224, is_train=False, interpolation="bicubic",
                                           resize_mode="squash", **WEBLI)
    reader = SampleReader(out)
    rows = {(int(r["image_id"]), int(r["segment_id"])): r
            for r in (reader.read(i) for i in range(len(reader)))}
    expected_rows = 0
    for annotation in doc["annotations"]:
        image_id = annotation["image_id"]
        rgb = cv2.cvtColor(cv2.imread(str(root / "val2017" / f"{image_id:012d}.jpg")),
                           cv2.COLOR_BGR2RGB)
        png = cv2.cvtColor(cv2.imread(str(root / "panoptic_val2017" / f"{image_id:012d}.png")),
                           cv2.COLOR_BGR2RGB).astype(np.int64)
        ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
        for info in annotation["segments_info"]:
            mask = ids == info["id"]
            if not mask.any():
                assert (image_id, info["id"]) not in rows  # never an all-background crop
                continue
            expected_rows += 1
            row = rows[(image_id, info["id"])]
            crop, box = reference_crop(rgb, mask)
            with torch.inference_mode():
                direct = model.encode_image(preprocess(Image.fromarray(crop))[None])
            direct = torch.nn.functional.normalize(direct, dim=-1)[0].numpy()
            stored = row["embedding"].astype(np.float64)
            assert row["embedding"].dtype == np.float16 and stored.shape == (768,)
            assert abs(np.linalg.norm(stored) - 1) < 1e-3
            assert stored @ direct / np.linalg.norm(stored) >= 0.999
            assert tuple(row["crop_box"]) == box and row["area"] == mask.sum()
            assert row["category_id"] == info["category_id"]
            np.testing.assert_array_equal(row["bbox"], np.float32(info["bbox"]))
    assert len(reader) == expected_rows
    assert report.stage_seconds > 0


def test_absent_segment_is_reported_and_tiny_ones_kept(store) -> None:
    out, report = store
    assert [(s.sample_id, s.reason) for s in report.skipped] == [
        (f"397133_{ABSENT_SEGMENT}", "segment listed in the JSON but absent from the PNG")]
    table = EmbeddingTable(out)
    assert table.get(397133, 0x030201).shape == (768,)  # the one-pixel segment
    assert len(table.for_image(400133)[0]) == 0  # the image without segments


def test_width_and_attributes_come_from_the_model(store, weights) -> None:
    out, _ = store
    opened = Store.open(out)
    assert opened.kind == "mask_embeddings" and opened.schema["embedding"].shape == (768,)
    attrs = opened.meta["extra"]["embeddings"]
    assert attrs["model"] == MODEL and attrs["pretrained_tag"] == "webli"
    assert attrs["bg_alpha"] == 0.3 and attrs["pad_ratio"] == 0.1
    assert attrs["preprocessing"] == {"mean": [0.5] * 3, "std": [0.5] * 3,
                                      "interpolation": "bicubic", "resize_mode": "squash"}
    from arraystore.converters.sa1b.teacher import file_sha256

    assert opened.provenance["embedder"]["weights_sha256"] == file_sha256(weights)


def test_preprocessing_is_the_pretrained_tags_not_the_untagged_default() -> None:
    ensure_torchvision_ops()
    import open_clip

    ours = image_transform(MODEL, "webli")
    _, _, untagged = open_clip.create_model_and_transforms(MODEL, pretrained=None)
    names = [type(t).__name__ for t in ours.transforms]
    assert "CenterCrop" not in names and "CenterCrop" in [type(t).__name__
                                                          for t in untagged.transforms]
    resize = ours.transforms[0]
    assert tuple(resize.size) == (224, 224) and resize.interpolation.value == "bicubic"
    normalize = ours.transforms[-1]
    assert tuple(normalize.mean) == (0.5,) * 3 and tuple(normalize.std) == (0.5,) * 3


def test_embedding_table_lookups(store) -> None:
    out, _ = store
    reader = SampleReader(out)
    table = EmbeddingTable(out)
    assert len(table) == len(reader)
    for index in range(len(reader)):
        row = reader.read(index)
        np.testing.assert_array_equal(table.get(row["image_id"], row["segment_id"]),
                                      row["embedding"])
    segments, embeddings = table.for_image(397133)
    assert len(segments) == embeddings.shape[0] == 4 and embeddings.dtype == np.float16
    with pytest.raises(KeyError, match="no embedding for image 397133, segment 5"):
        table.get(397133, 5)
    streamed = EmbeddingTable(out, in_memory=False)
    np.testing.assert_array_equal(streamed.for_image(397133)[1], embeddings)
    item = MaskEmbeddingDataset(out)[0]
    assert item["embedding"].dtype == torch.float32 and item["bbox"].shape == (4,)


def test_export_and_reimport_the_old_cache(store, tmp_path) -> None:
    out, _ = store
    cache = tmp_path / "vis_embed"
    result = run_cli("export", "tsv", str(out), str(cache))
    assert result.exit_code == 0, result.output
    lines = (cache / "inst2feat.tsv").read_text().splitlines()
    assert lines[0] == "image_id\tsegment_id\tfeat_file"
    assert lines[1].startswith("000000397133\t") and lines[1].endswith(".npy")
    name = lines[1].split("\t")[2]
    assert name.startswith("000000397133_") and np.load(cache / name).dtype == np.float16
    again = tmp_path / "again.zarr"
    result = run_cli("ingest", "vis-cache", str(cache), "--out", str(again))
    assert result.exit_code == 0, result.output
    first, second = SampleReader(out), SampleReader(again)
    assert list(first.sample_ids) == list(second.sample_ids)
    for name in ("embedding", "image_id", "segment_id"):
        np.testing.assert_array_equal(first.column(name), second.column(name))
    assert (second.column("category_id") == -1).all()  # the cache never had them
    cache2 = tmp_path / "vis_embed2"
    assert run_cli("export", "tsv", str(again), str(cache2)).exit_code == 0
    for path in cache.iterdir():
        assert (cache2 / path.name).read_bytes() == path.read_bytes(), path.name


def test_hostile_cache_rows_are_refused(tmp_path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    good = (np.ones(768) / np.sqrt(768)).astype(np.float16)
    np.save(root / "000000000001_1.npy", good)
    np.save(root / "pickled.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    np.save(root / "wide.npy", np.ones(512, np.float16))
    (tmp_path / "outside.npy").write_bytes((root / "000000000001_1.npy").read_bytes())
    os.symlink(tmp_path / "outside.npy", root / "link.npy")
    rows = [("1", "1", "000000000001_1.npy"), ("1", "2", "../outside.npy"),
            ("1", "3", str(tmp_path / "outside.npy")), ("1", "4", "pickled.npy"),
            ("1", "5", "wide.npy"), ("1", "6", "missing.npy"), ("1", "7", "link.npy")]
    (root / "inst2feat.tsv").write_text("image_id\tsegment_id\tfeat_file\n" + "".join(
        "\t".join(r) + "\n" for r in rows))
    report = ingest(VisCacheSource(), [root], tmp_path / "c.zarr", workers=1, on_error="skip")
    assert report.ingested == 1
    reasons = {s.sample_id: s.reason for s in report.skipped}
    assert "leaves" in reasons["1_2"] and "leaves" in reasons["1_3"] and "leaves" in reasons["1_7"]
    assert "never unpickled" in reasons["1_4"]
    assert "shape (512,)" in reasons["1_5"] and "unreadable" in reasons["1_6"]
    (root / "inst2feat.tsv").write_text("id\tsegment\tfile\n")
    with pytest.raises(SourceError, match="header must be"):
        ingest(VisCacheSource(), [root], tmp_path / "d.zarr", workers=1)


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from arraystore import Layout, ingest
    from arraystore.converters.coco_panoptic.source import CocoEmbeddingsSource
    if __name__ == "__main__":
        root, weights, out = sys.argv[1:]
        ingest(CocoEmbeddingsSource(weights=weights, batch_size=1), [root], out,
               layout=Layout(block_size=2), workers=1)
""")


def test_resume_after_kill_equals_one_run(coco, weights, store, tmp_path) -> None:
    out = tmp_path / "killed.zarr"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script), str(coco[0]), str(weights),
                                str(out)], env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
        try:
            if Store.open(out).num_committed() >= 4:
                break
        except Exception:  # not created yet
            continue
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = Store.open(out).num_committed()
    assert 4 <= committed < len(SampleReader(store[0])), committed
    report = ingest(CocoEmbeddingsSource(weights=str(weights), batch_size=1), [coco[0]], out,
                    workers=1)
    assert report.already_stored >= committed  # whole images skipped before decoding
    resumed, reference = SampleReader(out), SampleReader(store[0])
    assert list(resumed.sample_ids) == list(reference.sample_ids)
    for name in ("image_id", "segment_id", "category_id", "area", "bbox", "crop_box"):
        np.testing.assert_array_equal(resumed.column(name), reference.column(name))
    a = resumed.column("embedding").astype(np.float64)
    b = reference.column("embedding").astype(np.float64)
    assert (np.sum(a * b, axis=1) > 0.9999).all()  # batch 1 vs 4: float rounding only


def test_errors_name_the_cause(coco, weights, tmp_path) -> None:
    root = coco[0]
    with pytest.raises(OptionError, match="--weights FILE is required"):
        ingest(CocoEmbeddingsSource(), [root], tmp_path / "a.zarr")
    with pytest.raises(EmbedderError, match="weights file not found"):
        SiglipEmbedder(MODEL, tmp_path / "nope.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(EmbedderError, match="cannot be read"):
        SiglipEmbedder(MODEL, garbage)
    with pytest.raises(EmbedderError, match="no pretrained configuration 'laion'"):
        ingest(CocoEmbeddingsSource(weights=str(weights), pretrained_tag="laion"), [root],
               tmp_path / "b.zarr")
    with pytest.raises(SourceError, match=r"panoptic_train2017\.json"):
        ingest(CocoEmbeddingsSource(weights=str(weights), split="train2017"), [root],
               tmp_path / "c.zarr")
    assert not (tmp_path / "b.zarr").exists() and not (tmp_path / "c.zarr").exists()


SHIM_SCRIPT = textwrap.dedent("""
    import torch
    from arraystore.compat import ensure_torchvision_ops, native_ops_load
    native = native_ops_load()
    applied = ensure_torchvision_ops()
    assert applied == (not native), (native, applied)
    assert ensure_torchvision_ops() is False  # once only
    import torchvision, open_clip  # both import now
    try:
        torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
        called = True
    except Exception:
        called = False
    print(native, applied, called)
""")


def test_torchvision_shim_only_when_the_native_ops_are_missing() -> None:
    result = subprocess.run([sys.executable, "-c", SHIM_SCRIPT], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0, result.stderr[-2000:]
    native, applied, called = result.stdout.split()
    if native == "False":  # this machine: a CUDA torchvision beside the CPU torch
        assert applied == "True" and called == "False"  # declared, never implemented


def test_ingest_command_line(coco, weights, tmp_path) -> None:
    out = tmp_path / "cli.zarr"
    result = run_cli("ingest", "coco-embeddings", str(coco[0]), "--split",
                                      "val2017", "--out", str(out), "--model", MODEL,
                                      "--weights", str(weights), "--batch-size", "8",
                                      "--bg-alpha", "0.5", "--pad-ratio", "0", "--workers", "1")
    assert result.exit_code == 0, result.output
    segments = sum(len(a["segments_info"]) for a in coco[1]["annotations"]) - 1  # one absent
    assert f"{segments} samples ingested" in result.output and "1 skipped" in result.output
    assert "initialized randomly" not in result.output
    crop_boxes = SampleReader(out).column("crop_box")
    assert json.loads(json.dumps(Store.open(out).meta["extra"]))["embeddings"]["bg_alpha"] == 0.5
    assert len(crop_boxes) == segments
    assert len(pickle.dumps(EmbeddingTable(out, in_memory=False))) < 2_000_000


def test_reimport_with_the_annotations_brings_back_category_area_and_box(store, coco,
                                                                         tmp_path) -> None:
    """An old cache has only embeddings; ``--annotations`` (the panoptic JSON it was made
    from) gives every row its category, area and box back, as the direct ingest has them."""
    out, _ = store
    cache = tmp_path / "vis_embed"
    assert run_cli("export", "tsv", str(out), str(cache)).exit_code == 0
    again = tmp_path / "again.zarr"
    annotations = coco[0] / "annotations" / "panoptic_val2017.json"
    result = run_cli("ingest", "vis-cache", str(cache), "--out", str(again),
                                      "--annotations", str(annotations))
    assert result.exit_code == 0, result.output
    first, second = SampleReader(out), SampleReader(again)
    for name in ("category_id", "area", "bbox", "embedding"):
        np.testing.assert_array_equal(first.column(name), second.column(name), name)
    assert (second.column("category_id") >= 0).all()
    assert (second.column("crop_box") == -1).all()  # not recoverable from a cache
    missing = run_cli("ingest", "vis-cache", str(cache), "--out",
                                       str(tmp_path / "x.zarr"), "--annotations",
                                       str(tmp_path / "nope.json"))
    assert missing.exit_code != 0 and "nope.json" in missing.output
    assert "Traceback" not in missing.output and not (tmp_path / "x.zarr").exists()


def test_mask_embedding_rows_carry_area_and_crop_box(store) -> None:
    out, _ = store
    rows, reader = MaskEmbeddingDataset(out), SampleReader(out)
    assert len(rows) == len(reader)
    for index in (0, len(rows) - 1):
        row = rows[index]
        assert set(row) == {"embedding", "image_id", "segment_id", "category_id", "area",
                            "bbox", "crop_box"}
        assert row["area"] == int(reader.column("area")[index]) > 0
        assert row["crop_box"].dtype == torch.float32
        np.testing.assert_array_equal(row["crop_box"].numpy(), reader.column("crop_box")[index])
    batch = next(iter(torch.utils.data.DataLoader(rows, batch_size=3)))
    assert batch["crop_box"].shape == (3, 4) and batch["area"].shape == (3,)


def test_show_draws_the_crops_the_model_was_fed(store, weights, tmp_path) -> None:
    """The second row of ``show``: one panel per row shown, each the crop cut again from the
    recorded COCO files and preprocessed as at ingest -- embedding it again gives the stored
    embedding (up to the uint8 rounding of the picture)."""
    from arraystore.converters.coco_panoptic.view import CROPS_SHOWN, CropCutter
    from arraystore.show import show

    out, _ = store
    reader = SampleReader(out)
    result = show(out, out=tmp_path / "emb.png")
    assert result.sample_ids == list(reader.sample_ids)  # "N samples drawn" counts the rows
    crops = [p for p in result.panels if p.row == 1]
    assert len(crops) == min(CROPS_SHOWN, len(reader))
    cutter = CropCutter(Store.open(out).meta)
    embedder = SiglipEmbedder(MODEL, weights)
    for index in (0, 3):
        row = reader.read(index)
        picture = cutter.model_input(row)
        assert picture.shape == (224, 224, 3) and picture.dtype == np.uint8
        pixels = (picture.transpose(2, 0, 1).astype(np.float32) / 255 - 0.5) / 0.5
        again = embedder(pixels[None])[0].astype(np.float64)
        stored = row["embedding"].astype(np.float64)
        assert again @ stored / np.linalg.norm(again) / np.linalg.norm(stored) > 0.99
    result = run_cli("show", str(out), "-o", str(tmp_path / "cli.png"))
    assert result.exit_code == 0 and f"{len(reader)} samples drawn" in result.output


def test_a_rerun_with_nothing_to_do_builds_no_model(store, coco, weights, tmp_path,
                                                    monkeypatch) -> None:
    import shutil

    out, _ = store
    copy = tmp_path / "copy.zarr"
    shutil.copytree(out, copy)

    def no_model(self):
        raise AssertionError("the model was built for a store that needs nothing")

    monkeypatch.setattr(CocoEmbeddingsSource, "batch_stage", no_model)
    report = ingest(CocoEmbeddingsSource(weights=str(weights)), [coco[0]], copy)
    assert report.ingested == 0 and len(report.units_already_done) == 1


def test_default_workers_leave_the_cores_to_a_cpu_model(monkeypatch) -> None:
    """Decode processes by where the model runs: none beside the writer for a CPU model (its
    threads take the cores), all cores but one for an accelerator, one per core without.
    (This machine has no GPU: torch is told it has one, as ``--device cuda:0`` is checked.)"""
    from arraystore.converters.sa1b.source import Sa1bTarSource
    from arraystore.sources import default_workers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert default_workers(CocoEmbeddingsSource(weights="w"), cores=8) == 1
    assert default_workers(CocoEmbeddingsSource(weights="w", device="cuda:0"), cores=8) == 7
    assert default_workers(CocoEmbeddingsSource(weights="w", device="cuda:0"), cores=1) == 1
    assert default_workers(Sa1bTarSource(), cores=8) == 8
    assert default_workers(Sa1bTarSource(teacher="sam2.1_hiera_t", weights="w"), cores=8) == 1


HOOK_SCRIPT = textwrap.dedent("""
    import site, sys
    if len(sys.argv) > 1:
        site.addsitedir(sys.argv[1])  # reads its .pth files, as the interpreter's start does
        exec(open(sys.argv[2]).read())  # read twice (it happens): still one hook
        hooks = [f for f in sys.meta_path if type(f).__name__ == "DeclareOpsOnImport"]
        assert len(hooks) <= 1, sys.meta_path
    import open_clip  # before anything of arraystore
    assert "arraystore" not in sys.modules and "converters" not in sys.modules
    print("imported")
""")


def test_a_users_script_imports_open_clip_first(tmp_path) -> None:
    """With the set-up's .pth hook, ``import open_clip`` works in a fresh interpreter before
    anything of this project is imported; the hook loads one file, not the package."""
    from arraystore.compat import HOOK_FILE, install_hook, native_ops_load

    hook = install_hook(str(tmp_path))
    assert hook == tmp_path / HOOK_FILE and hook.read_text().startswith("import ")
    env = {**os.environ, "PYTHONPATH": ""}
    run = [sys.executable, "-c", HOOK_SCRIPT]
    with_hook = subprocess.run([*run, str(tmp_path), str(hook)], capture_output=True, text=True,
                               timeout=180, env=env, cwd=tmp_path)
    assert with_hook.returncode == 0 and "imported" in with_hook.stdout, with_hook.stderr[-2000:]
    installed = Path(sysconfig.get_paths()["purelib"]) / HOOK_FILE
    if Path(sys.prefix) == Path(__file__).resolve().parent.parent / ".venv":
        assert installed.is_file()  # the README's set-up put the hook in its environment
    if not native_ops_load() and not installed.exists():  # the script fails without the hook
        without = subprocess.run(run, capture_output=True, text=True, timeout=180, env=env,
                                 cwd=tmp_path)
        assert without.returncode != 0 and "torchvision::nms" in without.stderr


def test_a_hook_whose_module_is_gone_stays_silent(tmp_path) -> None:
    """The ``.pth`` line of a checkout that moved or was deleted does nothing: no traceback at
    every interpreter start."""
    from arraystore.compat import hook_line

    (tmp_path / "gone.pth").write_text(hook_line(str(tmp_path / "moved" / "compat.py")))
    started = subprocess.run([sys.executable, "-c", f"import site; site.addsitedir("
                              f"{str(tmp_path)!r}); print('started')"],
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0 and started.stdout == "started\n", started.stderr
    assert started.stderr == ""
