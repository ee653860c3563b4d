"""Sizing: adding a per-sample field in place writes only that field's bytes.

A store of ``--samples`` small samples gets a ``--mb`` MB/sample field (float32, computed from a
stored field by a cheap model, so the figure is the store's, not a source's). Reported: the
field's bytes, the bytes the add wrote (``wchar``: what it handed to ``write``; ``write_bytes``:
what reached the storage layer, both from ``/proc/self/io``), and how many files of the other
arrays changed (size or modification time). A byte count, not a speed ratio: no busy column.

Usage: python -m benchmarks.fields_add [--samples 10000] [--mb 4] [--layout raw]
(the default writes 40 GiB into a temporary folder in the home directory, ~4 minutes here)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from arraystore import Layout, ingest
from arraystore.converters.npz.source import NpzDirectorySource
from arraystore.field_values import ModelValues
from arraystore.fields import add_field
from arraystore.testing.npz_examples import write_sav_pairs
from benchmarks.report import header, plot_bars, save_report

RESULTS = Path(__file__).parent / "results" / "fields_add"


class Broadcast:
    """``mb`` MB of float32 per sample, from the sample's stored mask (a stand-in teacher)."""

    batch_size = 8

    def __init__(self, mb: float) -> None:
        self.side = int((mb * 2**20 / 4) ** 0.5)

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        level = masks.reshape(len(masks), -1).mean(axis=1, dtype=np.float32)
        return np.broadcast_to(level[:, None, None], (len(masks), self.side, self.side)).copy()

    def describe(self) -> dict[str, Any]:
        return {"model": "broadcast", "side": self.side}


def io_counters() -> dict[str, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {key: int(value) for key, value in fields.items()}


def files_of(store: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(store)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in store.rglob("*") if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--mb", type=float, default=4.0)
    parser.add_argument("--layout", choices=("raw", "sharded"), default="raw")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.home()) as folder:
        root = Path(folder)
        store = root / "s.zarr"
        ingest(NpzDirectorySource(), [write_sav_pairs(root / "npz", args.samples, size=16)],
               store, layout=Layout(args.layout, checksum=False), workers=1)
        model = Broadcast(args.mb)
        before, counters, start = files_of(store), io_counters(), time.perf_counter()
        summary = add_field(store, "teacher", ModelValues(model, "mask1"))
        seconds = time.perf_counter() - start
        after = io_counters()
        files = files_of(store)
        others = [k for k in before if k.split("/")[0] not in ("zarr.json",)]
        changed = sum(1 for k in others if files.get(k) != before[k])
        field_bytes = args.samples * model.side ** 2 * 4
        on_disk = sum(size for k, (size, _) in files.items() if k.startswith("teacher/"))
    wchar, written = after["wchar"] - counters["wchar"], after["write_bytes"] - counters[
        "write_bytes"]
    lines = header("Adding a field in place: bytes written", "fields_add", vars(args))
    lines += ["", f"{summary['message']}; {seconds:.1f} s "
                  f"({field_bytes / seconds / 2**20:.0f} MB/s of field data)", "",
              "| quantity | bytes | × the field's bytes |", "|---|---:|---:|",
              f"| the field ({args.samples} × {model.side}² float32) | {field_bytes:,} | 1.000 |",
              f"| its files on disk (`teacher/`) | {on_disk:,} | {on_disk / field_bytes:.3f} |",
              f"| handed to write() by the add (wchar) | {wchar:,} | {wchar / field_bytes:.3f} |",
              f"| sent to storage by the add (write_bytes) | {written:,} | "
              f"{written / field_bytes:.3f} |",
              "", f"Files of the other arrays changed: {changed} of {len(others)} (the group's "
                  f"`zarr.json` is rewritten: schema and consolidated metadata).", ""]
    print(save_report(lines, RESULTS))
    plot_bars([("bytes / the field's bytes", {"files on disk": on_disk / field_bytes,
                                              "wchar": wchar / field_bytes,
                                              "write_bytes": written / field_bytes})],
              RESULTS.with_suffix(".png"), "ratio")


if __name__ == "__main__":
    main()
