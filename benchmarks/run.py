"""Read and ingest benchmark: ``ZarrDistillDataset`` on every layout and backend against the
reference ``.bin`` reader, the old TAR+NPZ path and a reader without I/O (the same items from
memory copies), on the same samples, with a profile of where a read spends its time.

Every comparison is a ratio measured within one run: readers take turns, round by round, in a
random order, so drift in the machine's speed hits all alike. Writes
``benchmarks/results/<name>.md`` (tables, targets, machine) and ``<name>.png``.

Usage: python -m benchmarks.run [--samples 48] [--name sa1b_random_access] [-h for the rest]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from arraystore import Layout, ingest
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.converters.sa1b_bin.exporter import BinExporter
from arraystore.converters.sa1b_bin.source import BinDirectorySource
from arraystore.info import store_info
from arraystore.kinds.sa1b_bin import bin_files
from arraystore.loaders import BinaryDistillDataset, ZarrDistillDataset, collate_distill
from benchmarks.busy import CONDITIONS, STEP_SECONDS, condition, training_step
from benchmarks.data import write_sa1b_shard
from benchmarks.in_memory import InMemoryDataset
from benchmarks.library_items import LIBRARIES, LibraryItems, library_of
from benchmarks.profile import time_shares
from benchmarks.report import BIN, DEFAULT, NO_IO, TAR, Results, write_report
from benchmarks.tar_npz import TarNpzDataset

LAYOUTS = {
    "raw": Layout("raw", checksum=False),
    "raw+crc32c": Layout("raw", checksum=True),
    "sharded": Layout("sharded", checksum=False),
    "sharded+crc32c": Layout("sharded", checksum=True),
    "raw+zstd": Layout("raw", compression="zstd", checksum=False),
    "sharded+zstd": Layout("sharded", compression="zstd", checksum=False),
}
BACKENDS = ("auto", "direct", "tensorstore", "zarr")
BATCH = 8
LOADER_READERS = (NO_IO, BIN, DEFAULT, "raw / auto", "sharded+zstd / auto", TAR)


def interleaved(runs: dict[str, Callable[[], int]], rounds: int, seed: int,
                before: dict[str, Callable[[], None]] | None = None,
                ) -> dict[str, tuple[float, float]]:
    """(items/s, spread) of each run: items done / median round time, and (slowest - fastest)
    / median round; runs take turns in a random order each round. ``before``: what to do,
    untimed, before a run's every turn (by the run's name)."""
    rng = np.random.default_rng(seed)
    times: dict[str, list[float]] = {name: [] for name in runs}
    counts: dict[str, int] = {}
    for _ in range(rounds):
        for name in rng.permutation(list(runs)):
            if before and name in before:
                before[name]()
            start = time.perf_counter()
            counts[name] = runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: (counts[name] / statistics.median(t), (max(t) - min(t)) / statistics.median(t))
            for name, t in times.items()}


def read_run(dataset: Any, indices: np.ndarray) -> Callable[[], int]:
    def run() -> int:
        for index in indices:
            dataset[int(index)]
        return len(indices)
    return run


def read_pages(batch: dict[str, Any]) -> None:
    """Read one byte of every 4 KiB page of each tensor of ``batch`` (each storage once): the
    least that a consumer of the batch (a pinning copy, ``.to(device)``) does with it."""
    tensors = [v for value in batch.values()
               for v in (value if isinstance(value, list | tuple) else [value])]
    for storage in distinct_storages(tensors):
        torch.empty(0, dtype=torch.uint8).set_(storage)[::4096].sum()


def distinct_storages(values: Iterable[Any]) -> list[torch.UntypedStorage]:
    """The storages of the tensors among ``values``, each once (views share one)."""
    return list({t.untyped_storage().data_ptr(): t.untyped_storage() for t in values
                 if isinstance(t, torch.Tensor)}.values())


def read_every_byte(value: Any) -> None:
    """Read every byte of each array and tensor in ``value`` (an item dict, a list of
    arrays; each storage once) on this thread with NumPy: what a consumer copying the item to
    a device, or computing on it, does at least."""
    values = list(value.values() if isinstance(value, dict) else value)
    arrays = [torch.empty(0, dtype=torch.uint8).set_(s).numpy()
              for s in distinct_storages(values)]
    arrays += [v.reshape(-1).view(np.uint8) for v in values if isinstance(v, np.ndarray)]
    for data in arrays:
        words = len(data) // 8
        np.add.reduce(data[:words * 8].view(np.uint64))
        np.add.reduce(data[words * 8:])


def batches_of(indices: np.ndarray, size: int) -> list[list[int]]:
    """``indices`` cut into batches of ``size`` (the last one may be shorter)."""
    return [indices[i:i + size].tolist() for i in range(0, len(indices), size)]


def loader_run(dataset: Any, batches: list[list[int]], collate: Callable | None = collate_distill,
               workers: int = 2, read_batches: bool = False,
               step: list[float] | None = None,
               worker_init: Callable[[int], None] | None = None) -> Callable[[], int]:
    """Items per round of a persistent DataLoader over ``batches`` (lists of indices) with
    ``collate`` (None: torch's default; ``workers`` 0: in this process), the main process
    reading every page of each batch with ``read_batches``, and doing ``step[0]`` seconds of a
    training step after each (``step`` is read every batch, so a caller switches it between
    conditions); ``worker_init``: the workers' ``worker_init_fn``."""
    parallel = {"multiprocessing_context": "forkserver", "prefetch_factor": 4,
                "persistent_workers": True, "worker_init_fn": worker_init} if workers else {}
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                        **parallel)
    for _ in loader:  # start the workers (and warm their caches) outside the timed rounds
        pass

    def run() -> int:
        for batch in loader:
            if read_batches:
                read_pages(batch)
            if step is not None:
                training_step(step[0])
        return sum(len(b) for b in batches)
    return run


