"""Spike-clip benchmark: ``SpikeClipDataset`` (realtime and precomputed voxels, each with and
without the RAM cache) against the seed's folder path (``.dat`` + two PNG decodes per frame per
item, NumPy voxels), on generated data of the real sizes (720x1280 frames, 10x396x640 spikes).

Readers take turns in a random order every round (``benchmarks.run.interleaved``), single
process and through a DataLoader with 2 workers; ratios are within one run. Everything runs
twice: idle, and busy (:mod:`benchmarks.busy`: another process spinning on a core, and a 5 ms
training step in the main process after every DataLoader batch). Writes
``benchmarks/results/<name>.md`` and ``<name>.png``.

Usage: python -m benchmarks.spike [--frames 24] [--sequences 2] [-h for the rest]
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from arraystore import Layout, ingest
from arraystore.converters.gopro.source import GoproSpikeSource
from arraystore.info import store_info
from arraystore.loaders import SpikeClipDataset
from arraystore.testing.gopro_trees import write_gopro_tree
from benchmarks.busy import CONDITIONS, STEP_SECONDS, condition
from benchmarks.report import command_line, machine, plot_bars, save_report
from benchmarks.run import batches_of, interleaved, loader_run, read_run
from benchmarks.spike_folder import FolderClipDataset

FOLDER = "folder tree (seed path: .dat + PNG decode per item)"
REALTIME, PRECOMPUTED = "store, realtime voxels", "store, precomputed voxels"
REALTIME_CACHE, PRECOMPUTED_CACHE = f"{REALTIME}, RAM cache warm", f"{PRECOMPUTED}, RAM cache warm"
LAYOUTS = {"raw": Layout("raw", checksum=False),  # as in their last report
           "sharded": Layout("sharded", shard_size=16, checksum=False),
           "raw+zstd": Layout("raw", compression="zstd", checksum=False)}
READ_FROM = Layout().name  # the clips are read from the store in the default layout
CLIP = {"split": "train", "clip_len": 5, "crop_size": 256, "bins": 5, "seed": 0}
SPIKE_SHAPE = (10, 396, 640)


def tree_bytes(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--frames", type=int, default=24, help="frames per sequence")
    parser.add_argument("--reads", type=int, default=64, help="clips per store reader a round")
    parser.add_argument("--folder-reads", type=int, default=6, help="the same, folder path")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workdir", default=None, help="where the data goes (temporary)")
    parser.add_argument("--name", default="spike_clips")
    args = parser.parse_args()
    disk: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory(prefix="arraystore-spike-", dir=args.workdir) as tmp:
        root = Path(tmp)
        print("generating data ...", flush=True)
        tree = write_gopro_tree(root / "tree", {"train": {f"GOPR{n:04d}_00": args.frames
                                                          for n in range(args.sequences)}},
                                spike_shape=SPIKE_SHAPE, texture=24)
        disk["folder tree (PNG + .dat)"] = tree_bytes(tree)
        print("ingesting ...", flush=True)
        for label, layout in LAYOUTS.items():
            out = root / f"{label}.zarr"
            ingest(GoproSpikeSource(voxels="precompute"), [tree], out, layout=layout, workers=2)
            info = store_info(out)
            vox = next(a for a in info.arrays if a.name == "spike_vox")
            disk[f"store, {label}"] = (info.bytes_on_disk, info.files)
            disk[f"store, {label}, without spike_vox"] = (info.bytes_on_disk - vox.bytes_on_disk,
                                                          info.files - vox.files)
        store = root / f"{READ_FROM}.zarr"
        datasets: dict[str, Any] = {
            FOLDER: FolderClipDataset(tree, "train", CLIP["clip_len"], CLIP["crop_size"],
                                      CLIP["bins"], SPIKE_SHAPE),
            REALTIME: SpikeClipDataset(store, voxels="realtime", ram_cache_gb=0, **CLIP),
            REALTIME_CACHE: SpikeClipDataset(store, voxels="realtime", ram_cache_gb=4, **CLIP),
            PRECOMPUTED: SpikeClipDataset(store, voxels="precomputed", ram_cache_gb=0, **CLIP),
            PRECOMPUTED_CACHE: SpikeClipDataset(store, voxels="precomputed", ram_cache_gb=4,
                                                **CLIP),
        }
        clips = len(datasets[REALTIME])
        assert len(datasets[FOLDER]) == clips
        print("single process ...", flush=True)
        for dataset in datasets.values():  # page cache, handles, and the RAM caches warm
            read_run(dataset, np.arange(clips))()
        rng = np.random.default_rng(0)
        singles = {name: read_run(d, rng.integers(0, clips, args.folder_reads if name == FOLDER
                                                  else args.reads))
                   for name, d in datasets.items()}
        step = [0.0]  # the training step after each DataLoader batch: set per condition
        loaders = {name: loader_run(d, batches_of(rng.integers(
            0, clips, 2 * (args.folder_reads if name == FOLDER else args.reads)), 4), None,
            step=step) for name, d in datasets.items()}
        single, loader = {}, {}
        for name in CONDITIONS:
            print(f"{name}: single process, then DataLoader (2 workers) ...", flush=True)
            step[0] = STEP_SECONDS if name == "busy" else 0.0
            with condition(name):
                single[name] = interleaved(singles, args.rounds, seed=1)
                loader[name] = interleaved(loaders, args.rounds, seed=2)
    print(write_report(args, single, loader, disk, Path(__file__).parent / "results" / args.name))


def _table(rates: dict[str, dict[str, tuple[float, float]]]) -> list[str]:
    """One row per reader: clips/s idle and busy, each × the folder path in its condition."""
    idle, busy = rates["idle"], rates["busy"]
    lines = ["| reader | idle clips/s | busy clips/s | idle × folder path | busy × folder path "
             "| round spread idle / busy |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {idle[name][0]:.1f} | {busy[name][0]:.1f} | "
              f"{idle[name][0] / idle[FOLDER][0]:.1f} | {busy[name][0] / busy[FOLDER][0]:.1f} "
              f"| ±{idle[name][1] / 2:.0%} / ±{busy[name][1] / 2:.0%} |" for name in idle]
    return lines


def _targets(label: str, rates: dict[str, tuple[float, float]]) -> list[str]:
    """The spike clips' targets, measured in one condition."""
    r = {name: rate for name, (rate, _) in rates.items()}
    checks = [
        ("realtime from the store vs the folder path", r[REALTIME] / r[FOLDER], 5.0),
        ("realtime vs precomputed voxels", r[REALTIME] / r[PRECOMPUTED], 0.9),
        ("realtime, cache warm vs without cache", r[REALTIME_CACHE] / r[REALTIME], 2.0),
        ("precomputed, cache warm vs without cache", r[PRECOMPUTED_CACHE] / r[PRECOMPUTED], 2.0),
    ]
    return [f"| {label}: {what} | ≥ {goal:g}× | {value:.2f}× | "
            f"{'met' if value >= goal else f'**missed by {(goal - value) / goal:.0%}**'} |"
            for what, value, goal in checks]


