"""Peers benchmark: random access to the same ``sa1b`` items in arraystore and in the libraries
a user would pick instead -- MosaicML Streaming (MDS), LitData and Lance, all uncompressed --
and in one flat file read with one ``os.pread`` per field (the floor of any per-field reader).

Every format is written from the same field arrays (every numeric field of the ``sa1b`` kind,
random values) and read one item at a time at random indices, single process, readers taking
turns round by round; each reader's items are first checked byte for byte against the arrays.
The peers are the optional ``bench`` extra, kept out of the default set-up: mosaicml-streaming
pins ``numpy<2.2`` and imports ``transformers``; ``make bench-peers`` installs them into a venv
of their own (``.venv-bench``) and runs this.

Usage: python -m benchmarks.peers [--samples 48] [--rounds 9] [-h for the rest]
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from arraystore import Layout, SampleReader, Store
from arraystore.info import store_info
from arraystore.kinds.sa1b import sa1b_schema
from benchmarks.batches import random_columns
from benchmarks.busy import CONDITIONS, condition
from benchmarks.data import fill_store
from benchmarks.profile import time_shares
from benchmarks.report import header, plot_bars, save_report
from benchmarks.run import interleaved, read_run

DEFAULT = "arraystore, sharded (the default), SampleReader.read"
RAW = "arraystore, raw, SampleReader.read"
FLAT = "one flat file, one pread per field"
MDS, LITDATA, LANCE = ("MosaicML Streaming (MDS) StreamingDataset[i]",
                       "LitData StreamingDataset[i]", "Lance take([i])")
BENCH_EXTRA = ("the peers are the optional 'bench' extra: `make bench-peers` (a venv of their "
               "own), or pip install -c constraints.txt '.[bench]'")


def numeric_fields() -> list[str]:
    return [f.name for f in sa1b_schema().fields if not f.is_string]


class FlatFile:
    """Every field of an item at a fixed offset in one file, items at a fixed stride: an item
    is one ``os.pread`` + ``np.frombuffer`` per field and nothing else."""

    def __init__(self, path: Path, columns: dict[str, np.ndarray], names: Sequence[str]) -> None:
        self.path = path
        self.parts: list[tuple[str, int, int, np.dtype, tuple[int, ...]]] = []
        offset = 0
        for name in names:
            row = columns[name][0]
            self.parts.append((name, offset, row.nbytes, row.dtype, row.shape))
            offset += row.nbytes
        self.stride = offset
        with open(path, "wb") as handle:
            for i in range(len(columns[names[0]])):
                for name in names:
                    handle.write(np.ascontiguousarray(columns[name][i]).tobytes())
        self.fd = os.open(path, os.O_RDONLY)

    def __getstate__(self) -> dict[str, Any]:  # LitData's workers open the file themselves
        return {**self.__dict__, "fd": None}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
        base = index * self.stride
        return {name: np.frombuffer(os.pread(self.fd, nbytes, base + offset), dtype
                                    ).reshape(shape)
                for name, offset, nbytes, dtype, shape in self.parts}


def flat_item(flat: FlatFile, index: int) -> dict[str, np.ndarray]:
    """Item ``index`` of ``flat`` as owned arrays (what LitData's ``optimize`` writes)."""
    return {name: value.copy() for name, value in flat[index].items()}


def import_peers() -> tuple[Any, Any, Any, Any]:
    """(streaming, litdata, lance, pyarrow), or a SystemExit that says how to install them."""
    from arraystore.compat import ensure_torchvision_ops

    ensure_torchvision_ops()  # streaming imports transformers, which imports torchvision
    try:
        import lance
        import litdata
        import pyarrow
        import streaming
    except ImportError as exc:
        raise SystemExit(f"benchmarks.peers: {exc}; {BENCH_EXTRA}") from exc
    return streaming, litdata, lance, pyarrow


def mds_dataset(streaming: Any, out: Path, columns: dict[str, np.ndarray],
                names: Sequence[str]) -> None:
    """The items written as an uncompressed MDS dataset in ``out``."""
    encodings = {n: f"ndarray:{columns[n].dtype.name}:{','.join(map(str, columns[n].shape[1:]))}"
                 if columns[n].ndim > 1 else columns[n].dtype.name  # a scalar encoding
                 for n in names}
    with streaming.MDSWriter(out=str(out), columns=encodings, compression=None) as writer:
        for i in range(len(columns[names[0]])):
            writer.write({n: columns[n][i] for n in names})


def write_mds(streaming: Any, out: Path, columns: dict[str, np.ndarray],
              names: Sequence[str]) -> Any:
    """An uncompressed MDS dataset of the items, opened as a local ``StreamingDataset``."""
    mds_dataset(streaming, out, columns, names)
    return streaming.StreamingDataset(local=str(out), batch_size=1, shuffle=False)


def optimize_litdata(litdata: Any, out: Path, flat: FlatFile, count: int) -> None:
    """The items written by ``litdata.optimize`` in ``out`` (uncompressed, one worker)."""
    litdata.optimize(fn=functools.partial(flat_item, flat), inputs=list(range(count)),
                     output_dir=str(out), chunk_bytes="64MB", num_workers=1, compression=None)


def write_litdata(litdata: Any, out: Path, flat: FlatFile, count: int) -> Any:
    """The items through ``litdata.optimize``, opened as a ``litdata.StreamingDataset``."""
    optimize_litdata(litdata, out, flat, count)
    return litdata.StreamingDataset(str(out))


class LanceRows:
    """A Lance dataset with a fixed-size binary column per field; ``rows[i]`` is ``take([i])``,
    each column's bytes viewed as the field's array (no copy past Arrow's)."""

    def __init__(self, lance: Any, pyarrow: Any, out: Path, columns: dict[str, np.ndarray],
                 names: Sequence[str]) -> None:
        table = pyarrow.table({
            n: pyarrow.array([columns[n][i].tobytes() for i in range(len(columns[n]))],
                             pyarrow.binary(columns[n][0].nbytes)) for n in names})
        lance.write_dataset(table, str(out))
        self.dataset = lance.dataset(str(out))
        self.parts = [(n, columns[n].dtype, columns[n].shape[1:]) for n in names]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        table = self.dataset.take([index])
        out = {}
        for name, dtype, shape in self.parts:
            chunk = table.column(name).chunk(0)
            width = chunk.type.byte_width
            out[name] = np.frombuffer(chunk.buffers()[1], dtype, count=int(np.prod(shape)),
                                      offset=chunk.offset * width).reshape(shape)
        return out


def check_same(name: str, reader: Any, columns: dict[str, np.ndarray],
               names: Sequence[str]) -> None:
    """Every item of ``reader`` holds exactly the arrays it was written from."""
    for i in range(len(columns[names[0]])):
        item = reader[i]
        for field in names:
            got = np.asarray(item[field])
            want = columns[field][i]
            if got.dtype != want.dtype or got.shape != want.shape or got.tobytes() != \
                    want.tobytes():
                raise AssertionError(f"{name}: item {i}, field {field!r} differs from what "
                                     f"was written")


def bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--reads", type=int, default=192, help="random items per reader a round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--name", default="peers")
    args = parser.parse_args()
    streaming, litdata, lance, pyarrow = import_peers()
    names = numeric_fields()
    columns = random_columns(args.samples)
    with tempfile.TemporaryDirectory(prefix="arraystore-peers-", dir=args.workdir) as tmp:
        root = Path(tmp)
        disk: dict[str, int] = {}
        readers: dict[str, Any] = {}
        for label, layout in ((DEFAULT, Layout()), (RAW, Layout("raw"))):
            path = root / f"{layout.name}.zarr"
            fill_store(Store.create(path, sa1b_schema(), layout), columns)
            readers[label] = SampleReader(path, fields=names)
            disk[label] = store_info(path).bytes_on_disk
        flat = readers[FLAT] = FlatFile(root / "items.flat", columns, names)
        readers[MDS] = write_mds(streaming, root / "mds", columns, names)
        readers[LITDATA] = write_litdata(litdata, root / "litdata", flat, args.samples)
        readers[LANCE] = LanceRows(lance, pyarrow, root / "lance", columns, names)
        disk[FLAT] = flat.path.stat().st_size
        for label, folder in ((MDS, "mds"), (LITDATA, "litdata"), (LANCE, "lance")):
            disk[label] = bytes_under(root / folder)
        for label, reader in readers.items():  # the bytes, and a warm page cache
            check_same(label, reader, columns, names)
        rng = np.random.default_rng(0)
        runs = {label: read_run(reader, rng.integers(0, args.samples, args.reads))
                for label, reader in readers.items()}
        rates = {}
        for name in CONDITIONS:
            with condition(name):
                rates[name] = interleaved(runs, args.rounds, seed=1)
        some = rng.integers(0, args.samples, args.reads)
        profiles = {label: time_shares(read_run(reader, some))
                    for label, reader in readers.items()}
        item_bytes = sum(columns[n][0].nbytes for n in names)
    print(write_report(args, rates, profiles, disk, item_bytes, len(names),
                       {"mosaicml-streaming": streaming.__version__,
                        "litdata": litdata.__version__, "pylance": lance.__version__},
                       Path(__file__).parent / "results" / args.name))


def _verdicts(rates: dict[str, tuple[float, float]]) -> tuple[str, float]:
    """(whether arraystore's default is the fastest library, the default / the flat file)."""
    default = rates[DEFAULT][0]
    peers = [label for label in rates if label not in (RAW, FLAT)]
    fastest = max(peers, key=lambda label: rates[label][0])
    verdict = ("met: arraystore's default is the fastest of them" if fastest == DEFAULT else
               f"missed: {fastest} reads {rates[fastest][0] / default:.2f}× as fast")
    return verdict, default / rates[FLAT][0]


def write_report(args: argparse.Namespace, rates: dict[str, dict[str, tuple[float, float]]],
                 profiles: dict[str, list[tuple[str, float]]], disk: dict[str, int],
                 item_bytes: int, fields: int, versions: dict[str, str], stem: Path) -> str:
    default = {c: rates[c][DEFAULT][0] for c in CONDITIONS}
    verdicts = {c: _verdicts(rates[c]) for c in CONDITIONS}
    lines = [
        *header("Peers benchmark: random access to the same items in arraystore, MDS, LitData "
                "and Lance", "peers", vars(args)),
        f"- data: {args.samples} `sa1b` items of random values, {fields} fields (every numeric "
        f"field), {item_bytes / 1e6:.2f} MB an item, uncompressed everywhere, in the page cache; "
        f"each reader's items checked byte for byte against the arrays they were written from",
        "- peers: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "- method: one item at a time at random indices, single process; readers take turns "
        "in a random order each round; items/s from the median round. *Idle*: nothing else "
        "runs; *busy*: another process spins on one core throughout",
        "- what an item is: arraystore hands out each large field read before as a private "
        "mapping of the page cache's pages, not a copy (the caller reads the bytes when it "
        "uses them: `batches.md` times items used so); the flat file, MDS and LitData copy "
        "every field into memory of their own",
        "",
        "| reader | idle items/s | × default | spread | busy items/s | × default | spread | "
        "on disk |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {label} | "
          + " | ".join(f"{rates[c][label][0]:.0f} | {rates[c][label][0] / default[c]:.2f} | "
                       f"±{rates[c][label][1] / 2:.0%}" for c in CONDITIONS)
          + f" | {disk[label] / 1e6:.0f} MB |" for label in rates["idle"]),
        "",
        *(f"Targets, {c}: the default layout the fastest random-access reader among the "
          f"libraries (arraystore, MDS, LitData, Lance): **{verdicts[c][0]}**; the default "
          f"within 10% of the flat file (the floor of a per-field reader): "
          f"**{verdicts[c][1]:.2f}×** ({'met' if verdicts[c][1] >= 0.9 else 'missed'})."
          for c in CONDITIONS),
        "",
        "## Where the time goes (cProfile own time of the top functions, each reader, idle)",
        "",
        *_profile_lines(profiles),
        f"![plot]({stem.name}.png)",
        "",
    ]
    text = save_report(lines, stem)
    plot_bars([(f"random access, single process, {c}",
                {k: r / default[c] for k, (r, _) in rates[c].items()}) for c in CONDITIONS],
              stem.with_suffix(".png"), "items/s relative to arraystore's default",
              grey=[FLAT])
    return text


def _profile_lines(profiles: dict[str, list[tuple[str, float]]]) -> list[str]:
    lines = []
    for label, shares in profiles.items():
        lines += [f"- {label}: " + "; ".join(f"`{name}` {share:.0%}" for name, share in shares),
                  ""]
    return lines


if __name__ == "__main__":
    main()
