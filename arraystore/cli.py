"""The ``arraystore`` command line: a thin layer over the library.

Sources and exporters are found by name through entry points, so ``arraystore ingest NAME``
works for every installed converter, each with its own options. Errors print one line naming the
file, sample and fix, and exit with status 1; no traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from arraystore.errors import ArrayStoreError, OptionError
from arraystore.exporters import Exporter
from arraystore.field_values import values_from
from arraystore.fields import add_field, drop_field
from arraystore.fixes import Fix
from arraystore.info import store_info
from arraystore.ingest import ON_ERROR_CHOICES, IngestReport, ingest
from arraystore.layout import COMPRESSIONS, LAYOUT_NAMES, MAX_SHARD_SIZE, Layout
from arraystore.location import parse_storage_options
from arraystore.mix import describe_mix, read_mix_toml
from arraystore.node_cache import NodeCache
from arraystore.plugins import (
    EXPORTERS_GROUP,
    FIXES_GROUP,
    SOURCES_GROUP,
    PluginOption,
    load_plugin,
    plugin_names,
)
from arraystore.show import show
from arraystore.sources import Source
from arraystore.verify import verify
from arraystore.version import __version__

err = Console(stderr=True, soft_wrap=True)  # an error is one line, greppable in logs
# a line of text stays one line in a log (a long path must not break it); tables keep a width
out = Console(width=None if sys.stdout.isatty() else 132, soft_wrap=True)


def _run(action: Callable[[], Any], writes: bool = False) -> Any:
    """Run a command body, turning arraystore errors into one message and exit status 1.
    ``writes``: the command writes samples, so a failure keeps what it committed (and says
    so). Messages are printed as text: brackets in them (paths, lists) are not markup."""
    kept = "; committed samples are kept, re-run the same command to resume" if writes else ""
    try:
        return action()
    except ArrayStoreError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(1)
    except OSError as exc:  # disk full, permissions: the store stays consistent
        err.print(f"[bold red]error:[/] {escape(str(exc))}"
                  f"{kept + ' once the cause is fixed' if writes else ''}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print(f"[bold red]interrupted[/]{kept}")
        sys.exit(130)


def _storage_options(ctx: click.Context, param: click.Parameter,
                     pairs: tuple[str, ...]) -> dict[str, Any]:
    try:
        return parse_storage_options(pairs)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


STORAGE_OPTION_ARGS: tuple[list[str], dict[str, Any]] = (
    ["--storage-option", "storage_options"],
    dict(multiple=True, metavar="KEY=VALUE", callback=_storage_options,
         help="an fsspec storage option of an object-store URL (repeatable; dotted keys nest: "
              "client_kwargs.region_name=eu-west-1); AWS_* variables apply too"))
STORAGE_OPTION = click.Option(STORAGE_OPTION_ARGS[0], **STORAGE_OPTION_ARGS[1])
STORAGE_OPTION_DECORATOR = click.option(*STORAGE_OPTION_ARGS[0], **STORAGE_OPTION_ARGS[1])


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.group()
@click.version_option(__version__, prog_name="arraystore")
def cli() -> None:
    """arraystore: one Zarr v3 store for every per-sample tensor a training run reads."""


def _layout_from_options(layout: str | None, shard_size: int | None, compress: str | None,
                         checksum: bool | None) -> Layout | None:
    """The layout asked for, or None when no layout option was given (use the store's)."""
    if layout is None and shard_size is None and compress is None and checksum is None:
        return None
    settings: dict[str, Any] = {"name": layout or ("sharded" if shard_size else "raw")}
    if shard_size is not None:
        settings["shard_size"] = shard_size
    if compress is not None:
        settings["compression"] = compress
    if checksum is not None:
        settings["checksum"] = checksum
    return Layout(**settings)


def _checked_by(option: PluginOption) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback refusing a value ``option`` rejects, where the command line is parsed
    (before any store is opened or model built)."""
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            option.check(value)
        except OptionError as exc:
            raise click.BadParameter(str(exc)) from exc
        return value
    return callback


def _plugin_options(options: tuple[PluginOption, ...]) -> list[click.Option]:
    """Click options for the options a plug-in declares."""
    made = []
    for option in options:
        if option.type is bool:
            made.append(click.Option([option.flag], is_flag=True, default=bool(option.default),
                                     help=option.help))
        else:
            kind = (click.IntRange(option.minimum) if option.minimum is not None
                    else option.type)
            made.append(click.Option([option.flag], type=kind, multiple=option.multiple,
                                     required=option.required,
                                     default=() if option.multiple else option.default,
                                     show_default=not option.required, help=option.help,
                                     callback=_checked_by(option)))
    return made


def _fix_command(name: str) -> click.Command:
    fix_cls: type[Fix] = load_plugin(FIXES_GROUP, name)

    def run(store: str, progress: bool, **options: Any) -> None:
        summary = _run(lambda: fix_cls().run(store, progress=progress, **options), writes=True)
        out.print(summary.get("message", summary), highlight=False)
        sys.exit(0 if summary.get("ok", True) else 1)

    params: list[click.Parameter] = [
        click.Argument(["store"]),
        *_plugin_options(fix_cls.options),
        click.Option(["--progress/--no-progress"], default=sys.stderr.isatty(),
                     help="show a progress bar [on a terminal]"),
    ]
    return click.Command(name, callback=run, params=params, help=_doc_line(fix_cls),
                         short_help=_doc_line(fix_cls))


def _doc_line(cls: type) -> str:
    """The first docstring line of a plugin class, without reStructuredText markup."""
    return (cls.__doc__ or cls.__name__).strip().splitlines()[0].replace("``", "")


def _ingest_command(name: str) -> click.Command:
    source_cls: type[Source] = load_plugin(SOURCES_GROUP, name)

    def run(inputs: tuple[str, ...], out_path: str, mode: str, overwrite: bool, layout: str | None,
            shard_size: int | None, compress: str | None, checksum: bool | None,
            workers: int | None, on_error: str, progress: bool, scheduler: str,
            dask_address: str | None, storage_options: dict[str, Any], break_lock: bool,
            **options: Any) -> None:
        def body() -> None:
            source = source_cls(**options)
            common: dict[str, Any] = dict(
                mode="overwrite" if overwrite else mode,
                layout=_layout_from_options(layout, shard_size, compress, checksum),
                on_error=on_error, storage_options=storage_options,
                break_lock=break_lock)
            if scheduler == "dask":
                report = ingest_on_dask(source, list(inputs), out_path, dask_address, workers,
                                        progress, common)
            else:
                if dask_address:
                    raise click.UsageError("--dask-address needs --scheduler dask")
                report = ingest(source, list(inputs), out_path, workers=workers,
                                progress=progress, **common)
            out.print(
                f"{report.ingested} samples ingested into {report.store}"
                + (f", {report.already_stored} already stored" if report.already_stored else "")
                + (f", {len(report.units_already_done)} inputs already ingested"
                   if report.units_already_done else "")
            )
            if report.skipped:
                err.print(f"[yellow]{len(report.skipped)} skipped[/]; reasons in "
                          f"{report.report_path}")
        _run(body, writes=True)

    params: list[click.Parameter] = [
        click.Argument(["inputs"], nargs=-1, required=True),
        click.Option(["--out", "out_path"], required=True, help="the store to write"),
        click.Option(["--mode"], type=click.Choice(["create", "append"]), default="append",
                     show_default=True,
                     help="create: fail if --out exists; append: create it, or resume/extend it"),
        click.Option(["--overwrite"], is_flag=True,
                     help="replace an existing store at --out (never a path that is not a store)"),
        click.Option(["--layout"], type=click.Choice(LAYOUT_NAMES), default=None,
                     help="chunk files: raw (one per sample) or sharded [new store: sharded]"),
        click.Option(["--shard-size"], type=click.IntRange(1, MAX_SHARD_SIZE), default=None,
                     help=f"samples per shard in the sharded layout, at most {MAX_SHARD_SIZE} "
                          f"[{Layout().shard_size}]"),
        click.Option(["--compress"], type=click.Choice(COMPRESSIONS), default=None,
                     help="chunk compression [none]"),
        click.Option(["--checksum/--no-checksum"], default=None,
                     help="a crc32c per chunk, checked by every reader and by verify [yes]"),
        click.Option(["--workers"], type=click.IntRange(1), default=None,
                     help="decode processes; with --scheduler dask and no --dask-address, the "
                          "LocalCluster's worker processes [one per available core; with a "
                          "model on the CPU 1, the model's threads taking the cores; with a "
                          "model on an accelerator, the cores less one]"),
        click.Option(["--scheduler"], type=click.Choice(["local", "dask"]), default="local",
                     show_default=True,
                     help="local: this machine's processes; dask: a task per input on a Dask "
                          "cluster, each worker writing its own region of the store"),
        click.Option(["--dask-address"], default=None, metavar="ADDRESS",
                     help="a running Dask scheduler (tcp://host:8786) [a LocalCluster]"),
        STORAGE_OPTION,
        click.Option(["--break-lock"], is_flag=True,
                     help="take over an object store's stale writer lock (its writer stopped "
                          "heartbeating; a live writer's lock is never broken)"),
        click.Option(["--on-error"], type=click.Choice(ON_ERROR_CHOICES), default="fail",
                     show_default=True,
                     help="fail on a broken sample, or skip it and list it in a JSON report"),
        click.Option(["--progress/--no-progress"], default=sys.stderr.isatty(),
                     help="show a progress bar [on a terminal]"),
    ]
    params.extend(_plugin_options(source_cls.options))
    return click.Command(name, callback=run, params=params,
                         help=_doc_line(source_cls), short_help=_doc_line(source_cls))


def ingest_on_dask(source: Source, inputs: list[str], out_path: str, address: str | None,
                   workers: int | None, progress: bool, options: dict[str, Any]) -> IngestReport:
    """``ingest --scheduler dask``: the dashboard's link, then a bar of samples, bytes and each
    worker's throughput while the tasks run."""
    from arraystore.distributed import ingest_distributed

    columns = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                       TextColumn("{task.completed}/{task.total} inputs"),
                       TextColumn("{task.fields[samples]} samples, {task.fields[size]}"),
                       TextColumn("{task.fields[rates]}"), TimeElapsedColumn(),
                       disable=not progress, console=err)
    with columns as bar:
        task = bar.add_task("dask ingest", total=None, samples=0, size="0 B", rates="")

        def on_client(client: Any) -> None:
            err.print(f"Dask dashboard: {client.dashboard_link}", highlight=False)

        def on_progress(board: Any, report: IngestReport, left: int) -> None:
            done = len(report.units_ingested)
            bar.update(task, completed=done, total=done + left, samples=board.samples,
                       size=_human(board.nbytes), rates=board.rates())

        return ingest_distributed(source, inputs, out_path, address=address, workers=workers,
                                  on_progress=on_progress, on_client=on_client, **options)


