"""Batch benchmark: items and batches of an ``sa1b`` store at memory speed, against the leanest
``.bin`` reader, the same store read one field at a time, a no-I/O ceiling and this machine's
memory-copy bandwidth, all measured in one run, readers interleaved round by round.

Single process: ``ZarrDistillDataset[i]`` against
a ``.bin`` reader doing one ``os.pread`` + ``np.frombuffer`` per field and nothing else, and
against ``BinaryDistillDataset[i]`` (the same reads, and the item dict); for reference, the
store with its mapped shard reads switched off, a ``.bin`` reader copying out of mappings kept
for the run, and the item's ceiling (the same item dict from memory copies by the same reading
code, no system call); and the lean reader and the default with every byte of each item then
read once, as a training step would. Batches of 8: a torch
DataLoader with 2 workers over the ``.bin`` reader + ``collate_distill``, the same over the store
(``__getitems__`` reads straight into shared memory), and ``BatchLoader`` (2 threads, a ring of
reused buffers), against the same batches copied from RAM by 2 threads (the ceiling); and
the two DataLoaders without workers (batches built in this process).

Everything runs twice: idle, and busy (:mod:`benchmarks.busy`: another process spinning on a
core, and a 5 ms training step in the main process after every batch of the batch rows).

Usage: python -m benchmarks.batches [--samples 48] [--rounds 7] [-h for the rest]
"""

from __future__ import annotations

import argparse
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arraystore import Layout, Store
from arraystore.converters.sa1b_bin.exporter import BinExporter
from arraystore.kinds.sa1b import sa1b_schema
from arraystore.loaders import BatchLoader, BinaryDistillDataset, ZarrDistillDataset
from arraystore.loaders.distill_item import DISTILL_FIELDS, STACKED_SLOTS
from arraystore.readers.mapped import ENV_SWITCH
from benchmarks.busy import CONDITIONS, STEP_SECONDS, condition, training_step
from benchmarks.data import fill_store
from benchmarks.in_memory import InMemoryDataset
from benchmarks.report import header, plot_bars, save_report
from benchmarks.run import batches_of, interleaved, loader_run, read_every_byte, read_run

BATCH = 8
LEAN_USED = ".bin lean, then every byte read once"
DEFAULT_USED = "sharded (default), ZarrDistillDataset[i], then every byte read once"
ITEM_CEILING = "no I/O: the item dict from RAM copies by the same code (ceiling)"
NO_WORKERS_BIN = "DataLoader without workers, .bin per item + collate_distill"
NO_WORKERS_STORE = "DataLoader without workers, sharded store (__getitems__ into huge pages)"
READ_BIN = "DataLoader, .bin per item + collate_distill, batches read in the main process"
READ_STORE = "DataLoader, sharded store, batches read in the main process"


class LeanBinReader:
    """The leanest ``.bin`` read of an item: one ``os.pread`` + ``np.frombuffer`` per field it
    needs, no item dict."""

    def __init__(self, dataset: BinaryDistillDataset) -> None:
        self.dataset = dataset  # it owns the descriptors (and closes them when collected)
        self.parts = [(dataset._fd(spec.name), spec.item_size, offset, part.nbytes, part.dtype,
                       part.shape) for spec, part, offset in dataset._parts]

    def __getitem__(self, index: int) -> list[np.ndarray]:
        return [np.frombuffer(os.pread(fd, nbytes, index * size + offset), dtype).reshape(shape)
                for fd, size, offset, nbytes, dtype, shape in self.parts]


class MappedBinReader:
    """The same reads copied out of a mapping of each ``.bin`` file kept for the whole run
    (the trick of arraystore's mapped shard reads, applied to ``.bin``): one slice copy per
    field."""

    def __init__(self, dataset: BinaryDistillDataset) -> None:
        self.parts = []
        for spec, part, offset in dataset._parts:
            mapped = np.frombuffer(mmap.mmap(dataset._fd(spec.name), 0, prot=mmap.PROT_READ),
                                   np.uint8)
            self.parts.append((mapped, spec.item_size, offset, part.nbytes, part.dtype,
                               part.shape))

    def __getitem__(self, index: int) -> list[np.ndarray]:
        return [mapped[index * size + offset:index * size + offset + nbytes].copy()
                .view(dtype).reshape(shape)
                for mapped, size, offset, nbytes, dtype, shape in self.parts]


def preadv_only(path: Path, samples: int) -> ZarrDistillDataset:
    """``ZarrDistillDataset`` whose shards were opened (by one read of every item) with
    mapped reads switched off (:mod:`arraystore.readers.mapped`): it reads with ``preadv``."""
    os.environ[ENV_SWITCH] = "0"
    try:
        dataset = ZarrDistillDataset(path)
        read_run(dataset, np.arange(samples))()
    finally:
        del os.environ[ENV_SWITCH]
    return dataset


