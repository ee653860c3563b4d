"""Remote peers benchmark: arraystore, MosaicML Streaming (MDS) and LitData streaming the same
items cold from the same simulated cloud region, each through a DataLoader of 2 workers.

The items are the numeric fields of SA-1B-like samples (``benchmarks.batches.random_columns``),
written as an arraystore store (sharded, the default layout), an uncompressed MDS dataset and an
uncompressed LitData dataset, all copied into one bucket of ``arraystore.testing.cloud_region``
(an S3-compatible file server on loopback behind a proxy adding a round trip and capping each
connection's bandwidth: a simulation, not S3). Every pass is cold: a new dataset over a new,
empty local folder (MDS and LitData download whole shards into one; arraystore reads ranges and
keeps nothing) and a new DataLoader, shuffled, in a new process (nothing of an earlier pass
carries over). Its workers are forked: litdata sets the default start method to spawn, and a
spawned worker importing MDS's dependencies lacks the torchvision ops shim. Reported per
system, idle and with a core busy (and a 5 ms training step per batch): items/s over the whole
pass (from opening the dataset to the last batch), the time to the first batch, and the bytes
the server sent per item. Values are checked against the written arrays after the passes,
item by item, through each system's remote dataset.

Needs the ``bench`` and ``scale`` extras (``make bench-peers`` builds the venv).
Usage: python -m benchmarks.remote_peers [--samples 64] [--rounds 3] [-h]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, get_worker_info

from arraystore import Layout, Store
from arraystore.kinds.sa1b import sa1b_schema
from arraystore.loaders import ReadAhead, StoreItems
from arraystore.testing.cloud_region import Region, cloud_region
from benchmarks.batches import random_columns
from benchmarks.busy import CONDITIONS, STEP_SECONDS, condition, training_step
from benchmarks.data import fill_store
from benchmarks.peers import (
    FlatFile,
    check_same,
    import_peers,
    mds_dataset,
    numeric_fields,
    optimize_litdata,
)
from benchmarks.remote import region_arguments
from benchmarks.report import header, plot_bars, save_report

BATCH, WORKERS = 8, 2
ARRAYSTORE, MDS, LITDATA = ("arraystore (StoreItems, ReadAhead)", "MosaicML Streaming (MDS)",
                            "LitData")
SYSTEMS = (ARRAYSTORE, MDS, LITDATA)
RESULTS = Path(__file__).parent / "results" / "remote_peers"


def region_environment(endpoint: str) -> dict[str, str]:
    """The environment of a pass: the AWS variables the peers' boto3 clients read, pointing at
    the region (MDS takes its endpoint from ``S3_ENDPOINT_URL``)."""
    return {**os.environ, "S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "region", "AWS_SECRET_ACCESS_KEY": "region",
            "AWS_REGION": "us-east-1"}


def _own_s3_clients(worker: int) -> None:
    """An MDS worker's S3 clients made anew in the worker, as MDS makes them in a spawned one
    (it drops a client when it is unpickled, not when its process forks). A forked worker
    otherwise inherits the client the main process opened to read the index, and with it
    the pooled connection, which both workers then use at once and read each other's answers
    from: seen through the simulated region as passes stalled 60 s (botocore's read timeout,
    the server's log showing the GET answered once) and as shards written with another
    shard's bytes, which MDS then failed to read (6 of 38 passes)."""
    for stream in get_worker_info().dataset.streams:
        stream._downloader.clean_up()


def open_loader(system: str, endpoint: str, local: Path) -> Any:
    """``system``'s shuffled DataLoader of 2 workers over its copy in the region, caching (MDS,
    LitData) in the empty folder ``local``."""
    streaming, litdata, _, _ = import_peers()  # imported already: the pass times none of it
    if system == ARRAYSTORE:
        dataset = StoreItems("s3://bucket/store.zarr", fields=numeric_fields(),
                             storage_options={"endpoint_url": endpoint, "key": "region",
                                              "secret": "region"}, cache_dir="")
        batches = ReadAhead(BatchSampler(RandomSampler(dataset), BATCH, drop_last=False),
                            WORKERS)
        return DataLoader(dataset, batch_sampler=batches, num_workers=WORKERS,
                          multiprocessing_context="fork")
    if system == MDS:
        dataset = streaming.StreamingDataset(remote="s3://bucket/mds", local=str(local),
                                             shuffle=True, batch_size=BATCH)
        return DataLoader(dataset, batch_size=BATCH, num_workers=WORKERS,
                          multiprocessing_context="fork", worker_init_fn=_own_s3_clients)
    # LitData fetches chunks with obstore, whose client refuses plain HTTP unless allowed; the
    # simulated region speaks HTTP (real S3 is HTTPS). Forked workers inherit the setting.
    from litdata.streaming import downloader

    downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = "true"
    dataset = litdata.StreamingDataset("s3://bucket/litdata", shuffle=True, cache_dir=str(local),
                                       storage_options=boto3_options(endpoint))
    return litdata.StreamingDataLoader(dataset, batch_size=BATCH, num_workers=WORKERS,
                                       multiprocessing_context="fork")


def one_pass(system: str, endpoint: str, local: Path, step: float) -> dict[str, float]:
    """A cold pass of ``system`` in this process: its items, the seconds from opening the
    dataset (each fetches its index or metadata then) to the first batch and to the last."""
    if system == ARRAYSTORE:  # its object-store client, imported (as the peers are) untimed
        importlib.import_module("s3fs")
    start = time.perf_counter()
    items, first = 0, 0.0
    for batch in open_loader(system, endpoint, local):
        items += len(next(iter(batch.values())))
        first = first or time.perf_counter() - start
        training_step(step)
    return {"items": items, "first": first, "total": time.perf_counter() - start}


def boto3_options(endpoint: str) -> dict[str, Any]:
    """LitData's ``storage_options``: its boto3 client's arguments."""
    return {"endpoint_url": endpoint, "aws_access_key_id": "region",
            "aws_secret_access_key": "region", "region_name": "us-east-1"}


def run_pass(system: str, region: Region, scratch: Path, step: float) -> dict[str, float]:
    """:func:`one_pass` in a new process (no state of an earlier pass, any system's, carries
    over: MDS's shared memory, obstore's runtime), with an empty cache folder, removed after."""
    local = scratch / f"pass-{time.monotonic_ns()}"
    endpoint = region.storage_options()["endpoint_url"]
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.remote_peers", "--pass", system,
                               "--endpoint", endpoint, "--local", str(local), "--step",
                               str(step)], env=region_environment(endpoint),
                              capture_output=True, text=True, check=False)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    if done.returncode:
        raise SystemExit(f"{system}: the pass failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(region: Region, scratch: Path, step: float, rounds: int,
            seed: int) -> dict[str, dict[str, float]]:
    """Per system, the median over ``rounds`` passes of items/s (items over the pass's time),
    time to the first batch and server bytes per item; systems take turns in a random order
    each round."""
    rng = np.random.default_rng(seed)
    found: dict[str, list[dict[str, float]]] = {name: [] for name in SYSTEMS}
    for _ in range(rounds):
        for name in rng.permutation(SYSTEMS):
            sent = region.requests()["bytes"]
            done = run_pass(str(name), region, scratch, step)
            found[name].append({**done, "bytes": region.requests()["bytes"] - sent})
    return {name: {"items/s": statistics.median(r["items"] / r["total"] for r in rows),
                   "after first": statistics.median((r["items"] - BATCH) / (r["total"] - r["first"])
                                                    for r in rows),
                   "first": statistics.median(r["first"] for r in rows),
                   "slowest first": max(r["first"] for r in rows),
                   "bytes/item": statistics.median(r["bytes"] / r["items"] for r in rows),
                   "items": rows[0]["items"]}
            for name, rows in found.items()}


