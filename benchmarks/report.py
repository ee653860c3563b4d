"""The benchmark's report: markdown tables with ratios to the ``.bin`` reader, the targets of
the performance issue checked against them, the machine, and a plot."""

from __future__ import annotations

import datetime as dt
import os
import platform
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.profile import copy_share

BIN, TAR, DEFAULT = ".bin (reference)", "TAR+NPZ (old path)", "sharded / auto"
NO_IO = "no I/O (field values copied from memory)"
BASELINES = (BIN, TAR, NO_IO)


@dataclass
class Results:
    args: dict[str, Any]
    single: dict[str, tuple[float, float]] = field(default_factory=dict)  # items/s, spread
    loader: dict[str, tuple[float, float]] = field(default_factory=dict)  # items/s, spread
    # the same, with another process spinning on a core (and a training step between batches)
    busy_single: dict[str, tuple[float, float]] = field(default_factory=dict)
    busy_loader: dict[str, tuple[float, float]] = field(default_factory=dict)
    ingest: dict[str, float] = field(default_factory=dict)  # samples/s
    disk: dict[str, tuple[int, int]] = field(default_factory=dict)  # bytes, files
    item_bytes: int = 0
    batch_size: int = 0
    profiles: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # cProfile shares
    # a row read through a library -> its reference: the library itself (benchmarks.library_items)
    references: dict[str, str] = field(default_factory=dict)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}")


def last_level_cache_bytes() -> int | None:
    """Bytes of the largest CPU cache of CPU 0 (Linux's sysfs), None where unknown."""
    sizes, units = [], {"K": 2**10, "M": 2**20, "G": 2**30}
    for level in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (level / "size").read_text().strip()
        except OSError:
            continue
        sizes.append(int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size))
    return max(sizes, default=None)


