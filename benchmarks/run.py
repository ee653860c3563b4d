"""Random-access read benchmark: ``ZarrDistillDataset`` on every layout and backend against the
reference ``.bin`` reader, on the same samples, interleaved round by round so that drift in the
machine's speed hits every reader alike. Writes ``benchmarks/results/<name>.md`` and ``.png``.

Usage: python -m benchmarks.run [--samples 64] [--reads 64] [--rounds 5] [--name NAME]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from arraystore import Layout, ingest
from arraystore.info import store_info
from benchmarks.data import write_random_bin
from converters.sa1b_bin.source import BinDirectorySource
from loaders import BinaryDistillDataset, ZarrDistillDataset
from loaders.bin_format import bin_files

RESULTS = Path(__file__).parent / "results"
LAYOUTS = {
    "raw": Layout("raw"),
    "raw+crc32c": Layout("raw", checksum=True),
    "sharded": Layout("sharded", shard_size=16),
    "sharded+crc32c": Layout("sharded", shard_size=16, checksum=True),
    "raw+zstd": Layout("raw", compression="zstd"),
    "sharded+zstd": Layout("sharded", shard_size=16, compression="zstd"),
}
BACKENDS = ("auto", "direct", "tensorstore", "zarr")


def item_bytes(item: dict) -> int:
    return sum(v.nbytes for v in item.values() if hasattr(v, "nbytes"))


def time_reads(read: Callable[[int], dict], indices: np.ndarray) -> float:
    start = time.perf_counter()
    for index in indices:
        read(int(index))
    return time.perf_counter() - start


def machine() -> str:
    return (f"{platform.node()}: {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--reads", type=int, default=64, help="random reads per reader per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--name", default="random_access")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="arraystore-bench-") as tmp:
        root = Path(tmp)
        bin_dir = write_random_bin(root / "bin", args.samples)
        readers: dict[str, Callable[[int], dict]] = {".bin (reference)":
                                                     BinaryDistillDataset(bin_dir).__getitem__}
        disk = {".bin": (sum((bin_dir / f.name).stat().st_size for f in bin_files(1)), 9)}
        for label, layout in LAYOUTS.items():
            store = root / f"{label}.zarr"
            ingest(BinDirectorySource(), [bin_dir], store, layout=layout, workers=2)
            summary = store_info(store)
            disk[label] = (summary.bytes_on_disk, summary.files)
            for backend in BACKENDS:
                readers[f"{label} / {backend}"] = ZarrDistillDataset(store, backend).__getitem__
        size = item_bytes(readers[".bin (reference)"](0))
        rng = np.random.default_rng(0)
        times: dict[str, list[float]] = {name: [] for name in readers}
        for read in readers.values():  # warm the page cache and open handles
            time_reads(read, np.arange(args.samples))
        for _ in range(args.rounds):
            indices = rng.integers(0, args.samples, args.reads)
            for name in rng.permutation(list(readers)):
                times[name].append(time_reads(readers[name], indices))
    report(args, times, disk, size)


def report(args: argparse.Namespace, times: dict[str, list[float]],
           disk: dict[str, tuple[int, int]], size: int) -> None:
    rate = {name: args.reads / statistics.median(t) for name, t in times.items()}
    base = rate[".bin (reference)"]
    lines = [
        f"# Random-access reads: `ZarrDistillDataset` vs the `.bin` reader ({args.name})",
        "",
        f"- machine: {machine()}",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; page cache warm",
        f"- {args.samples} samples; {args.rounds} rounds of {args.reads} random reads per "
        f"reader, readers interleaved in random order each round; median round reported",
        f"- item = the dict of SEEDS.md 000, {size / 2**20:.2f} MiB of tensors",
        "- command: `python -m benchmarks.run " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items()) + "`",
        "",
        "| reader (layout / backend) | items/s | MB/s | × .bin |",
        "|---|---:|---:|---:|",
    ]
    for name, r in rate.items():
        lines.append(f"| {name} | {r:.0f} | {r * size / 1e6:.0f} | {r / base:.2f} |")
    lines += ["", "| layout | bytes on disk | × .bin | files |", "|---|---:|---:|---:|"]
    for label, (nbytes, files) in disk.items():
        lines.append(f"| {label} | {nbytes / 1e6:.1f} MB | {nbytes / disk['.bin'][0]:.2f} | "
                     f"{files} |")
    RESULTS.mkdir(exist_ok=True)
    markdown = RESULTS / f"{args.name}.md"
    markdown.write_text("\n".join(lines) + f"\n\n![plot]({args.name}.png)\n")
    plot(rate, base, RESULTS / f"{args.name}.png")
    print(markdown.read_text())


def plot(rate: dict[str, float], base: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rate)
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(names) + 1.2))
    ax.barh(names, [rate[n] / base for n in names],
            color=["grey" if n.startswith(".bin") else "tab:blue" for n in names])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("random-access items/s relative to the .bin reader (higher is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