class ReadOnce:
    """A reader's items, each of whose bytes the caller then reads once
    (:func:`benchmarks.run.read_every_byte`): the item as a training step uses it."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def __getitem__(self, index: int) -> Any:
        item = self.reader[index]
        read_every_byte(item)
        return item


class SampleReads:
    """``SampleReader.read``: the store's read of an item's fields, without the item dict (the
    counterpart of the lean ``.bin`` reader)."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.reader.read(index)


def random_columns(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid values of every ``sa1b`` field for ``n`` samples (one box each)."""
    rng = np.random.default_rng(seed)
    columns: dict[str, np.ndarray] = {}
    for f in sa1b_schema().fields:
        if f.is_string:
            columns[f.name] = np.array([f"sa_{i}" if f.name == "image_id" else "B_v1"
                                        for i in range(n)], dtype=f.numpy_dtype)
        elif f.numpy_dtype.kind == "f":
            columns[f.name] = rng.random((n, *f.shape), np.float32).astype(f.numpy_dtype)
        else:
            columns[f.name] = rng.integers(0, 2 if f.shape == () else 256, (n, *f.shape)
                                           ).astype(f.numpy_dtype)
    columns["metadata"][:] = [1, 1, 1024, 1024, 3]
    columns["box_annotation_ids"][:] = np.arange(n)[:, None]
    columns["sample"] = np.array([f"sa_{i}" for i in range(n)], dtype=object).astype(
        columns["image_id"].dtype)
    columns["committed"] = np.ones(n, bool)
    return columns


def batches_run(loader: Any, step: list[float]) -> Callable[[], int]:
    def run() -> int:
        items = 0
        for batch in loader:
            training_step(step[0])
            items += len(batch["image_id"])
        return items
    return run


def no_io_run(columns: dict[str, np.ndarray], indices: np.ndarray,
              step: list[float]) -> Callable[[], int]:
    """The batches' stacked fields copied from RAM into reused buffers by 2 threads, a batch
    per thread as BatchLoader's threads read them: the ceiling of any batch reader here."""
    fields = [s.field for s in STACKED_SLOTS.values()]
    buffers = [{f: np.empty((BATCH, *columns[f].shape[1:]), np.float32
                            if columns[f].dtype == np.uint8 and f != "image"
                            else columns[f].dtype) for f in fields} for _ in range(2)]
    own = threading.local()

    def copy(batch: np.ndarray) -> None:
        if not hasattr(own, "buffers"):
            own.buffers = buffers.pop()
        for field in fields:
            for row, index in enumerate(batch):
                np.copyto(own.buffers[field][row], columns[field][index], casting="unsafe")

    pool = ThreadPoolExecutor(2)  # two threads for the whole run, each with its buffers

    def run() -> int:
        batches = [indices[s:s + BATCH] for s in range(0, len(indices), BATCH)]
        for _ in pool.map(copy, batches):
            training_step(step[0])
        return len(indices)
    return run


def copy_bandwidth(nbytes: int = 1 << 29) -> dict[str, float]:
    """GB/s of ``np.copyto`` of a large buffer with 1 and 2 threads (median of 5)."""
    src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    rates = {}
    for threads in (1, 2):
        parts = np.array_split(np.arange(nbytes), threads)
        bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]
        times = []
        with ThreadPoolExecutor(threads) as pool:
            for _ in range(5):
                start = time.perf_counter()
                list(pool.map(lambda b: np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]]), bounds))
                times.append(time.perf_counter() - start)
        rates[f"{threads} thread{'s' * (threads > 1)}"] = nbytes / float(np.median(times)) / 1e9
    return rates