def ingest_rate(shard: Path, out: Path, workers: int, layout: Layout) -> float:
    """samples/s of a whole ``ingest`` run into ``layout``, worker start-up included."""
    start = time.perf_counter()
    report = ingest(Sa1bTarSource(), [shard], out, workers=workers, layout=layout)
    return report.ingested / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--samples", type=int, default=48,
                        help="samples in the read test (9 copies of them must fit the page "
                             "cache and 3 more in RAM for the no-I/O reader: 48 is about 4.5 "
                             "GB)")
    parser.add_argument("--masks", type=int, default=24, help="annotations per image")
    parser.add_argument("--reads", type=int, default=192, help="random reads per reader a round")
    parser.add_argument("--tar-reads", type=int, default=6, help="the same, for TAR+NPZ")
    parser.add_argument("--loader-items", type=int, default=192,
                        help="DataLoader items a round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--workdir", default=None, help="where the data goes (temporary)")
    parser.add_argument("--name", default="sa1b_random_access")
    args = parser.parse_args()
    results = Results(args=vars(args))
    with tempfile.TemporaryDirectory(prefix="arraystore-bench-", dir=args.workdir) as tmp:
        root = Path(tmp)
        print("generating data ...", flush=True)
        shard = write_sa1b_shard(root / "shard.tar", args.samples, args.masks)
        print("ingest throughput ...", flush=True)
        results.ingest["1 worker"] = ingest_rate(shard, root / "one_worker.zarr", 1,
                                                 LAYOUTS["raw"])
        # the store every other is made from (via .bin); the raw rows read it
        results.ingest["2 workers"] = ingest_rate(shard, root / "raw.zarr", 2, LAYOUTS["raw"])
        bin_dir = root / "bin"
        BinExporter().export(root / "raw.zarr", bin_dir)
        results.disk["TAR+NPZ"] = (shard.stat().st_size, 1)
        results.disk[".bin"] = (sum((bin_dir / f.name).stat().st_size for f in bin_files()), 9)
        datasets: dict[str, Any] = {BIN: BinaryDistillDataset(bin_dir), TAR: TarNpzDataset(shard)}
        for label, layout in LAYOUTS.items():
            store = root / f"{label}.zarr"
            if label != "raw":
                ingest(BinDirectorySource(), [bin_dir], store, layout=layout, workers=2)
            info = store_info(store)
            results.disk[label] = (info.bytes_on_disk, info.files)
            for backend in BACKENDS:
                datasets[f"{label} / {backend}"] = ZarrDistillDataset(store, backend)
        for name in [n for n in datasets if " / " in n]:  # rows read through a library
            library = library_of(datasets[name])
            if library is not None:
                label = name.split(" / ")[0]
                reference = f"{label}: {LIBRARIES[library]} itself"
                if reference not in datasets:
                    datasets[reference] = LibraryItems(datasets[name], library)
                results.references[name] = reference
        results.item_bytes = sum(v.nbytes for v in datasets[BIN][0].values()
                                 if hasattr(v, "nbytes"))
        results.batch_size = BATCH
        datasets[NO_IO] = InMemoryDataset(
            [datasets[BIN].read_fields(i) for i in range(args.samples)], datasets[BIN].keys,
            halves=True)
        rng = np.random.default_rng(0)
        print("single-process random reads ...", flush=True)
        for dataset in datasets.values():  # warm the page cache and the handles
            read_run(dataset, np.arange(min(len(dataset), 8)))()
        for _ in range(2):
            for name in datasets:
                if name != TAR:
                    read_run(datasets[name], np.arange(args.samples))()
        singles = {name: read_run(d, rng.integers(0, args.samples,
                                                  args.tar_reads if name == TAR else args.reads))
                   for name, d in datasets.items()}
        print("profiling ...", flush=True)
        some = rng.integers(0, args.samples, args.reads)
        results.profiles = {name: time_shares(read_run(datasets[name], some))
                            for name in (DEFAULT, BIN)}
        step = [0.0]  # the training step after each DataLoader batch: set per condition
        loaders = {name: loader_run(datasets[name], batches_of(rng.integers(
            0, args.samples, args.loader_items // (8 if name == TAR else 1)), BATCH), step=step)
            for name in LOADER_READERS}
        for name in CONDITIONS:
            print(f"{name}: single process, then DataLoader (2 workers) ...", flush=True)
            step[0] = STEP_SECONDS if name == "busy" else 0.0
            with condition(name):
                single, loader = (interleaved(singles, args.rounds, seed=1),
                                  interleaved(loaders, args.rounds, seed=2))
            if name == "busy":
                results.busy_single, results.busy_loader = single, loader
            else:
                results.single, results.loader = single, loader
    print(write_report(results, Path(__file__).parent / "results" / args.name))


if __name__ == "__main__":
    main()