def main() -> None:
    parser = region_arguments(__doc__)
    parser.add_argument("--pass", dest="system", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--local", help=argparse.SUPPRESS)
    parser.add_argument("--step", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    streaming, litdata, _, _ = import_peers()
    if args.system:  # one pass, in a process of its own (run_pass)
        print(json.dumps(one_pass(args.system, args.endpoint, Path(args.local), args.step)))
        return
    names = numeric_fields()
    columns = random_columns(args.samples)
    with tempfile.TemporaryDirectory(prefix="arraystore-remote-peers-", dir=args.workdir) as tmp:
        root = Path(tmp)
        bucket = root / "region" / "bucket"
        bucket.mkdir(parents=True)
        print("writing the three datasets ...", flush=True)
        fill_store(Store.create(bucket / "store.zarr", sa1b_schema(), Layout()), columns)
        mds_dataset(streaming, bucket / "mds", columns, names)
        optimize_litdata(litdata, bucket / "litdata",
                         FlatFile(root / "items.flat", columns, names), args.samples)
        item_bytes = sum(columns[n][0].nbytes for n in names)
        with cloud_region(root / "region", args.rtt_ms, args.mb_per_s) as region:
            scratch = root / "scratch"
            results = {}
            for when in CONDITIONS:
                print(f"{when} ...", flush=True)
                with condition(when):
                    results[when] = measure(region, scratch, STEP_SECONDS if when == "busy"
                                            else 0.0, args.rounds, seed=5)
            endpoint = region.storage_options()["endpoint_url"]
            check_same(ARRAYSTORE, StoreItems("s3://bucket/store.zarr", fields=names,
                                              storage_options=region.storage_options(),
                                              cache_dir=""), columns, names)
            os.environ.update(region_environment(endpoint))
            check_same(MDS, streaming.StreamingDataset(remote="s3://bucket/mds",
                                                       local=str(scratch / "mds-check")),
                       columns, names)
            check_same(LITDATA, open_loader(LITDATA, endpoint, scratch / "litdata-check"
                                            ).dataset, columns, names)
            description = region.describe()
    lines = [*header("Remote peers: streaming the same items cold from one simulated region",
                     "remote_peers", vars(args)), "",
             f"Simulation: {description}. {args.samples} items of {item_bytes / 1e6:.1f} MB "
             f"(the {len(names)} numeric SA-1B fields), shuffled, batches of {BATCH}, a "
             f"DataLoader of {WORKERS} workers (LitData: its StreamingDataLoader). Every pass "
             f"is cold: a new dataset, an empty local folder. items/s: the pass's items over "
             f"its time, from opening the dataset to the last batch; busy: a core spinning and "
             f"a {STEP_SECONDS * 1000:.0f} ms training step per batch. Versions: "
             f"mosaicml-streaming {streaming.__version__}, litdata {litdata.__version__}.", "",
             "| system | idle items/s: after the first batch / whole pass | idle first batch s: "
             "median / slowest | busy items/s: after the first batch / whole pass | busy first "
             "batch s: median / slowest | server MB per item |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in SYSTEMS:
        idle, busy = results["idle"][name], results["busy"][name]
        lines.append(f"| {name} | {idle['after first']:.1f} / {idle['items/s']:.1f} | "
                     f"{idle['first']:.2f} / {idle['slowest first']:.2f} | "
                     f"{busy['after first']:.1f} / {busy['items/s']:.1f} | "
                     f"{busy['first']:.2f} / {busy['slowest first']:.2f} | "
                     f"{idle['bytes/item'] / 1e6:.1f} |")
    ahead = {(when, measure): min(results[when][ARRAYSTORE][measure]
                                  / results[when][peer][measure] for peer in (MDS, LITDATA))
             for when in CONDITIONS for measure in ("after first", "items/s")}
    lines += ["", "Target of the object-storage issue: ahead of MDS and LitData cold — "
                  "arraystore's items/s × the faster peer's, after the first batch: "
                  f"{ahead['idle', 'after first']:.2f}× idle, "
                  f"{ahead['busy', 'after first']:.2f}× busy; over the whole pass: "
                  f"{ahead['idle', 'items/s']:.2f}× idle, {ahead['busy', 'items/s']:.2f}× busy "
                  f"— {'met' if min(ahead.values()) > 1 else 'missed'} (the first batch waits "
                  f"for the workers to start and, for MDS and LitData, a whole shard)", ""]
    print(save_report(lines, RESULTS))
    plot_bars([(f"items/s after the first batch, {when}",
                {name: results[when][name]["after first"] for name in SYSTEMS})
               for when in CONDITIONS], RESULTS.with_suffix(".png"), "items/s", reference=None)


if __name__ == "__main__":
    main()