def _rate_table(idle: dict[str, tuple[float, float]], busy: dict[str, tuple[float, float]],
                item_bytes: int, references: Mapping[str, str]) -> list[str]:
    """A row per reader: items/s idle and busy, MB/s idle, each × the ``.bin`` reader of its
    condition, busy × its own reference (:func:`reference_of`), and the round spreads."""
    lines = ["| reader (layout / backend) | idle items/s | busy items/s | idle MB/s | idle × .bin "
             "| busy × .bin | busy × its reference | round spread idle / busy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (rate, spread) in idle.items():
        loaded, loaded_spread = busy[name]
        own = "—" if _is_reference(name, references) else \
            f"{loaded / busy[reference_of(name, references)][0]:.2f}"
        lines.append(f"| {name} | {rate:.1f} | {loaded:.1f} | {rate * item_bytes / 1e6:.0f} | "
                     f"{rate / idle[BIN][0]:.2f} | {loaded / busy[BIN][0]:.2f} | {own} | "
                     f"±{spread / 2:.0%} / ±{loaded_spread / 2:.0%} |")
    return lines


def reference_of(name: str, references: Mapping[str, str]) -> str:
    """A row's reference: the library itself for a row read through one, else the `.bin`
    reader."""
    return references.get(name, BIN)


def _is_reference(name: str, references: Mapping[str, str]) -> bool:
    return name in BASELINES or name in references.values()


def lowest_to_reference(results: Results, busy: bool) -> tuple[float, str]:
    """The lowest ratio of a row to its reference, and the row: single process, and through
    the DataLoader (where every row's reference is the `.bin` DataLoader)."""
    single, loader = ((results.busy_single, results.busy_loader) if busy
                      else (results.single, results.loader))
    return min((rates[name][0] / rates[reference_of(name, references)][0], name)
               for rates, references in ((single, results.references), (loader, {}))
               for name in rates if not _is_reference(name, results.references))


def _target(label: str, value: float, goal: float) -> str:
    verdict = "met" if value >= goal else f"**missed by {(goal - value) / goal:.0%}**"
    return f"| {label} | ≥ {goal:g}× | {value:.2f}× | {verdict} |"


def _rates(results: Results, busy: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """items/s by reader: single process, and through the DataLoader (idle, or busy)."""
    single, loader = ((results.busy_single, results.busy_loader) if busy
                      else (results.single, results.loader))
    return ({name: rate for name, (rate, _) in single.items()},
            {name: rate for name, (rate, _) in loader.items()})


def _targets(results: Results) -> list[str]:
    """The read targets, idle then busy."""
    lines = []
    for condition in ("idle", "busy"):
        s, dl = _rates(results, busy=condition == "busy")
        lines += [
            _target(f"defaults (sharded / auto), single process, {condition}",
                    s[DEFAULT] / s[BIN], 1.0),
            _target(f"defaults (sharded / auto), DataLoader 2 workers, {condition}",
                    dl[DEFAULT] / dl[BIN], 1.0),
            _target(f"stretch: defaults, single process, {condition}", s[DEFAULT] / s[BIN], 1.3),
            _target(f"raw / direct, single process, {condition}", s["raw / direct"] / s[BIN],
                    0.95),
            _target(f"defaults vs TAR+NPZ, single process, {condition}", s[DEFAULT] / s[TAR], 15),
            _target(f"defaults vs TAR+NPZ, DataLoader, {condition}", dl[DEFAULT] / dl[TAR], 15),
        ]
    lowest, row = lowest_to_reference(results, busy=True)
    lines.append(_target(f"no row below 0.5× its reference, busy (lowest: {row})", lowest, 0.5))
    return lines


def _where_the_time_goes(results: Results) -> list[str]:
    """Why the ratios are what they are: each reader against the no-I/O ceiling, and where a
    single-process read spends its time (cProfile)."""
    s, dl = _rates(results)
    batch_mb = results.batch_size * results.item_bytes / 1e6
    lines = [
        "## Where the time goes",
        "",
        f"- No I/O: `{NO_IO}` does only what every reader must also do (fill fresh arrays "
        f"of the item's size by copies within RAM, build the item dict from them), with the "
        f"store's own code (`arraystore.readers.halves`: the fields in two halves, one on a "
        f"helper thread). Single process (idle) it runs at {s[NO_IO]:.0f} items/s; the `.bin` "
        f"reader runs at {s[BIN] / s[NO_IO]:.2f}× of that, the defaults at "
        f"{s[DEFAULT] / s[NO_IO]:.2f}×. The `.bin` reader copies every byte out of the page "
        f"cache on one thread (`preadv`, profiled below); the defaults copy an item read "
        f"before out of their mapped shards on two threads.",
        f"- Through the DataLoader, per-item readers are bound by the hand-off (workers "
        f"collate {batch_mb:.0f} MB batches into fresh shared memory for the main process): "
        f"the no-I/O reader runs at {dl[NO_IO]:.0f} items/s and the `.bin` reader at "
        f"{dl[BIN] / dl[NO_IO]:.2f}× of it. The defaults read each batch straight into a "
        f"worker's reused shared buffer (`__getitems__`), past that bound: "
        f"{dl[DEFAULT] / dl[NO_IO]:.2f}× the no-I/O reader.",
    ]
    for name, shares in results.profiles.items():
        lines.append(
            f"- `{name}`, single process, under cProfile: copying the item's bytes (`preadv` "
            f"out of the page cache, torch's `copy_` out of mapped shards) is "
            f"{copy_share(shares):.0%} of the time; the largest own times: "
            + ", ".join(f"`{label}` {share:.0%}" for label, share in shares) + "."
        )
    return [*lines, ""]


def command_line(module: str, args: Mapping[str, Any]) -> str:
    """The command that repeats a run: ``python -m benchmarks.<module>`` with its options (all
    but the temporary ``workdir``)."""
    return f"python -m benchmarks.{module} " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in args.items()
        if v is not None and k != "workdir")


def header(title: str, module: str, args: Mapping[str, Any]) -> list[str]:
    """A report's first lines: its title, the machine, the date and the command that repeats
    the run."""
    return [f"# {title}", "", f"- machine: {machine()}",
            f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
            f"- command: `{command_line(module, args)}`"]


def save_report(lines: Sequence[str], stem: Path) -> str:
    """Write ``lines`` to ``<stem>.md``; return the text."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    stem.with_suffix(".md").write_text(text)
    return text


def plot_bars(panels: Sequence[tuple[str, Mapping[str, float]]], path: Path, xlabel: str,
              grey: Collection[str] = (), log: bool = False,
              reference: float | None = 1.0) -> None:
    """Horizontal bars, a panel per (title, {name: value}); ``grey`` names are baselines;
    ``reference`` draws a vertical line (1.0 for ratios)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [len(values) for _, values in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 0.28 * sum(heights) + 2),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (title, values) in zip(axes[:, 0], panels, strict=True):
        names = list(values)
        ax.barh(names, [values[n] for n in names],
                color=["grey" if n in grey else "tab:blue" for n in names])
        if log:
            ax.set_xscale("log")
        if reference is not None:
            ax.axvline(reference, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: Results, stem: Path) -> str:
    cmd = command_line("run", results.args)
    lines = [
        "# arraystore read benchmark: `ZarrDistillDataset` vs `.bin` vs TAR+NPZ",
        "",
        f"- machine: {machine()}",
        f"- date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; page cache warm",
        f"- command: `{cmd}`",
        f"- item: the `.bin` reader's item dict, {results.item_bytes / 2**20:.2f} MiB of tensors; "
        f"SA-1B-shaped samples (1500×2250-class JPEGs, {results.args['masks']} masks each, "
        f"compressed feature NPZs)",
        "- method: readers take turns within each round, in a random order; the median round "
        "gives items/s; ratios are to the `.bin` reader in the same run and condition; *round "
        "spread* is half the range of a reader's round times over their median (the noise of "
        "this machine). Busy: another process spins on one core, and the DataLoader rows run a "
        "5 ms training step in the main process after each batch. *Its reference*: the `.bin` "
        "reader, or, for a row whose fields are read through a library (TensorStore, "
        "zarr-python: the `/ tensorstore` and `/ zarr` rows, and the zstd layouts, which the "
        "direct backend leaves to TensorStore), that library itself reading the same store "
        "with no arraystore code between (`benchmarks/library_items.py`): such a row is bound "
        "by the library's cost per read, and its ratio to it is what arraystore adds.",
        "",
        "## Targets",
        "",
        "| target | goal | measured | |",
        "|---|---:|---:|---|",
        *_targets(results),
        "",
        "## Random access, single process",
        "",
        *_rate_table(results.single, results.busy_single, results.item_bytes,
                    results.references),
        "",
        "## Through a DataLoader (2 workers, batch 8, forkserver, persistent workers)",
        "",
        *_rate_table(results.loader, results.busy_loader, results.item_bytes, {}),
        "",
        f"## Ingest ({results.args['samples']} samples: TAR shard → raw store, decode + derive "
        f"+ write, worker start-up included)",
        "",
        "| run | samples/s |",
        "|---|---:|",
        *(f"| {name} | {rate:.2f} |" for name, rate in results.ingest.items()),
        "",
        "## On disk",
        "",
        "| format / layout | bytes | × .bin | files |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {nbytes / 1e6:.1f} MB | {nbytes / results.disk['.bin'][0]:.2f} | {files} |"
          for name, (nbytes, files) in results.disk.items()),
        "",
        *_where_the_time_goes(results),
        f"![plot]({stem.name}.png)",
        "",
    ]
    text = save_report(lines, stem)
    plot_bars([(title, {n: r / rates[BIN][0] for n, (r, _) in rates.items()})
               for title, rates in (("random access, single process, idle", results.single),
                                    ("random access, single process, busy",
                                     results.busy_single),
                                    ("DataLoader, 2 workers, idle", results.loader),
                                    ("DataLoader, 2 workers, busy", results.busy_loader))],
              stem.with_suffix(".png"), "items/s relative to the .bin reader (higher is faster)",
              grey=(*BASELINES, *results.references.values()))
    return text
