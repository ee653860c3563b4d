"""Embedding benchmark (SEEDS.md 001): ``ingest coco-embeddings`` with the real ViT-B-16-SigLIP
architecture at random weights, batch 1 vs 8 vs 32, against a direct loop that crops and calls
the model one segment at a time (decoding each image once); the model stage's idle time; the
model alone per batch size (what batching can give on this device); ``EmbeddingTable`` build
time and lookups/s at 10^6 rows; bytes and files on disk against the ``.npy`` cache.

Usage: python -m benchmarks.embeddings [--images 6] [--device cpu] [-h for the rest]
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from arraystore import Layout, Store, ingest
from arraystore.info import store_info
from arraystore.store import COMMITTED_ARRAY, SAMPLE_ARRAY
from benchmarks.data import fill_store
from benchmarks.report import command_line, machine, plot_bars, save_report
from converters.coco_panoptic.crops import crop_segment, segment_ids
from converters.coco_panoptic.embedder import SiglipEmbedder, image_transform
from converters.coco_panoptic.fields import embeddings_schema
from converters.coco_panoptic.source import CocoEmbeddingsSource
from converters.coco_panoptic.tree_writer import write_coco_panoptic
from converters.coco_panoptic.vis_cache import TsvExporter
from loaders import EmbeddingTable

MODEL = "ViT-B-16-SigLIP"


def save_random_weights(path: Path) -> Path:
    from safetensors.torch import save_file

    embedder = SiglipEmbedder(MODEL, None)
    save_file({k: v.contiguous() for k, v in embedder.model.state_dict().items()
               if k.startswith("visual.")}, str(path))
    return path


def direct_loop(root: Path, doc: dict, embedder: SiglipEmbedder) -> tuple[int, float]:
    """The seed's way: per image decode once, then crop, preprocess and embed each segment
    alone (batch 1). (segments, seconds)"""
    from PIL import Image

    transform = image_transform(MODEL, "webli")
    start, count = time.perf_counter(), 0
    for annotation in doc["annotations"]:
        stem = f"{annotation['image_id']:012d}"
        image = cv2.cvtColor(cv2.imread(str(root / "val2017" / f"{stem}.jpg")),
                             cv2.COLOR_BGR2RGB)
        ids = segment_ids(cv2.cvtColor(cv2.imread(str(root / "panoptic_val2017" /
                                                      f"{stem}.png")), cv2.COLOR_BGR2RGB))
        for info in annotation["segments_info"]:
            crop = crop_segment(image, ids == info["id"], 0.1, 0.3)
            if crop is not None:
                embedder(transform(Image.fromarray(crop.pixels)).numpy()[None])
                count += 1
    return count, time.perf_counter() - start


def model_alone(embedder: SiglipEmbedder, batch: int, rounds: int = 3) -> float:
    """ms per segment of ``encode_image`` alone at ``batch``."""
    pixels = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), np.float32)
    embedder.batch_size = batch
    embedder(pixels)
    start = time.perf_counter()
    for _ in range(rounds):
        embedder(pixels)
    return (time.perf_counter() - start) / (rounds * batch) * 1e3


def big_table(path: Path, rows: int, width: int = 768) -> Path:
    """A ``mask_embeddings`` store of ``rows`` random rows, written in bulk."""
    rng = np.random.default_rng(0)
    store = Store.create(path, embeddings_schema(width), Layout(block_size=4096))
    image_ids = np.repeat(np.arange(rows // 8 + 1) * 7 + 9, 8)[:rows]
    segment_ids_ = rng.integers(0, 1 << 24, rows)
    vectors = rng.standard_normal((rows, width)).astype(np.float16)
    values = {SAMPLE_ARRAY: np.char.add(np.char.add(image_ids.astype(str), "_"),
                                        segment_ids_.astype(str)).astype(
                                            np.dtypes.StringDType()),
              COMMITTED_ARRAY: np.ones(rows, bool), "embedding": vectors,
              "image_id": image_ids, "segment_id": segment_ids_,
              "category_id": rng.integers(1, 200, rows).astype(np.int32),
              "area": rng.integers(1, 10_000, rows), "bbox": np.zeros((rows, 4), np.float32),
              "crop_box": np.zeros((rows, 4), np.int32)}
    fill_store(store, values)
    return path


def lookups(path: Path, count: int) -> tuple[float, float, float, float]:
    """(seconds to open the table: id columns and map; seconds to load its embeddings into
    RAM; get()/s; for_image()/s)."""
    start = time.perf_counter()
    EmbeddingTable(path, in_memory=False)
    built = time.perf_counter() - start
    start = time.perf_counter()
    table = EmbeddingTable(path, in_memory=True)
    loaded = time.perf_counter() - start - built
    rng = np.random.default_rng(1)
    rows = rng.integers(0, len(table), count)
    pairs = [(int(table.image_ids[r]), int(table.segment_ids[r])) for r in rows]
    start = time.perf_counter()
    for image_id, segment_id in pairs:
        table.get(image_id, segment_id)
    gets = count / (time.perf_counter() - start)
    start = time.perf_counter()
    for image_id, _ in pairs:
        table.for_image(image_id)
    return built, loaded, gets, count / (time.perf_counter() - start)


def tree_usage(folder: Path) -> tuple[int, int, int]:
    """(bytes, bytes allocated on disk, files) under ``folder``."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return (sum(p.stat().st_size for p in files), sum(p.stat().st_blocks * 512 for p in files),
            len(files))


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--segments", type=int, default=5, help="segments per image")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--table-rows", type=int, default=1_000_000)
    parser.add_argument("--disk-rows", type=int, default=20_000,
                        help="rows of the store exported to .npy files for the disk table")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--name", default="embeddings")
    args = parser.parse_args()
    results: dict = {"ingest": {}, "model": {}}
    with tempfile.TemporaryDirectory(prefix="arraystore-emb-", dir=args.workdir) as tmp:
        root = Path(tmp)
        doc = write_coco_panoptic(root / "coco", images=args.images,
                                  segments_per_image=args.segments)
        weights = save_random_weights(root / "weights.safetensors")
        embedder = SiglipEmbedder(MODEL, weights, device=args.device)
        print("model alone ...", flush=True)
        for batch in (1, 8, 32):
            results["model"][batch] = model_alone(embedder, batch)
        print("direct loop ...", flush=True)
        embedder.batch_size = 1
        results["loop"] = direct_loop(root / "coco", doc, embedder)
        del embedder
        for batch in (1, 8, 32):
            print(f"ingest, batch {batch} ...", flush=True)
            start = time.perf_counter()
            report = ingest(CocoEmbeddingsSource(weights=str(weights), batch_size=batch,
                                                 device=args.device),
                            [root / "coco"], root / f"b{batch}.zarr", workers=1)
            results["ingest"][batch] = (report.ingested, time.perf_counter() - start,
                                        report.stage_seconds, report.waiting_seconds)
        print("lookups ...", flush=True)
        results["lookups"] = lookups(big_table(root / "big.zarr", args.table_rows), 20_000)
        small = big_table(root / "disk.zarr", args.disk_rows)
        TsvExporter().export(small, root / "npy")
        info = store_info(small)
        results["disk"] = {"store (this layout)": (info.bytes_on_disk, sum(
            p.stat().st_blocks * 512 for p in small.rglob("*") if p.is_file()), info.files),
            ".npy cache + inst2feat.tsv": tree_usage(root / "npy")}
    print(write_report(args, results, Path(__file__).parent / "results" / args.name))