def write_report(args: argparse.Namespace, single: dict, loader: dict,
                 disk: dict[str, tuple[int, int]], stem: Path) -> str:
    cmd = command_line("spike", vars(args))
    folder_bytes = disk["folder tree (PNG + .dat)"][0]
    lines = [
        "# Spike-clip benchmark: `SpikeClipDataset` vs the seed's folder path",
        "",
        f"- machine: {machine()}",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; page cache warm",
        f"- command: `{cmd}`",
        f"- data: {args.sequences} sequences × {args.frames} frames, 720×1280 PNGs (textured, "
        f"as large as photographs'), 10×396×640 spike `.dat`s; clips of "
        f"{CLIP['clip_len']} frames, {CLIP['crop_size']}² crops, {CLIP['bins']} voxel bins; "
        f"store layout {READ_FROM} (the default)",
        "- method: readers take turns within each round in a random order; the median round "
        "gives clips/s; *round spread* is half the range of a reader's round times over their "
        "median. Without a cache the store reads only each crop's rows; with it (4 GB, warmed "
        "by one pass) whole frames come from RAM. Busy: another process spins on one core, "
        "and the DataLoader rows run a 5 ms training step in the main process after each "
        "batch; ratios compare readers within one condition.",
        "",
        "## Targets",
        "",
        "| target | goal | measured | |",
        "|---|---:|---:|---|",
        *(row for name in CONDITIONS for row in (
            *_targets(f"single process, {name}", single[name]),
            *_targets(f"DataLoader, {name}", loader[name]))),
        "",
        "## Single process",
        "",
        *_table(single),
        "",
        "## DataLoader (2 workers, batch 4, forkserver, persistent workers)",
        "",
        *_table(loader),
        "",
        "## On disk",
        "",
        "| format / layout | bytes | × folder tree | files |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {nbytes / 1e6:.1f} MB | {nbytes / folder_bytes:.2f} | {files} |"
          for name, (nbytes, files) in disk.items()),
        "",
        "The folder tree stores images as PNG; the store keeps decoded pixels (raw: "
        "uncompressed, readable by window), which is what removes the decode from every read.",
        "",
        f"![plot]({stem.name}.png)",
        "",
    ]
    text = save_report(lines, stem)
    _plot(single, loader, stem.with_suffix(".png"))
    return text


def _plot(single: dict, loader: dict, path: Path) -> None:
    plot_bars([(f"{title}, {name}", {n: r / rates[name][FOLDER][0]
                                     for n, (r, _) in rates[name].items()})
               for title, rates in (("single process", single),
                                    ("DataLoader, 2 workers", loader))
               for name in CONDITIONS],
              path, "clips/s relative to the seed's folder path (log scale, higher is faster)",
              grey=(FOLDER,), log=True)

if __name__ == "__main__":
    main()
