"""Mixture benchmark (SEEDS.md 004): building a ``Mixture`` and one epoch of sampler indices at
10^7 samples (time and peak memory), a 10^6-sample store as a source, and DataLoader throughput
of a mixture against the throughputs of its sources read alone, interleaved in one run.

The big stores hold only what a mixture reads of them (``sample``, ``committed`` and
``modality_length``), written in bulk; the throughput stores are real ones (the bundled SA-1B
sample, generated SAV pairs and referring data). Writes ``benchmarks/results/<name>.md`` and
``<name>.png``.

Usage: python -m benchmarks.mixture [--big 10000000] [-h for the rest]
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset

from arraystore import Field, Layout, Schema, Store, ingest
from arraystore.store import COMMITTED_ARRAY, SAMPLE_ARRAY
from benchmarks.data import fill_store
from benchmarks.report import command_line, machine, plot_bars, save_report
from benchmarks.run import interleaved
from converters.npz.examples import write_referring, write_sav_pairs
from converters.npz.source import NpzDirectorySource
from converters.sa1b.source import Sa1bTarSource
from loaders import (
    LengthGroupedSampler,
    MixSource,
    Mixture,
    WeightedSourceSampler,
    ZarrDistillDataset,
    packed_default_collate,
)

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "sa1b_sample.tar"
BATCH = 8


class LengthsOnly(Dataset):
    """A source known only by its lengths (a Dataset with ``modality_lengths``)."""

    def __init__(self, lengths: np.ndarray) -> None:
        self.modality_lengths = lengths

    def __len__(self) -> int:
        return len(self.modality_lengths)

    def __getitem__(self, index: int) -> dict:
        return {"index": index}


def lengths_store(path: Path, count: int, seed: int) -> Path:
    """A store of ``count`` committed samples with a ``modality_length`` array, in bulk."""
    schema = Schema("refcoco", (Field("modality_length", (), "int64", (), "block"),))
    store = Store.create(path, schema, Layout(block_size=1 << 16))
    lengths = np.random.default_rng(seed).integers(-64, 2048, count)
    lengths[lengths == 0] = 1
    fill_store(store, {
        SAMPLE_ARRAY: np.char.add("ref_", np.arange(count).astype(str)).astype(
            np.dtypes.StringDType()),
        COMMITTED_ARRAY: np.ones(count, bool), "modality_length": lengths})
    return path


def measured(action: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak MB of Python and NumPy allocations) of ``action()``."""
    tracemalloc.start()
    start = time.perf_counter()
    result = action()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return result, seconds, peak


