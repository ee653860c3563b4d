"""Fencing benchmark: the share of an object-store ingest spent on fencing a paused writer.

An ingest into moto's S3 server on loopback (started here; a correctness server, not a
throughput one: the shares, not the seconds, are the result) with each fencing step timed where
it runs: the lock object read again before each commit and growth, the conditional rewrite of
every array's metadata when they grow (a GET and an ``If-Match`` PUT each, all arrays at once,
where a plain PUT was before), and the group's metadata rewritten with its writer-token check
(a GET and an ``If-Match`` PUT; zarr's attribute write and consolidation before made a GET, a
listing and a read of every array's metadata too). An untimed ingest first (imports, the
server's first bucket), then once idle, once with another process keeping a core busy
(:mod:`benchmarks.busy`).

Usage: python -m benchmarks.fencing [--samples 32] [--shard-size 16]
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from arraystore import Layout, ingest
from arraystore import location as location_module
from arraystore import lock as lock_module
from arraystore import store as store_module
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.testing.sa1b_shards import ShardSample, random_masks, write_shard
from benchmarks.busy import CONDITIONS, condition
from benchmarks.report import header, plot_bars, save_report

STEPS = ("lock object read again", "array metadata rewrites (GET + If-Match PUT, at once)",
         "group metadata rewrite with token check")


class Timings:
    """Seconds and calls per fencing step, filled by the wrapped methods."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STEPS, 0.0)
        self.calls = dict.fromkeys(STEPS, 0)
        self.in_group = False

    def timed(self, step: str, method: Callable[..., Any],
              only: Callable[[], bool] = lambda: True) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not only():
                return method(*args, **kwargs)
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[step] += time.perf_counter() - start
                self.calls[step] += 1
        return wrapper


def instrument(timings: Timings) -> Callable[[], None]:
    """Wrap the fencing steps of this process's arraystore with timers; returns the function
    that takes the wrappers off again."""
    store_cls, lock_cls = store_module.Store, lock_module._ObjectLock
    rewrite_group, ensure_held = store_cls._rewrite_group, lock_cls.ensure_held
    update_each = location_module.ObjectLocation.update_each

    def in_group(self: Any, *args: Any, **kwargs: Any) -> Any:
        timings.in_group = True
        try:
            return rewrite_group(self, *args, **kwargs)
        finally:
            timings.in_group = False

    lock_cls.ensure_held = timings.timed(STEPS[0], ensure_held)
    location_module.ObjectLocation.update_each = timings.timed(
        STEPS[1], update_each, only=lambda: not timings.in_group)
    store_cls._rewrite_group = timings.timed(STEPS[2], in_group)

    def restore() -> None:
        lock_cls.ensure_held, store_cls._rewrite_group = ensure_held, rewrite_group
        location_module.ObjectLocation.update_each = update_each
    return restore


def s3_server() -> Any:
    """moto's S3 server on loopback, with the AWS variables pointing at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}",
                       "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_REGION": "us-east-1"})
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=16)
    args = parser.parse_args()
    server = s3_server()
    try:
        import boto3

        boto3.client("s3").create_bucket(Bucket="fencing")
        rng = np.random.default_rng(0)
        with tempfile.TemporaryDirectory(prefix="arraystore-fencing-") as tmp:
            shard = write_shard(Path(tmp) / "s.tar", [
                ShardSample(f"s{i:03d}", rng.integers(0, 256, (600, 800, 3), np.uint8),
                            random_masks(rng, 600, 800, 4)) for i in range(args.samples)])
            layout = Layout("sharded", shard_size=args.shard_size)
            ingest(Sa1bTarSource(), [shard], "s3://fencing/warm.zarr", workers=1, layout=layout)
            runs = {}
            for name in CONDITIONS:
                timings = Timings()
                uninstrument = instrument(timings)
                with condition(name):
                    start = time.perf_counter()
                    ingest(Sa1bTarSource(), [shard], f"s3://fencing/{name}.zarr", workers=1,
                           layout=layout)
                    runs[name] = (timings, time.perf_counter() - start)
                uninstrument()
    finally:
        server.stop()
    lines = header("Fencing benchmark: what fencing a paused writer costs an S3 ingest",
                   "fencing", vars(args))
    lines += [f"- data: {args.samples} SA-1B-shaped samples (600x800) ingested into moto's S3 "
              f"server on loopback, flushes of {args.shard_size} samples; the whole ingest "
              f"took {runs['idle'][1]:.2f} s idle, {runs['busy'][1]:.2f} s with a core busy",
              "", "| fencing step | calls | share idle | share busy |", "|---|---:|---:|---:|"]
    shares = {name: {step: timings.seconds[step] / total for step in STEPS}
              for name, (timings, total) in runs.items()}
    lines += [f"| {step} | {runs['idle'][0].calls[step]} | {shares['idle'][step]:.1%} | "
              f"{shares['busy'][step]:.1%} |" for step in STEPS]
    lines += [f"| all fencing | | {sum(shares['idle'].values()):.1%} | "
              f"{sum(shares['busy'].values()):.1%} |"]
    stem = Path(__file__).parent / "results" / "fencing"
    plot_bars([(f"share of the ingest's time, {name}", shares[name]) for name in CONDITIONS],
              stem.with_suffix(".png"), "share of the whole ingest", reference=None)
    print(save_report(lines, stem))


if __name__ == "__main__":
    main()