class _PluginGroup(click.Group):
    """A group whose subcommands are the plugins registered under an entry-point group."""

    def __init__(self, *args: Any, plugin_group: str, factory: Callable[[str], click.Command],
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plugin_group = plugin_group
        self.factory = factory

    def list_commands(self, ctx: click.Context) -> list[str]:
        return plugin_names(self.plugin_group)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in plugin_names(self.plugin_group):
            return None
        return self.factory(cmd_name)


def _export_command(name: str) -> click.Command:
    exporter_cls: type[Exporter] = load_plugin(EXPORTERS_GROUP, name)

    @click.command(name, help=_doc_line(exporter_cls))
    @click.argument("store")
    @click.argument("out_dir")
    @click.option("--overwrite", is_flag=True, help="replace files already in OUT_DIR")
    @click.option("--progress/--no-progress", default=sys.stderr.isatty())
    def run(store: str, out_dir: str, overwrite: bool, progress: bool) -> None:
        summary = _run(lambda: exporter_cls().export(store, out_dir, overwrite=overwrite,
                                                     progress=progress))
        out.print(f"{summary['samples']} samples exported to {summary['out']}")

    return run


cli.add_command(_PluginGroup("ingest", plugin_group=SOURCES_GROUP, factory=_ingest_command,
                             help="Convert inputs into a store: "
                                  "`arraystore ingest SOURCE INPUTS... --out STORE`."))
cli.add_command(_PluginGroup("export", plugin_group=EXPORTERS_GROUP, factory=_export_command,
                             help="Write a store's committed samples in another format."))
cli.add_command(_PluginGroup("fix", plugin_group=FIXES_GROUP, factory=_fix_command,
                             help="Recompute fields of a store in place, resumably."))


@cli.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@STORAGE_OPTION_DECORATOR
def info(store: str, as_json: bool, storage_options: dict[str, Any]) -> None:
    """Kind, layout, samples committed and a table of arrays with their size on disk."""
    summary = _run(lambda: store_info(store, storage_options))
    if as_json:
        out.print_json(json.dumps(summary.to_json()))
        return
    out.print(f"[bold]{summary.path}[/]  kind [bold]{summary.kind}[/]  layout "
              f"[bold]{summary.layout_label}[/]", highlight=False)
    out.print(" ".join(f"{k}={v}" for k, v in summary.layout.items()), highlight=False)
    out.print(f"samples: {summary.committed} committed of {summary.samples}; "
              f"{_human(summary.bytes_on_disk)} in {summary.files} files", highlight=False)
    if summary.samples > summary.committed:
        out.print(f"uncommitted positions: {summary.samples - summary.committed}"
                  + (f" ({summary.reserved} reserved for a distributed ingest still running or "
                     f"interrupted: re-run it to finish)" if summary.reserved else
                     " (left by interrupted writes or unfilled ingest regions; invisible to "
                     "readers)"), highlight=False)
    table = Table("array", "shape", "dtype", "chunk", "codecs", "on disk", "files")
    for a in summary.arrays:
        table.add_row(a.name, "×".join(map(str, a.shape)), a.dtype, "×".join(map(str, a.chunks)),
                      a.codecs, _human(a.bytes_on_disk), str(a.files))
    out.print(table)
    sources = summary.provenance.get("sources", [])
    if sources:
        out.print(f"ingested from {len(sources)} inputs, e.g. {Path(sources[-1]['path']).name}")


@cli.command("verify")
@click.argument("store")
@click.option("--deep", is_flag=True, help="also decode every committed sample of every field")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@STORAGE_OPTION_DECORATOR
def verify_command(store: str, deep: bool, as_json: bool,
                   storage_options: dict[str, Any]) -> None:
    """Check metadata, chunk presence, sizes and crc32c; exit status 1 on any problem."""
    report = _run(lambda: verify(store, deep=deep, storage_options=storage_options))
    if as_json:
        out.print_json(json.dumps(report.to_json()))
    else:
        shown = 50
        for problem in report.problems[:shown]:
            err.print(f"[red]problem:[/] {problem}", highlight=False)
        if len(report.problems) > shown:
            err.print(f"... and {len(report.problems) - shown} more (use --json for all)")
        for note in report.notes:
            err.print(f"note: {note}", markup=False, highlight=False)
        verdict = "[green]ok[/]" if report.ok else f"[red]{len(report.problems)} problems[/]"
        out.print(f"{store}: {verdict}: {report.committed} committed samples of "
                  f"{report.samples}, {report.chunks_checked} chunks checked"
                  + (", every sample decoded" if deep else ""), highlight=False)
    sys.exit(0 if report.ok else 1)


@cli.group("fields")
def fields_group() -> None:
    """Add or drop per-sample fields of a store in place (nothing else is rewritten)."""


@fields_group.command("add")
@click.argument("store")
@click.argument("name")
@click.option("--from", "source", required=True,
              help="a folder of <sample id>.npz files, another store holding the field, or "
                   "model:FILE.py:FACTORY (FACTORY() returns a model run on --input)")
@click.option("--key", default=None,
              help="the array of each NPZ file [NAME, else the file's only array]")
@click.option("--field", "source_field", default=None, help="the other store's field [NAME]")
@click.option("--dims", default=None,
              help="the field's dimension names, comma-separated [NAME_0,NAME_1,...; a "
                   "store's: its own]")
@click.option("--input", "input_field", default=None,
              help="the stored field a model source reads (with --from model:...)")
@click.option("--output", type=click.IntRange(0), default=0,
              help="which of the model's outputs, if it returns several [0]")
@click.option("--force", is_flag=True, help="also rewrite samples that hold a value")
@click.option("--progress/--no-progress", default=sys.stderr.isatty(),
              help="show a progress bar [on a terminal]")
def fields_add(store: str, name: str, source: str, key: str | None, source_field: str | None,
               dims: str | None, input_field: str | None, output: int, force: bool,
               progress: bool) -> None:
    """Add field NAME to STORE from --from, keyed by sample id; re-run to resume or to fill
    samples added since (flag has_NAME says which samples hold a value)."""
    names = [d for d in dims.split(",") if d] if dims else None
    values = _run(lambda: values_from(source, key=key, field=source_field, dims=names,
                                      input_field=input_field, output=output))
    summary = _run(lambda: add_field(store, name, values, force=force, progress=progress),
                   writes=True)
    out.print(summary["message"], highlight=False)


@fields_group.command("drop")
@click.argument("store")
@click.argument("name")
def fields_drop(store: str, name: str) -> None:
    """Remove field NAME (one added with `fields add`) and its flag from STORE."""
    out.print(_run(lambda: drop_field(store, name))["message"], highlight=False)


@cli.group("cache")
def cache_group() -> None:
    """The node-local cache of reads from object stores (cache_dir= on readers and loaders,
    or ARRAYSTORE_CACHE_DIR)."""


@cache_group.command("info")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def cache_info(folder: str, as_json: bool) -> None:
    """Entries, bytes and objects the cache FOLDER holds, and the stores they come from."""
    held = _run(lambda: NodeCache(folder).usage())
    if as_json:
        out.print_json(json.dumps({"path": str(held.path), "entries": held.entries,
                                   "bytes": held.bytes, "objects": held.objects,
                                   "stores": list(held.stores)}))
        return
    out.print(f"{held.path}: {held.entries} entries, {_human(held.bytes)} from {held.objects} "
              f"objects of {len(held.stores)} stores", highlight=False)
    for store in held.stores:
        out.print(f"  {store}", highlight=False)


@cache_group.command("clear")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
def cache_clear(folder: str) -> None:
    """Delete the entries of the cache FOLDER (only files the cache wrote)."""
    held = _run(lambda: NodeCache(folder).clear())
    out.print(f"{held.path}: deleted {held.entries} entries, {_human(held.bytes)}",
              highlight=False)


@cli.group()
def mix() -> None:
    """Mixtures of stores for one training run (mix.toml: [[source]] tables)."""


@mix.command("describe")
@click.argument("mix_toml")
def mix_describe(mix_toml: str) -> None:
    """Each source's path, kind, samples, repeats/weight, share of an epoch; missing ones."""
    summaries = _run(lambda: describe_mix(read_mix_toml(mix_toml)))
    table = Table("dataset_type", "path", "kind", "samples", "repeats", "epoch share", "weight",
                  "draw share")
    for s in summaries:
        table.add_row(s.dataset_type, s.path, s.kind,
                      "missing" if s.missing else str(s.samples), str(s.repeats),
                      "-" if s.missing else f"{s.epoch_share:.1%}",
                      "-" if s.weight is None else f"{s.weight:g}",
                      "-" if s.weight_share is None else f"{s.weight_share:.1%}")
    out.print(table)
    present = [s for s in summaries if not s.missing]
    out.print(f"epoch with repeats: {sum(s.samples * s.repeats for s in present)} samples from "
              f"{len(present)} sources")
    for s in summaries:
        if s.missing:
            (err if s.required else out).print(
                f"{'[red]required' if s.required else '[yellow]optional'} source missing[/]: "
                f"{s.dataset_type} at {s.path}", highlight=False)
    sys.exit(1 if any(s.missing and s.required for s in summaries) else 0)


class _ManyValuesCommand(click.Command):
    """A command whose ``--fields`` takes several values (``--fields image1 mask1``): every
    word after it up to the next option is one more ``--fields`` value."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        spread: list[str] = []
        taking = False
        for arg in args:
            if arg == "--fields":
                taking = True
            elif taking and not arg.startswith("-"):
                spread += ["--fields", arg]
            else:
                taking = False
                spread.append(arg)
        return super().parse_args(ctx, spread)


@cli.command("show", cls=_ManyValuesCommand)
@click.argument("store")
@click.argument("samples", nargs=-1)
@click.option("--sample", "more_samples", multiple=True,
              help="a sample id to show (repeatable; ids with spaces or slashes)")
@click.option("--fields", multiple=True, help="show only these fields: --fields a b c")
@click.option("--count", type=click.IntRange(1), default=None,
              help="how many of the first committed samples, when none is named [4; for "
                   "embedding tables 2000, in one scatter]")
@click.option("-o", "--out", "out_path", default=None,
              help="the PNG to write [STORE.show.png, beside the store]")
def show_command(store: str, samples: tuple[str, ...], more_samples: tuple[str, ...],
                 fields: tuple[str, ...], count: int | None, out_path: str | None) -> None:
    """Draw samples of a store into one PNG: a row per sample, a panel per view of it."""
    names = [n for value in fields for n in value.split(",") if n]
    result = _run(lambda: show(store, [*samples, *more_samples], fields=names, count=count,
                               out=out_path))
    out.print(f"{len(result.sample_ids)} samples drawn: {result.path}", highlight=False)


def main() -> None:
    cli()