def write_report(args: argparse.Namespace, results: dict, stem: Path) -> str:
    cmd = command_line("embeddings", vars(args))
    segments, loop_seconds = results["loop"]
    loop_rate = segments / loop_seconds
    rows = []
    for batch, (count, wall, stage, waiting) in results["ingest"].items():
        loop_time = stage + waiting  # the writer's loop once the model is up
        rows.append((batch, count, count / wall, count / loop_time, waiting / loop_time,
                     count / loop_time / loop_rate))
    best = max(r[5] for r in rows)
    model = results["model"]
    built, loaded, gets, images = results["lookups"]
    lines = [
        "# Embedding benchmark: `ingest coco-embeddings` (ViT-B-16-SigLIP, random weights)",
        "",
        f"- machine: {machine()}; device {args.device}",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"- command: `{cmd}`",
        f"- data: {args.images} scikit-image photographs, {segments} segments; 1 decode worker; "
        f"the model in the writer process",
        "",
        "## Targets",
        "",
        "| target | goal | measured | |",
        "|---|---:|---:|---|",
        f"| batched ingest vs the one-at-a-time loop | ≥ 3× | {best:.2f}× | "
        f"{'met' if best >= 3 else '**missed**'} |",
        f"| the model stage never waits on decoding (share of the writer's loop spent "
        f"waiting, batch 32) | ≈ 0 | {rows[-1][4]:.1%} | |",
        f"| EmbeddingTable map from the id arrays, {args.table_rows:,} rows | < 1 s | "
        f"{built:.2f} s | "
        f"{'met' if built < 1 else '**missed**'} |",
        "",
        "## Ingest",
        "",
        "| batch | segments | segments/s (wall, model load included) | segments/s (loop) | "
        "waiting on workers | × direct loop |",
        "|---:|---:|---:|---:|---:|---:|",
        *(f"| {b} | {n} | {w:.2f} | {r:.2f} | {idle:.1%} | {x:.2f} |"
          for b, n, w, r, idle, x in rows),
        f"| direct loop (batch 1, one process) | {segments} | | {loop_rate:.2f} | | 1.00 |",
        "",
        "## Why: the model alone",
        "",
        "| batch | ms per segment (`encode_image`) |",
        "|---:|---:|",
        *(f"| {b} | {ms:.0f} |" for b, ms in model.items()),
        "",
        f"On this device the image tower costs {model[1]:.0f} ms a segment at batch 1 and "
        f"{model[32]:.0f} ms at batch 32: the CPU is compute-bound already at batch 1, so "
        f"batching can win at most {model[1] / model[32]:.2f}× and the pipeline (decode in a "
        f"worker while the model runs) only hides decoding, a few ms a segment. The 3× target "
        f"needs a device where batch 1 leaves the hardware idle (a GPU: run this benchmark "
        f"with `--device cuda:0`).",
        "",
        "## Lookups",
        "",
        f"`EmbeddingTable` over {args.table_rows:,} rows: id columns read and hash map built "
        f"in {built:.2f} s (vectorised, no per-row Python); the embeddings loaded into RAM in "
        f"a further {loaded:.2f} s ({args.table_rows * 768 * 2 / 1e9:.1f} GB; tables above 2 "
        f"GiB read blocks of rows instead); `get` {gets:,.0f}/s; `for_image` "
        f"{images:,.0f}/s.",
        "",
        f"## On disk ({args.disk_rows:,} rows of 768 float16)",
        "",
        "| format | bytes | allocated on disk | files |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {b / 1e6:.1f} MB | {a / 1e6:.1f} MB | {f:,} |"
          for name, (b, a, f) in results["disk"].items()),
        "",
        f"![plot]({stem.name}.png)",
        "",
    ]
    text = save_report(lines, stem)
    loop_name = "direct loop, batch 1"
    bars = {loop_name: loop_rate, **{f"ingest, batch {b}": r for b, _, _, r, _, _ in rows}}
    plot_bars([("segments/s once the model is loaded", bars)], stem.with_suffix(".png"),
              "segments/s (higher is faster)", grey=(loop_name,), reference=None)
    return text


if __name__ == "__main__":
    main()
