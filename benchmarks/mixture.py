"""Mixture benchmark (docs/formats.md): building a ``Mixture`` and one epoch of sampler indices at
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
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset

from arraystore import Field, Layout, Schema, Store, ingest
from arraystore.converters.npz.source import NpzDirectorySource
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.info import store_info
from arraystore.loaders import (
    LengthGroupedSampler,
    MixSource,
    Mixture,
    WeightedSourceSampler,
    ZarrDistillDataset,
    packed_default_collate,
)
from arraystore.store import COMMITTED_ARRAY, SAMPLE_ARRAY
from arraystore.testing.npz_examples import write_referring, write_sav_pairs
from benchmarks.busy import CONDITIONS, STEP_SECONDS, condition
from benchmarks.data import fill_store
from benchmarks.report import (
    command_line,
    last_level_cache_bytes,
    machine,
    plot_bars,
    save_report,
)
from benchmarks.run import batches_of, interleaved, loader_run

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "sa1b_sample.tar"
BATCH = 8
SAV_PAIRS, REFERRING = 192, 384  # ~100 MB a store


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


def cut(indices: np.ndarray) -> list[list[int]]:
    """``indices`` as DataLoader batches of ``BATCH``."""
    return batches_of(indices, BATCH)


def throughput(root: Path, items: int, rounds: int) -> tuple[dict, dict, dict, dict]:
    """Per condition, (items/s, spread) of each reader and the worker's costs per batch; the
    mixture's source shares; and each source store's bytes."""
    ingest(Sa1bTarSource(), [SAMPLE], root / "sa1b.zarr", workers=1)
    ingest(NpzDirectorySource(), [write_sav_pairs(root / "sav", SAV_PAIRS)], root / "sav.zarr",
           workers=2)
    ingest(NpzDirectorySource(), [write_referring(root / "ref", REFERRING)],
           root / "refcoco.zarr", workers=2)
    mixture = Mixture([MixSource(root / "sav.zarr", dataset_type="sav", modality_length=512),
                       MixSource(ZarrDistillDataset(root / "sa1b.zarr"), dataset_type="sa1b",
                                 modality_length=1024, repeats=3),
                       MixSource(root / "refcoco.zarr", dataset_type="refcoco", repeats=2)])
    sizes = {name: store_info(root / f"{name}.zarr").bytes_on_disk
             for name in mixture.dataset_types}
    rng = np.random.default_rng(0)
    order = rng.integers(0, len(mixture), items)
    shares = np.bincount(np.searchsorted(mixture.offsets, order, side="right") - 1,
                         minlength=3) / items
    step = [0.0]
    runs = {"mixture (LengthGroupedSampler order)": loader_run(
        mixture, cut(np.array(list(LengthGroupedSampler(mixture, BATCH, seed=0)) * (
            items // len(mixture) + 1))[:items]), mixture.collate, step=step)}
    for dataset, name in zip(mixture.datasets, mixture.dataset_types, strict=True):
        # the collate the mixture uses for this source: its own, else the packed default
        collate = getattr(dataset, "collate_fn", None) or packed_default_collate
        runs[f"{name} alone"] = loader_run(dataset, cut(rng.integers(0, len(dataset), items)),
                                           collate, step=step)
    runs["mixture (random order)"] = loader_run(mixture, cut(order), mixture.collate, step=step)
    rates, costs = {}, {}
    for name in CONDITIONS:
        step[0] = STEP_SECONDS if name == "busy" else 0.0
        with condition(name):
            rates[name] = interleaved(runs, rounds, seed=3)
            costs[name] = costs_in_a_worker(mixture, cut(order), rounds)
    return rates, costs, dict(zip(mixture.dataset_types, shares, strict=True)), sizes


class _InWorker(Dataset):
    """One item, :func:`worker_costs` of the mixture's batches: read in a DataLoader worker,
    it times them where a DataLoader builds batches (torch on one thread, batch buffers the
    worker's reused shared-memory segments)."""

    def __init__(self, mixture: Mixture, batches: list[list[int]], rounds: int) -> None:
        self.mixture, self.batches, self.rounds = mixture, batches, rounds

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict[str, float]:
        return worker_costs(self.mixture, self.batches, self.rounds)


def costs_in_a_worker(mixture: Mixture, batches: list[list[int]],
                      rounds: int) -> dict[str, float]:
    """:func:`worker_costs`, measured in a DataLoader worker of its own."""
    loader = DataLoader(_InWorker(mixture, batches, rounds), batch_size=None, num_workers=1,
                        multiprocessing_context="forkserver")
    return next(iter(loader))


def worker_costs(mixture: Mixture, batches: list[list[int]], rounds: int) -> dict[str, float]:
    """What a DataLoader worker does per batch, without handing batches over: ms per batch of
    (1) the mixture's batch, ``__getitems__`` + ``collate``; (2) the same sub-batches, each
    read and collated by its source alone, summed; (3) the same items read by each source in
    full batches of ``BATCH`` (what the share-weighted expectation assumes). (2)/(3) is the
    cost of splitting a batch by source; (1)/(2) the mixture's own work on top."""
    located = [[mixture.locate(i) for i in batch] for batch in batches]
    collates = [getattr(d, "collate_fn", None) or packed_default_collate
                for d in mixture.datasets]

    def mixed() -> None:
        for batch in batches:
            mixture.collate(mixture.__getitems__(batch))

    def split() -> None:
        for batch in located:
            for number, dataset in enumerate(mixture.datasets):
                own = [local for source, local in batch if source == number]
                if own:
                    collates[number](dataset.__getitems__(own))

    def whole() -> None:
        for number, dataset in enumerate(mixture.datasets):
            own = [local for batch in located for source, local in batch if source == number]
            for start in range(0, len(own), BATCH):
                collates[number](dataset.__getitems__(own[start:start + BATCH]))

    times: dict[str, list[float]] = {"mixture": [], "split": [], "whole": []}
    jobs = {"mixture": mixed, "split": split, "whole": whole}
    for job in jobs.values():
        job()  # warm: files open, pages cached, the ring's segments made
    for _ in range(rounds):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) / len(batches) * 1e3 for name, t in times.items()}


