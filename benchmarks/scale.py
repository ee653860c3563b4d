"""Scale-out benchmark: ingest on Dask with 1 and 2 workers (a LocalCluster, started once per
size and not timed), and random reads of the same store from the local disk and from an
S3-compatible server on loopback (moto, in its own process), interleaved rounds.

Usage: python -m benchmarks.scale [--shards 4] [--samples 6] [--masks 100] [-h for the rest]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from arraystore import Layout, ingest
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.distributed import ingest_distributed
from arraystore.loaders import ZarrDistillDataset
from arraystore.testing.sa1b_shards import write_shard
from benchmarks.data import sa1b_like
from benchmarks.report import header, plot_bars, save_report
from benchmarks.run import interleaved, read_run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> subprocess.Popen:
    """moto's S3 server in a child process (so it does not share the reader's GIL)."""
    import boto3

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    for _ in range(100):
        try:
            boto3.client("s3").create_bucket(Bucket="arraystore-bench")
            return server
        except Exception:  # not listening yet
            time.sleep(0.1)
    raise RuntimeError("moto's server did not start")


def ingest_rates(shards: list[Path], layout: Layout, tmp: Path, rounds: int) -> dict:
    """Samples/s of a whole Dask ingest at 1 and 2 workers, rounds alternating."""
    from distributed import Client, LocalCluster

    rates: dict[int, list[float]] = {1: [], 2: []}
    clusters = {n: LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                dashboard_address=":0") for n in rates}
    try:
        for warm in clusters.values():  # import the converters in every worker once
            with Client(warm) as client:
                client.run(lambda: __import__("arraystore.converters.sa1b.source"))
        for r in range(rounds):
            for n in (1, 2) if r % 2 == 0 else (2, 1):
                start = time.perf_counter()
                report = ingest_distributed(Sa1bTarSource(), shards, tmp / f"d{n}-{r}.zarr",
                                            layout=layout,
                                            address=clusters[n].scheduler_address)
                rates[n].append(report.ingested / (time.perf_counter() - start))
    finally:
        for cluster in clusters.values():
            cluster.close()
    return {n: float(np.median(v)) for n, v in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--samples", type=int, default=8, help="samples per shard")
    parser.add_argument("--masks", type=int, default=100, help="annotations per image")
    parser.add_argument("--shard-size", type=int, default=4, help="samples per store shard")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reads", type=int, default=48, help="random items per read round")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--name", default="scale")
    args = parser.parse_args()
    layout = Layout("sharded", shard_size=args.shard_size)
    server = start_s3()
    try:
        with tempfile.TemporaryDirectory(prefix="arraystore-scale-", dir=args.workdir) as tmp:
            root = Path(tmp)
            shards = [write_shard(root / f"shard_{k}.tar",
                                  (replace(s, key=f"shard{k}_{s.key}") for s in sa1b_like(
                                      args.samples, args.masks, seed=k, small_fraction=0.9)))
                      for k in range(args.shards)]
            ingest_rate = ingest_rates(shards, layout, root, args.rounds)
            local = root / "read.zarr"
            ingest(Sa1bTarSource(), shards, local, layout=layout, workers=2)
            url = "s3://arraystore-bench/read.zarr"
            ingest(Sa1bTarSource(), shards, url, layout=layout, workers=2)
            datasets = {"local disk, direct (pread)": ZarrDistillDataset(local),
                        "S3 loopback, direct (ranged GETs)": ZarrDistillDataset(url),
                        "S3 loopback, tensorstore (s3 kvstore)":
                            ZarrDistillDataset(url, backend="tensorstore")}
            indices = np.random.default_rng(0).integers(0, len(datasets["local disk, direct "
                                                                       "(pread)"]), args.reads)
            for dataset in datasets.values():  # open handles, cache shard indexes: warm
                dataset[0]
            reads = interleaved({name: read_run(d, indices) for name, d in datasets.items()},
                                args.rounds, seed=0)
    finally:
        server.terminate()
        server.wait()
    print(write_report(args, ingest_rate, reads, Path(__file__).parent / "results" / args.name))


def write_report(args: argparse.Namespace, ingest_rate: dict, reads: dict, stem: Path) -> str:
    scaling = ingest_rate[2] / ingest_rate[1]
    local = next(iter(reads.values()))[0]
    lines = [
        *header("Scale-out benchmark: ingest on Dask, reads from an object store", "scale",
                vars(args)),
        f"- data: {args.shards} TAR shards of {args.samples} SA-1B-like samples (1500×2250-class "
        f"JPEGs, {args.masks} masks, 90% small); store layout sharded, {args.shard_size} "
        f"samples per shard; {args.rounds} rounds, alternating",
        "",
        "## Ingest with `--scheduler dask` (a LocalCluster, one thread per worker process)",
        "",
        "| workers | samples/s | × 1 worker |",
        "|---:|---:|---:|",
        *(f"| {n} | {rate:.2f} | {rate / ingest_rate[1]:.2f} |" for n, rate in
          ingest_rate.items()),
        "",
        f"Target ≥ 1.7× at 2 workers on this 2-core machine: **{scaling:.2f}×** "
        f"({'met' if scaling >= 1.7 else 'missed'}). The driver process shares the cores: it "
        f"commits each shard (block fields, ids, flags, one metadata write) and does no "
        f"decoding.",
        "",
        "Scaling to N machines: each TAR shard is one task that writes only its own region, "
        "and the driver's work per shard is about a dozen small writes and one metadata "
        "rewrite, so throughput is N × cores × the per-core decode rate until one of two "
        "shared limits: the driver's commit rate and the object store's request rate per "
        "prefix (docs/scale.md: a sharded store needs ~13/shard_size PUTs per sample).",
        "",
        "## Random reads (ZarrDistillDataset, all keys, single process)",
        "",
        "| reader | items/s | × local | round spread |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {rate:.1f} | {rate / local:.2f} | ±{spread / 2:.0%} |"
          for name, (rate, spread) in reads.items()),
        "",
        "The S3 server is moto on loopback, in its own process: a Python server, so this is a "
        "lower bound of what the client does against a real endpoint; an item's 7 per-sample "
        "chunks are fetched concurrently, shard indexes once per shard.",
        "",
        f"![plot]({stem.name}.png)",
        "",
    ]
    text = save_report(lines, stem)
    plot_bars([("Dask ingest, samples/s", {f"{n} worker{'s' * (n > 1)}": r
                                           for n, r in ingest_rate.items()}),
               ("random reads, items/s relative to the local disk",
                {name: rate / local for name, (rate, _) in reads.items()})],
              stem.with_suffix(".png"), "samples/s (top), × local (bottom)", reference=None)
    return text


if __name__ == "__main__":
    main()