def item_reads_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a benchmark of item and batch reads of random ``sa1b`` samples: its
    description is the first paragraph of ``doc``."""
    parser = argparse.ArgumentParser(description=" ".join(doc.split("\n\n")[0].split()))
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--reads", type=int, default=192, help="random items per reader a round")
    parser.add_argument("--loader-items", type=int, default=192, help="batched items a round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workdir", default=None)
    return parser


def main() -> None:
    parser = item_reads_parser(__doc__)
    parser.add_argument("--name", default="batches")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="arraystore-batches-", dir=args.workdir) as tmp:
        root = Path(tmp)
        columns = random_columns(args.samples)
        for name, layout in (("raw", Layout("raw", checksum=False)),  # as in its last report
                             ("sharded", Layout("sharded", checksum=False))):
            fill_store(Store.create(root / f"{name}.zarr", sa1b_schema(), layout), columns)
        BinExporter().export(root / "raw.zarr", root / "bin")
        binary = BinaryDistillDataset(root / "bin")
        raw, sharded = ZarrDistillDataset(root / "raw.zarr"), ZarrDistillDataset(
            root / "sharded.zarr")
        singles = {
            ".bin lean (pread + frombuffer per field)": LeanBinReader(binary),
            ".bin BinaryDistillDataset[i] (item dict)": binary,
            "raw, ZarrDistillDataset[i]": raw,
            "sharded (default), ZarrDistillDataset[i]": sharded,
            "sharded, ZarrDistillDataset[i], mapped reads off (preadv)": preadv_only(
                root / "sharded.zarr", args.samples),
            ".bin mapped (a copy per field out of a kept mapping)": MappedBinReader(binary),
            LEAN_USED: ReadOnce(LeanBinReader(binary)),
            DEFAULT_USED: ReadOnce(sharded),
            "raw, SampleReader.read (fields, no item dict)": SampleReads(raw.reader),
            "sharded, SampleReader.read (fields, no item dict)": SampleReads(sharded.reader),
            ITEM_CEILING: InMemoryDataset(
                [{f: columns[f][i] for f in DISTILL_FIELDS} for i in range(args.samples)],
                [str(i) for i in columns["image_id"]], halves=True),
        }
        for reader in singles.values():  # page cache and handles warm
            read_run(reader, np.arange(args.samples))()
        single_runs = {n: read_run(r, rng.integers(0, args.samples, args.reads))
                       for n, r in singles.items()}
        indices = rng.integers(0, args.samples, args.loader_items)
        order = indices.tolist()
        batches = batches_of(indices, BATCH)
        step = [0.0]  # the training step after each batch: set per condition
        batched = {
            "DataLoader, .bin per item + collate_distill": loader_run(binary, batches,
                                                                      step=step),
            "DataLoader, sharded store (__getitems__ into shared memory)":
                loader_run(sharded, batches, step=step),
            "BatchLoader, sharded store, 2 threads": batches_run(
                BatchLoader(sharded, BATCH, sampler=order, threads=2), step),
            "BatchLoader, raw store, 2 threads": batches_run(
                BatchLoader(raw, BATCH, sampler=order, threads=2), step),
            READ_BIN: loader_run(binary, batches, read_batches=True, step=step),
            READ_STORE: loader_run(sharded, batches, read_batches=True, step=step),
            NO_WORKERS_BIN: loader_run(binary, batches, workers=0, step=step),
            NO_WORKERS_STORE: loader_run(sharded, batches, workers=0, step=step),
            "no I/O: the batches copied from RAM, 2 threads": no_io_run(columns, indices, step),
        }
        single, batches = {}, {}
        for name in CONDITIONS:
            step[0] = STEP_SECONDS if name == "busy" else 0.0
            with condition(name):
                single[name] = interleaved(single_runs, args.rounds, seed=1)
                batches[name] = interleaved(batched, args.rounds, seed=2)
        bandwidth = copy_bandwidth()
        item_bytes = sum(a.nbytes for a in singles[".bin lean (pread + frombuffer per "
                                                   "field)"][0])
    print(write_report(args, single, batches, bandwidth, item_bytes,
                       Path(__file__).parent / "results" / args.name))


def write_report(args: argparse.Namespace, single: dict, batches: dict, bandwidth: dict,
                 item_bytes: int, stem: Path) -> str:
    """The report: each row idle and busy, ratios within each condition."""
    names, items = list(batches["idle"]), list(single["idle"])
    lean, full = items[:2]
    default = "sharded (default), ZarrDistillDataset[i]"
    unmapped = "sharded, ZarrDistillDataset[i], mapped reads off (preadv)"
    mapped_bin = ".bin mapped (a copy per field out of a kept mapping)"
    dl_bin, dl_store, ring = names[:3]
    ceiling = names[-1]

    def ratio(table: dict, name: str, a: str, b: str) -> float:
        return table[name][a][0] / table[name][b][0]

    def both(table: dict, a: str, b: str) -> str:
        return " / ".join(f"**{ratio(table, name, a, b):.2f}×**" for name in CONDITIONS)

    def verdict(table: dict, a: str, b: str, goals: dict[str, float]) -> str:
        met = all(ratio(table, name, a, b) >= goals[name] for name in CONDITIONS)
        return "met" if met else "**missed**"

    lowest = min(min(ratio(single, "busy", n, lean) for n in items
                     if n not in (ITEM_CEILING, LEAN_USED, DEFAULT_USED)),
                 ratio(single, "busy", DEFAULT_USED, LEAN_USED),
                 min(ratio(batches, "busy", n, dl_bin) for n in names[1:-1]))
    lines = [
        *header("Batch benchmark: items and batches at memory speed, idle and busy", "batches",
                vars(args)),
        f"- data: {args.samples} `sa1b` samples of random values (every field, "
        f"{item_bytes / 1e6:.1f} MB per item as the training item reads it), in the page cache; "
        f"random indices; batches of {BATCH}; torch {torch.__version__}",
        f"- busy: another process spinning on one core; the batch rows also run a "
        f"{STEP_SECONDS * 1e3:.0f} ms training step in the main process after each batch. "
        f"Ratios compare readers within one condition (readers interleaved round by round).",
        "",
        "## Single process",
        "",
        "| reader | idle items/s | busy items/s | idle × lean .bin | busy × lean .bin | "
        "spread idle / busy |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {n} | {single['idle'][n][0]:.0f} | {single['busy'][n][0]:.0f} | "
          f"{ratio(single, 'idle', n, lean):.2f} | {ratio(single, 'busy', n, lean):.2f} | "
          f"±{single['idle'][n][1] / 2:.0%} / ±{single['busy'][n][1] / 2:.0%} |" for n in items),
        "",
        f"Targets (idle / busy): the default ≥ 1.3× / ≥ 1.0× the lean `.bin` reader: "
        f"{both(single, default, lean)} "
        f"({verdict(single, default, lean, {'idle': 1.3, 'busy': 1.0})}); ≥ 1.2× the `.bin` "
        f"item dict reader (idle): **{ratio(single, 'idle', default, full):.2f}×**. For "
        f"reference: the default is {both(single, default, mapped_bin)} the `.bin` reader "
        f"copying out of kept mappings, and its mapped shard reads make it "
        f"{both(single, default, unmapped)} itself with them off. The copying ceiling (the same "
        f"item dict from memory copies by the same code): the default is "
        f"{both(single, default, ITEM_CEILING)} of it, as it copies no large field read before. "
        f"Used as a training step would use it "
        f"(every byte then read once), the default is {both(single, DEFAULT_USED, LEAN_USED)} "
        f"the lean `.bin` reader used so (its large fields, read before, are the page cache's "
        f"pages in a private mapping of their own: no copy).",
        "",
        "## Batches",
        "",
        "| reader | idle items/s | busy items/s | idle × DataLoader over .bin | busy × "
        "DataLoader over .bin | spread idle / busy |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {n} | {batches['idle'][n][0]:.0f} | {batches['busy'][n][0]:.0f} | "
          f"{ratio(batches, 'idle', n, dl_bin):.2f} | {ratio(batches, 'busy', n, dl_bin):.2f} | "
          f"±{batches['idle'][n][1] / 2:.0%} / ±{batches['busy'][n][1] / 2:.0%} |"
          for n in names),
        "",
        f"Targets (idle / busy): DataLoader over the store ≥ 1.5× the DataLoader over `.bin`: "
        f"{both(batches, dl_store, dl_bin)} "
        f"({verdict(batches, dl_store, dl_bin, {'idle': 1.5, 'busy': 1.5})}); BatchLoader ≥ 3× "
        f"the DataLoader over `.bin`: {both(batches, ring, dl_bin)} "
        f"({verdict(batches, ring, dl_bin, {'idle': 3, 'busy': 3})}); no row below 0.5× its "
        f"reference when busy: lowest **{lowest:.2f}×** "
        f"({'met' if lowest >= 0.5 else '**missed**'}). The no-I/O ceiling: the DataLoader over "
        f"the store reaches {both(batches, dl_store, ceiling)} of it.",
        "",
        f"Without workers, the store's DataLoader is "
        f"{both(batches, NO_WORKERS_STORE, NO_WORKERS_BIN)} the one over `.bin` (no target); "
        f"with the main process reading every page of each batch, "
        f"{both(batches, READ_STORE, READ_BIN)}.",
        "",
        "Memory-copy bandwidth (`np.copyto`, 512 MiB, idle): "
        + ", ".join(f"{k}: {v:.1f} GB/s" for k, v in bandwidth.items()) + ".",
        "",
        f"![plot]({stem.name}.png)",
        "",
    ]
    text = save_report(lines, stem)
    plot_bars([*((f"single process, {name}, × the lean .bin reader",
                  {n: ratio(single, name, n, lean) for n in items}) for name in CONDITIONS),
               *((f"batches of 8, {name}, × a DataLoader (2 workers) over .bin",
                  {n: ratio(batches, name, n, dl_bin) for n in names}) for name in CONDITIONS)],
              stem.with_suffix(".png"), "× the baseline (grey)",
              grey=[lean, LEAN_USED, ITEM_CEILING, dl_bin, ceiling])
    return text


if __name__ == "__main__":
    main()