def expected_rate(rates: dict[str, tuple[float, float]], shares: dict[str, float],
                  suffix: str = "") -> float:
    """The shares' weighted mean of the sources' rates read alone, per item (1 / Σ share /
    rate): what the mixture would reach if mixing cost nothing."""
    return 1 / sum(share / rates[f"{name} alone{suffix}"][0] for name, share in shares.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--big", type=int, default=10_000_000, help="samples of the big mixture")
    parser.add_argument("--items", type=int, default=1536,
                        help="DataLoader items a round (a round of a few dozen batches is swayed "
                             "by how its few SA-1B batches fall on the two workers)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--name", default="mixture")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="arraystore-mix-", dir=args.workdir) as tmp:
        print("scale ...", flush=True)
        rows = scale(Path(tmp), args.big)
        print("throughput ...", flush=True)
        rates, costs, shares, sizes = throughput(Path(tmp), args.items, args.rounds)
    print(write_report(args, rows, rates, costs, shares, sizes,
                       Path(__file__).parent / "results" / args.name))


def _beyond_the_bound(ratio: dict[str, float], bound: dict[str, float]) -> str:
    """What the DataLoader's ratios say beside the bound of a worker's work, per
    condition."""
    at = [c for c in CONDITIONS if ratio[c] >= bound[c] - 0.03]
    out = [f"{' and '.join(at).capitalize()}, the DataLoader is at or above that bound: "
           "handing a mixed batch over costs no more than a source's batch."] if at else []
    out += [f"{c.capitalize()}, the DataLoader loses {1 - ratio[c] / bound[c]:.0%} more, "
            "outside the workers' work timed here: most likely in the main process, which "
            "rebuilds a mixed batch as a dict of two or three sub-batches, each with its own "
            "tensors and lists, where a source's batch is one (not measured apart)."
            for c in CONDITIONS if c not in at]
    return " ".join(out)


