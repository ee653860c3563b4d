"""Checksum benchmark: what a crc32c per chunk costs the readers, idle and with a core busy.

New stores carry a crc32c per chunk unless made with ``--no-checksum``. This measures, in one
run with readers interleaved round by round, the same ``sa1b`` items and DataLoader batches
read from a sharded store with checksums and from one without, against the lean ``.bin``
reader; once with the machine idle and once with another process keeping a core busy. Reads
come out of the page cache (the first read of each sample is done before timing): the case
where a checksum costs the most, as nothing else does.

Usage: python -m benchmarks.checksums [--samples 48] [--rounds 7] [-h for the rest]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from arraystore import Layout, Store
from arraystore.converters.sa1b_bin.exporter import BinExporter
from arraystore.kinds.sa1b import sa1b_schema
from arraystore.loaders import BinaryDistillDataset, ZarrDistillDataset
from benchmarks.batches import BATCH, LeanBinReader, item_reads_parser, random_columns
from benchmarks.busy import CONDITIONS, condition
from benchmarks.data import fill_store
from benchmarks.report import header, plot_bars, save_report
from benchmarks.run import batches_of, interleaved, loader_run, read_run

LEAN = ".bin lean (pread + frombuffer per field)"
ITEMS = ("ZarrDistillDataset[i], sharded + crc32c (default)",
         "ZarrDistillDataset[i], sharded, --no-checksum")
BATCHES = ("DataLoader (2 workers), sharded + crc32c (default)",
           "DataLoader (2 workers), sharded, --no-checksum")
LAYOUTS = {"crc32c": Layout("sharded", checksum=True), "plain": Layout("sharded",
                                                                        checksum=False)}


def measure(root: Path, samples: int, reads: int, loader_items: int,
            rounds: int) -> dict[str, dict[str, tuple[float, float]]]:
    """items/s and spread of every reader, per condition."""
    columns = random_columns(samples)
    for name, layout in LAYOUTS.items():
        fill_store(Store.create(root / f"{name}.zarr", sa1b_schema(), layout), columns)
    BinExporter().export(root / "plain.zarr", root / "bin")
    lean = LeanBinReader(BinaryDistillDataset(root / "bin"))
    stores = {name: ZarrDistillDataset(root / f"{name}.zarr") for name in LAYOUTS}
    rng = np.random.default_rng(0)
    indices = rng.integers(0, samples, reads)
    batch_indices = rng.integers(0, samples, loader_items)
    items = {LEAN: lean, ITEMS[0]: stores["crc32c"], ITEMS[1]: stores["plain"]}
    for reader in items.values():  # the page cache and the handles warm
        read_run(reader, np.arange(samples))()
    results = {}
    for name in CONDITIONS:
        with condition(name):
            runs = {label: read_run(reader, indices) for label, reader in items.items()}
            batches = batches_of(batch_indices, BATCH)
            runs[BATCHES[0]] = loader_run(stores["crc32c"], batches)
            runs[BATCHES[1]] = loader_run(stores["plain"], batches)
            results[name] = interleaved(runs, rounds, seed=1)
    return results


def main() -> None:
    args = item_reads_parser(__doc__).parse_args()
    with tempfile.TemporaryDirectory(prefix="arraystore-checksums-", dir=args.workdir) as tmp:
        results = measure(Path(tmp), args.samples, args.reads, args.loader_items, args.rounds)
    print(write_report(args, results))


def write_report(args: argparse.Namespace, results: dict) -> str:
    lines = header("Checksum benchmark: the cost of a crc32c per chunk on reads", "checksums",
                   vars(args))
    lines += ["- data: sharded `sa1b` stores of random values with and without crc32c, items "
              "from the page cache, random indices; busy: another process spinning on a core",
              "", "| reader | idle items/s | busy items/s | idle × lean .bin | "
                  "busy × lean .bin |", "|---|---:|---:|---:|---:|"]
    for label in (LEAN, *ITEMS, *BATCHES):
        idle, busy = results["idle"][label][0], results["busy"][label][0]
        lines.append(f"| {label} | {idle:.0f} | {busy:.0f} | "
                     f"{idle / results['idle'][LEAN][0]:.2f} | "
                     f"{busy / results['busy'][LEAN][0]:.2f} |")
    costs = {name: {kind: results[name][pair[0]][0] / results[name][pair[1]][0]
                    for kind, pair in (("items", ITEMS), ("batches", BATCHES))}
             for name in CONDITIONS}
    lines += ["", "Checksums on / off (1.00: free): " + "; ".join(
        f"{name}: items **{c['items']:.2f}×**, batches **{c['batches']:.2f}×**"
        for name, c in costs.items()) + "."]
    stem = Path(__file__).parent / "results" / "checksums"
    plot_bars([(f"{name}: × checksums off", {f"{kind}": value for kind, value in c.items()})
               for name, c in costs.items()], stem.with_suffix(".png"),
              "items/s with crc32c ÷ items/s without")
    return save_report(lines, stem)


if __name__ == "__main__":
    main()