def scale(root: Path, big: int) -> list[tuple[str, float, float, str]]:
    """Rows of (what, seconds, peak MB, target)."""
    million = max(1, big // 10)
    first = lengths_store(root / "ref_a.zarr", million, 0)
    second = lengths_store(root / "ref_b.zarr", 2 * million, 1)
    third = LengthsOnly(np.random.default_rng(2).integers(1, 4096, big - 4 * million))
    rows = []
    _, seconds, peak = measured(lambda: Mixture([MixSource(first, dataset_type="a")]))
    rows.append((f"Mixture of one {million:,}-sample store", seconds, peak, "< 1 s"))

    def build() -> Mixture:
        return Mixture([MixSource(first, dataset_type="a", repeats=2),
                        MixSource(second, dataset_type="b"),
                        MixSource(third, dataset_type="c")])

    mixture, seconds, peak = measured(build)
    rows.append((f"Mixture of {len(mixture):,} (2 stores, one ×2, and a Dataset)", seconds, peak,
                 "-"))
    samplers = {
        "LengthGroupedSampler": lambda built: LengthGroupedSampler(built, 8, world_size=8,
                                                                   rank=3),
        "WeightedSourceSampler": lambda built: WeightedSourceSampler(
            built, {"a": 1, "b": 2, "c": 4}, world_size=8, rank=3),
    }
    for name, make in samplers.items():
        indices, seconds, peak = measured(make(mixture).epoch_indices)
        rows.append((f"{name}: one epoch of {len(indices):,} indices", seconds, peak, "-"))
    del mixture
    for name, make in samplers.items():
        _, seconds, peak = measured(lambda make=make: make(build()).epoch_indices())
        rows.append((f"Mixture + one {name} epoch, {big:,} samples", seconds, peak,
                     "≤ 2 s, ≤ 200 MB"))
    return rows


def loader_run(dataset: Any, indices: np.ndarray, collate: Callable) -> Callable[[], int]:
    loader = DataLoader(dataset, batch_size=BATCH, sampler=indices.tolist(), num_workers=2,
                        collate_fn=collate, multiprocessing_context="forkserver",
                        prefetch_factor=4, persistent_workers=True)
    for _ in loader:
        pass

    def run() -> int:
        for _ in loader:
            pass
        return len(indices)
    return run


def throughput(root: Path, items: int, rounds: int) -> tuple[dict, dict[str, float]]:
    ingest(Sa1bTarSource(), [SAMPLE], root / "sa1b.zarr", workers=1)
    ingest(NpzDirectorySource(), [write_sav_pairs(root / "sav", 48)], root / "sav.zarr",
           workers=2)
    ingest(NpzDirectorySource(), [write_referring(root / "ref", 48)], root / "refcoco.zarr",
           workers=2)
    mixture = Mixture([MixSource(root / "sav.zarr", dataset_type="sav", modality_length=512),
                       MixSource(ZarrDistillDataset(root / "sa1b.zarr"), dataset_type="sa1b",
                                 modality_length=1024),
                       MixSource(root / "refcoco.zarr", dataset_type="refcoco", repeats=4)])
    rng = np.random.default_rng(0)
    order = rng.integers(0, len(mixture), items)
    shares = np.bincount(np.searchsorted(mixture.offsets, order, side="right") - 1,
                         minlength=3) / items
    runs = {"mixture (LengthGroupedSampler order)": loader_run(
        mixture, np.array(list(LengthGroupedSampler(mixture, BATCH, seed=0)) * (
            items // len(mixture) + 1))[:items], mixture.collate)}
    alone = {}
    for dataset, name in zip(mixture.datasets, mixture.dataset_types, strict=True):
        # the collate the mixture uses for this source: its own, else the packed default
        collate = getattr(dataset, "collate_fn", None) or packed_default_collate
        alone[name] = f"{name} alone"
        runs[alone[name]] = loader_run(dataset, rng.integers(0, len(dataset), items), collate)
    runs["mixture (random order)"] = loader_run(mixture, order, mixture.collate)
    rates = interleaved(runs, rounds, seed=3)
    expected = 1 / sum(share / rates[alone[name]][0]
                       for share, name in zip(shares, mixture.dataset_types, strict=True))
    return rates, {"expected": expected, **{n: s for n, s in zip(mixture.dataset_types, shares,
                                                                   strict=True)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--big", type=int, default=10_000_000, help="samples of the big mixture")
    parser.add_argument("--items", type=int, default=192, help="DataLoader items a round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--name", default="mixture")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="arraystore-mix-", dir=args.workdir) as tmp:
        print("scale ...", flush=True)
        rows = scale(Path(tmp), args.big)
        print("throughput ...", flush=True)
        rates, expected = throughput(Path(tmp), args.items, args.rounds)
    print(write_report(args, rows, rates, expected,
                       Path(__file__).parent / "results" / args.name))


def write_report(args: argparse.Namespace, rows: list, rates: dict, expected: dict,
                 stem: Path) -> str:
    cmd = command_line("mixture", vars(args))
    measured_mix = rates["mixture (random order)"][0]
    ratio = measured_mix / expected["expected"]
    shares = ", ".join(f"{n} {s:.0%}" for n, s in expected.items() if n != "expected")
    lines = [
        "# Mixture benchmark: construction, sampler epochs, DataLoader throughput",
        "",
        f"- machine: {machine()}",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"- command: `{cmd}`",
        "- memory: peak of Python and NumPy allocations while the step runs (tracemalloc), "
        "the sources' own arrays built before it excluded",
        "",
        "## Scale",
        "",
        "| step | seconds | peak MB | target |",
        "|---|---:|---:|---|",
        *(f"| {what} | {seconds:.2f} | {peak:.0f} | {target} |"
          for what, seconds, peak, target in rows),
        "",
        "## DataLoader throughput (2 workers, batch 8, forkserver, persistent workers)",
        "",
        f"Sources: the bundled SA-1B sample through `ZarrDistillDataset`, SAV-style pairs "
        f"(2 × 256² RGB + masks) and referring data (256² RGB + mask + caption) from NPZ "
        f"stores; RefCOCO ×4. Items are drawn at random over the mixture ({shares}); its "
        f"expected rate is the shares' weighted mean of the sources' rates, taken per item "
        f"(1 / Σ share/rate), each source read alone in the same rounds with the collate the "
        f"mixture uses for it (`collate_distill` for SA-1B, `packed_default_collate` for the "
        f"others).",
        "",
        "| reader | items/s | round spread |",
        "|---|---:|---:|",
        *(f"| {name} | {rate:.1f} | ±{spread / 2:.0%} |" for name, (rate, spread) in
          rates.items()),
        f"| expected for the mixture | {expected['expected']:.1f} | |",
        "",
        f"Mixture (random order) / expected: **{ratio:.2f}×** (target: within 10%, "
        f"{'met' if abs(ratio - 1) <= 0.1 else 'missed'}).",
        "",
        f"![plot]({stem.name}.png)",
        "",
    ]
    text = save_report(lines, stem)
    _plot(rates, expected["expected"], stem.with_suffix(".png"))
    return text


def _plot(rates: dict, expected: float, path: Path) -> None:
    values = {**{name: rate for name, (rate, _) in rates.items()},
              "expected for the mixture": expected}
    plot_bars([("", values)], path, "items/s through a DataLoader (2 workers)",
              grey=[n for n in values if "mixture" not in n], reference=None)

if __name__ == "__main__":
    main()