def write_report(args: argparse.Namespace, rows: list, rates: dict, costs: dict, shares: dict,
                 sizes: dict[str, int], stem: Path) -> str:
    cmd = command_line("mixture", vars(args))
    expected = {c: expected_rate(rates[c], shares) for c in CONDITIONS}
    mixed = {c: rates[c]["mixture (random order)"][0] for c in CONDITIONS}
    ratio = {c: mixed[c] / expected[c] for c in CONDITIONS}
    splitting = {c: costs[c]["whole"] / costs[c]["split"] for c in CONDITIONS}
    own = {c: costs[c]["split"] / costs[c]["mixture"] for c in CONDITIONS}
    bound = {c: own[c] * splitting[c] for c in CONDITIONS}
    shared = ", ".join(f"{n} {s:.0%}" for n, s in shares.items())
    stores = ", ".join(f"{n} {b / 1e6:.0f} MB" for n, b in sizes.items())
    llc = last_level_cache_bytes()
    cache = "size unknown" if llc is None else f"{llc / 2**20:.0f} MiB"
    beyond = ("each more than" if llc is not None and min(sizes.values()) > llc
              else "to be compared with")
    names = list(rates["idle"])
    met = all(abs(r - 1) <= 0.1 or r > 1 for r in ratio.values())
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
        f"Sources: the bundled SA-1B sample through `ZarrDistillDataset` (×3), "
        f"{SAV_PAIRS} SAV-style pairs (2 × 256² RGB + masks) and {REFERRING} referring "
        f"samples (256² RGB + mask + caption, ×2) from NPZ stores; the stores hold "
        f"{stores}, {beyond} the CPU's last-level cache ({cache}), as real sources do (a "
        f"source read alone from a store that fits it is served from the CPU's cache, and "
        f"the mixture, whose stores together do not fit, from memory). Items are "
        f"drawn at random over the mixture ({shared}); its "
        f"expected rate is the shares' weighted mean of the sources' rates, taken per item "
        f"(1 / Σ share/rate), each source read alone in the same rounds with the collate the "
        f"mixture uses for it (`collate_distill` for SA-1B, `packed_default_collate` for the "
        f"others). *Idle*: nothing else runs. *Busy*: another process spins on one core, and "
        f"the main process spends {STEP_SECONDS * 1e3:.0f} ms of compute on each batch, as a "
        f"training step would. Medians of {args.rounds} interleaved rounds.",
        "",
        "| reader | idle items/s | spread | busy items/s | spread |",
        "|---|---:|---:|---:|---:|",
        *(f"| {name} | {rates['idle'][name][0]:.1f} | ±{rates['idle'][name][1] / 2:.0%} | "
          f"{rates['busy'][name][0]:.1f} | ±{rates['busy'][name][1] / 2:.0%} |"
          for name in names),
        f"| expected for the mixture | {expected['idle']:.1f} | | {expected['busy']:.1f} | |",
        "",
        "| target | idle | busy | |",
        "|---|---:|---:|---|",
        f"| mixture (random order) / expected, within 10% | {ratio['idle']:.2f}× | "
        f"{ratio['busy']:.2f}× | {'met' if met else '**missed**'} |",
        "",
        "## What bounds it: a worker's work per batch",
        "",
        "The same random batches, timed inside a DataLoader worker (torch on one thread, "
        "batch buffers the worker's reused shared-memory segments) without handing batches "
        "to the main process: the mixture's batch (`__getitems__` + "
        "`collate`); the same sub-batches (a random batch of 8 from three sources is two or "
        "three, one per source present) each read and collated by its source alone; and the "
        "same items read by each source in full batches of 8, which is what the expectation "
        "above assumes.",
        "",
        "| ms per batch of 8 | idle | busy |",
        "|---|---:|---:|",
        f"| the mixture's batch | {costs['idle']['mixture']:.2f} | "
        f"{costs['busy']['mixture']:.2f} |",
        f"| its sub-batches, each by its source alone | {costs['idle']['split']:.2f} | "
        f"{costs['busy']['split']:.2f} |",
        f"| the same items in full batches of one source | {costs['idle']['whole']:.2f} | "
        f"{costs['busy']['whole']:.2f} |",
        f"| splitting a batch by source (full / split) | {splitting['idle']:.2f}× | "
        f"{splitting['busy']:.2f}× |",
        f"| the mixture's own work (split / mixture) | {own['idle']:.2f}× | "
        f"{own['busy']:.2f}× |",
        "",
        "Every sub-batch pays a batch's fixed costs (a read plan, its collate, the item "
        "dicts) for fewer items, so a random mixed batch costs more than the same items in "
        "batches of one source: that is the first ratio, and no reader that keeps the "
        "sampler's batches as they are avoids it (a sampler that draws each batch from one "
        "source would). The second ratio sets what the mixture adds (finding each index's "
        "source, grouping, tagging each item with `dataset_type` and `modality_length`, "
        "building the batch of sub-batches) against what it saves (one buffer and one "
        "collate for the whole batch, where each sub-batch read alone has its own). Their "
        f"product is the bound a worker's own work sets ({bound['idle']:.2f}× idle, "
        f"{bound['busy']:.2f}× busy), against the "
        f"DataLoader's {ratio['idle']:.2f}× and {ratio['busy']:.2f}×. The sources' parts of a "
        "mixed batch are read into one buffer, so it crosses from a worker as one "
        "shared-memory segment, as a source's batch does. "
        + _beyond_the_bound(ratio, bound),
        "",
        f"![plot]({stem.name}.png)",
        "",
    ]
    text = save_report(lines, stem)
    plot_bars([(f"{c}", {**{n: r for n, (r, _) in rates[c].items()},
                         "expected for the mixture": expected[c]}) for c in CONDITIONS],
              stem.with_suffix(".png"), "items/s through a DataLoader (2 workers)",
              grey=[n for n in names if "mixture" not in n], reference=None)
    return text


if __name__ == "__main__":
    main()
