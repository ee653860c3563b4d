"""Remote benchmark: a DataLoader (2 workers) over one SA-1B store on the local disk and in a
simulated cloud region (``arraystore.testing.cloud_region``: an S3-compatible file server on
loopback behind a proxy adding a round trip and capping each connection's bandwidth), fully
random and with locality-aware shuffling, idle and busy, interleaved round by round.

The loaders of one order are alive at a time (their workers stop before the next order's
start). Remote passes are read through (cold: no node-local cache; with and without
``ReadAhead``, which has each worker fetch its next batch while it fills this one) and through
a warm node-local cache (``cache_dir=``, filled by each loader's first, untimed pass). The
local and warm loaders read the order ``--passes`` times a round, the cold ones once.
The local store is read two ways: warm in the page cache (``--passes`` times a round), and
from the disk itself (a copy of it whose pages :mod:`benchmarks.page_cache` drops before every
pass, read once a round): a store larger than the node's memory is read so. Reported per
setting: items/s, × the local store in the same order and condition, the server's and the
proxy's CPU share (so a slow server would show), requests per item, and the shuffle's quality:
distinct shards per batch against a full shuffle's.

Usage: python -m benchmarks.remote [--samples 64] [--rtt-ms 20] [--mb-per-s 100] [-h]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from arraystore import Layout, ingest
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.loaders import ReadAhead, ZarrDistillDataset
from arraystore.loaders.samplers import shuffle
from arraystore.location import Location
from arraystore.testing.cloud_region import Region, cloud_region
from benchmarks.busy import CONDITIONS, STEP_SECONDS, condition
from benchmarks.data import write_sa1b_shard
from benchmarks.page_cache import evict, preadv_only, resident_fraction
from benchmarks.report import header, plot_bars, save_report
from benchmarks.run import batches_of, interleaved, loader_run

BATCH = 8
SHARD = 16
RESULTS = Path(__file__).parent / "results" / "remote"


def orders(count: int, seed: int) -> dict[str, np.ndarray]:
    """The index orders compared: a full shuffle, and locality windows of 1 and 2 shards."""
    found = {}
    for name, locality in (("fully random", None), ("locality (16, 2)", (SHARD, 2)),
                           ("locality (16, 1)", (SHARD, 1))):
        order = np.arange(count)
        shuffle(order, np.random.default_rng(seed), locality)
        found[name] = order
    return found


def shards_per_batch(order: np.ndarray) -> float:
    return float(np.mean([len(set((np.asarray(b) // SHARD).tolist()))
                          for b in batches_of(order, BATCH)]))


def link_ceiling(region: Region, root: Path, size: int = 256 << 20, requests: int = 16) -> float:
    """MB/s one process gets through the proxy with the readers' own client (S3 chunk GETs,
    :mod:`arraystore.s3_gets`): ``requests`` concurrent ranged GETs of one ``size``-byte
    object (what a worker's batch of requests amounts to)."""
    (root / "bucket" / "ceiling").write_bytes(np.random.default_rng(0).bytes(size))
    location = Location.of("s3://bucket", region.storage_options())
    part = size // requests
    starts = [n * part for n in range(requests)]
    location.read_ranges(["ceiling"], [0], [1], versioned=True)  # the URL signed, connected
    start = time.perf_counter()
    location.read_ranges(["ceiling"] * requests, starts, [s + part for s in starts],
                         versioned=True)
    seconds = time.perf_counter() - start
    (root / "bucket" / "ceiling").unlink()
    return size / seconds / 1e6


def dropping(store: Path, left: list[float]) -> Callable[[], None]:
    """What to do before each pass of a loader that reads ``store`` from the disk: drop its
    pages from the page cache, and append the share still cached after the drop to ``left``."""
    def drop() -> None:
        evict(store)
        left.append(resident_fraction(store))
    return drop


def _measure(loaders: dict[str, Any], step: list[float], region: Region, rounds: int,
             totals: dict[str, dict[str, float]],
             before: dict[str, Callable[[], None]]) -> dict[str, dict]:
    """Interleaved rounds of ``loaders``, idle then busy (``before``: what to do, untimed,
    before a loader's turn): their rates per condition; the server's and proxy's CPU seconds,
    the wall time and the requests added to ``totals``."""
    rates = {}
    for name in CONDITIONS:
        print(f"{name} ...", flush=True)
        step[0] = STEP_SECONDS if name == "busy" else 0.0
        with condition(name):
            used, asked, start = region.cpu_seconds(), region.requests(), time.perf_counter()
            rates[name] = interleaved(loaders, rounds, seed=3, before=before)
            wall = time.perf_counter() - start
            now, answered = region.cpu_seconds(), region.requests()
        total = totals.setdefault(name, {"wall": 0.0, "requests": 0.0})
        total["wall"] += wall
        total["requests"] += answered["requests"] - asked["requests"]
        for key in now:
            total[key] = total.get(key, 0.0) + now[key] - used[key]
    return rates


def region_arguments(doc: str) -> argparse.ArgumentParser:
    """The options of a benchmark in the simulated region, described by the first paragraph
    of ``doc``: samples, the link (round trip, bandwidth), rounds and the working folder."""
    parser = argparse.ArgumentParser(description=" ".join(doc.split("\n\n")[0].split()))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--mb-per-s", type=float, default=100.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="where the data goes (temporary)")
    return parser


def main() -> None:
    parser = region_arguments(__doc__)
    parser.add_argument("--passes", type=int, default=4,
                        help="passes over the order a round for the local and warm loaders")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="arraystore-remote-", dir=args.workdir) as tmp:
        root = Path(tmp)
        print("generating and ingesting ...", flush=True)
        store = root / "sa1b.zarr"
        ingest(Sa1bTarSource(), [write_sa1b_shard(root / "shard.tar", args.samples)], store,
               layout=Layout("sharded", shard_size=SHARD), workers=2)
        (root / "region" / "bucket").mkdir(parents=True)
        shutil.copytree(store, root / "region" / "bucket" / "sa1b.zarr")
        shutil.copytree(store, root / "disk.zarr")  # read from the disk: its pages dropped
        os.sync()  # only clean pages can be dropped
        item_bytes = sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) \
            / args.samples
        with cloud_region(root / "region", args.rtt_ms, args.mb_per_s) as region:
            local = ZarrDistillDataset(store)
            disk = ZarrDistillDataset(root / "disk.zarr")
            left: list[float] = []  # the disk copy's share still cached after each drop
            remote = ZarrDistillDataset("s3://bucket/sa1b.zarr",
                                        storage_options=region.storage_options())
            # each loader's first, untimed pass fills the cache; the timed ones read it warm
            cached = ZarrDistillDataset("s3://bucket/sa1b.zarr",
                                        storage_options=region.storage_options(),
                                        cache_dir=root / "cache", cache_limit="4GB")
            step = [0.0]
            order_of = orders(args.samples, seed=0)
            rates: dict[str, dict] = {name: {} for name in CONDITIONS}
            totals: dict[str, dict[str, float]] = {}
            for name, order in order_of.items():  # one order's loaders alive at a time
                print(f"{name}:", flush=True)
                # the memory-speed rows read the order --passes times a round (one pass is
                # ~0.1 s: too short to time against a DataLoader's start of an epoch)
                once, fast = (batches_of(np.tile(order, passes), BATCH)
                              for passes in (1, args.passes))
                loaders = {
                    f"local, {name}": loader_run(local, fast, step=step),
                    f"disk, {name}": loader_run(disk, once, step=step,
                                                worker_init=preadv_only),
                    f"remote, {name}": loader_run(remote, once, step=step),
                    f"ahead, {name}": loader_run(remote, ReadAhead(once, 2), step=step),
                    f"warm, {name}": loader_run(cached, fast, step=step)}
                drop = {f"disk, {name}": dropping(root / "disk.zarr", left)}
                for when, found in _measure(loaders, step, region, args.rounds, totals,
                                            drop).items():
                    rates[when].update(found)
                del loaders  # their workers go before the next order's start
                gc.collect()
            cpu = {when: {key: totals[when][key] / totals[when]["wall"]
                          for key in ("server", "proxy")} for when in CONDITIONS}
            requests = {when: totals[when]["requests"] for when in CONDITIONS}
            ceiling = link_ceiling(region, root / "region")
            description = region.describe()
    items = 2 * args.samples * args.rounds * len(order_of)  # cold items per condition
    lines = [*header("Remote benchmark: a DataLoader over an object store, cold and warm",
                     "remote", vars(args)), "",
             f"Simulation: {description}. Cold: every remote pass reads through; warm: "
             f"through a node-local cache its first, untimed pass filled (requests: HEADs "
             f"validating each shard once per worker). A DataLoader of 2 workers, batches of "
             f"{BATCH}, {args.samples} SA-1B "
             f"samples ({item_bytes / 2**20:.1f} MiB each on disk) in a sharded store "
             f"({SHARD} samples a shard); busy: a core spinning and a {STEP_SECONDS * 1000:.0f} ms "
             f"training step per batch. A round reads the order once from the disk and "
             f"cold, {args.passes} times from the page cache and warm (their rounds would be "
             f"too short to time otherwise). The disk row's store copy had at most "
             f"{max(left):.1%} of its pages still cached after a drop.", "",
             "| order | shards per batch (full shuffle: the first) | idle items/s page cache / "
             "disk / cold / cold read-ahead / warm | idle cold, read-ahead, warm × page cache; "
             "read-ahead × disk | busy items/s (the same) | busy ratios (the same) |",
             "|---|---:|---:|---:|---:|---:|"]
    ratios = {}
    for name, order in order_of.items():
        cells = []
        for when in CONDITIONS:
            here, disk_rate, cold, ahead, warm = (
                rates[when][f"{where}, {name}"][0]
                for where in ("local", "disk", "remote", "ahead", "warm"))
            ratios[f"{name}, {when}"] = cold / here
            ratios[f"{name}, {when}, ahead"] = ahead / here
            ratios[f"{name}, {when}, warm"] = warm / here
            ratios[f"{name}, {when}, ahead, disk"] = ahead / disk_rate
            cells += [f"{here:.1f} / {disk_rate:.1f} / {cold:.1f} / {ahead:.1f} / {warm:.1f}",
                      f"{cold / here:.2f}, {ahead / here:.2f}, {warm / here:.2f}; "
                      f"{ahead / disk_rate:.2f}"]
        lines.append(f"| {name} | {shards_per_batch(order):.2f} | " + " | ".join(cells) + " |")
    lines += ["", "| condition | server CPU | proxy CPU | requests per cold item (the warm "
                  "passes make none: each worker validated the shards in its untimed pass) |",
              "|---|---:|---:|---:|"]
    lines += [f"| {when} | {cpu[when]['server']:.0%} | {cpu[when]['proxy']:.0%} | "
              f"{requests[when] / items:.1f} |" for when in CONDITIONS]
    bound = ceiling * 1e6 / item_bytes
    lines += ["", f"What bounds the remote rows: one process fetching 16 ranges of one object at "
                  f"once through the proxy gets {ceiling:.0f} MB/s here, {bound:.0f} items/s of "
                  f"{item_bytes / 1e6:.1f} MB; the page-cache rows read at memory speed "
                  f"({rates['idle']['local, fully random'][0] * item_bytes / 1e9:.1f} GB/s), "
                  f"the disk rows at "
                  f"{rates['idle']['disk, fully random'][0] * item_bytes / 1e9:.2f} GB/s. A "
                  f"cold pass cannot come near 0.5x the page cache on this machine: that needs "
                  f"the bytes not to cross the link again, which is what the warm cache does."]
    cold = ratios["fully random, idle, ahead"], ratios["fully random, busy, ahead"]
    cold_disk = (ratios["fully random, idle, ahead, disk"],
                 ratios["fully random, busy, ahead, disk"])
    # every order reads a warm cache the same way: their mean, not the luckiest row
    warm = tuple(float(np.mean([ratios[f"{name}, {when}, warm"] for name in order_of]))
                 for when in CONDITIONS)
    lines += ["", "Targets of the object-storage issue (ratios within one run):",
              f"- remote, cold, fully random ≥ 0.5× local (with read-ahead), local read from "
              f"the page cache: {cold[0]:.2f}× idle, {cold[1]:.2f}× busy — "
              f"{'met' if min(cold) >= 0.5 else 'missed'}; local read from the disk: "
              f"{cold_disk[0]:.2f}× idle, {cold_disk[1]:.2f}× busy — "
              f"{'met' if min(cold_disk) >= 0.5 else 'missed'}",
              f"- read-ahead × without, cold, fully random: "
              f"{cold[0] / ratios['fully random, idle']:.2f}× idle, "
              f"{cold[1] / ratios['fully random, busy']:.2f}× busy",
              f"- warm cache ≥ 0.9× local (mean of the three orders' ratios): {warm[0]:.2f}× "
              f"idle, {warm[1]:.2f}× busy — {'met' if min(warm) >= 0.9 else 'missed'}",
              "- ahead of MDS and LitData cold: `benchmarks.remote_peers` (report "
              "`remote_peers.md`; the peers need a venv of their own: `make bench-peers`)", ""]
    print(save_report(lines, RESULTS))
    plot_bars([(f"{kind}, {when}", {name: ratios[f"{name}, {when}{suffix}"]
                                    for name in order_of})
               for kind, suffix in (("cold × page cache", ""),
                                    ("cold read-ahead × page cache", ", ahead"),
                                    ("cold read-ahead × disk", ", ahead, disk"),
                                    ("warm × page cache", ", warm")) for when in CONDITIONS],
              RESULTS.with_suffix(".png"), "× the local store")


if __name__ == "__main__":
    main()
