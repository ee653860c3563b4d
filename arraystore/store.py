"""Create and open stores: a Zarr v3 group, one array per field, plus ``sample``, ``committed``.

The group attribute ``arraystore`` holds the format version, dataset kind, schema, layout and
provenance, so the store describes itself. ``sample`` (strings) holds the sample ids and becomes
the xarray index; ``committed`` (bool) says which samples hold complete data.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import zarr
from zarr.storage import StorePath

from arraystore.contract import disagreements
from arraystore.errors import (
    IncompatibleStoreError,
    NotAStoreError,
    OptionError,
    StoreExistsError,
    StoreFormatError,
    StoreLockedError,
    StoreNotFoundError,
)
from arraystore.keys import chunk_folder
from arraystore.layout import Layout
from arraystore.location import Location
from arraystore.schema import SAMPLE_DIM, Field, Schema
from arraystore.version import __version__

FORMAT_VERSION = 1
ATTRS_KEY = "arraystore"
SAMPLE_ARRAY = "sample"
COMMITTED_ARRAY = "committed"
WRITER_KEY = "writer"  # the lock token of the writer that holds the store (its fencing token)
REVOKED_KEY = "revoked"  # slot ranges no committed mark counts in (a broken lock's leftovers)
ADDED_KEY = "added_fields"  # fields added in place (`arraystore fields add`), with their flags
WriteMode = Literal["create", "append", "overwrite"]
WRITE_MODES: tuple[str, ...] = ("create", "append", "overwrite")

SAMPLE_FIELD = Field(SAMPLE_ARRAY, (), "str", (), "block", "sample id (the xarray index)")
COMMITTED_FIELD = Field(COMMITTED_ARRAY, (), "bool", (), "block", "the sample's data is complete")


def array_attributes(f: Field) -> dict[str, str]:
    """A field array's attributes: its description, and (for xarray, which reads the CF
    ``coordinates`` attribute) ``committed`` as a coordinate of every field, so that
    ``xarray.open_zarr`` shows which samples are complete beside the data instead of among it."""
    attributes = {"description": f.description} if f.description else {}
    if f.name not in (SAMPLE_ARRAY, COMMITTED_ARRAY):
        attributes["coordinates"] = COMMITTED_ARRAY
    return attributes


def create_field_array(group: zarr.Group, f: Field, layout: Layout) -> zarr.Array:
    """The empty array of ``f`` in ``layout``, made in ``group``: how every store's arrays are
    made, and so the definition :func:`expected_array_metadata` checks stores against."""
    return group.create_array(
        f.name,
        shape=(0, *f.shape),
        dtype=str if f.is_string else f.dtype,
        fill_value="" if f.is_string else 0,
        dimension_names=[SAMPLE_DIM, *f.dims],
        attributes=array_attributes(f),
        **layout.array_kwargs(f),
    )


@functools.lru_cache(maxsize=256)
def expected_array_metadata(f: Field, layout: Layout) -> dict[str, Any]:
    """The ``zarr.json`` of ``f``'s array in ``layout`` as this project writes it (made in
    memory by :func:`create_field_array`), for :func:`arraystore.contract.disagreements`."""
    written: dict[str, Any] = {}
    create_field_array(zarr.open_group(zarr.storage.MemoryStore(written), mode="w",
                                       zarr_format=3), f, layout)
    return json.loads(written[f"{f.name}/zarr.json"].to_bytes())


def _grown(raw: bytes, stop: int) -> bytes | None:
    """An array's ``zarr.json`` with its sample axis at least ``stop`` long; None if it is."""
    meta = json.loads(raw)
    if meta["shape"][0] >= stop:
        return None
    meta["shape"][0] = stop
    return json.dumps(meta, indent=2).encode()


def merged_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` sorted, with overlapping and touching ones joined, empty ones dropped."""
    out: list[tuple[int, int]] = []
    for start, stop in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


def _ranges(pairs: Any) -> list[tuple[int, int]]:
    return [(int(start), int(stop)) for start, stop in pairs]


def utc_now() -> str:
    """The current UTC time as provenance records it (ISO 8601, seconds)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


StoreTarget = str | os.PathLike[str] | Location  # a local path, an object-store URL, a Location


def is_store(path: StoreTarget, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``path`` is the root of an arraystore store."""
    try:
        _read_meta(Location.of(path, storage_options))
    except (StoreNotFoundError, NotAStoreError):
        return False
    return True


def _read_meta(location: Location) -> dict[str, Any]:
    if location.size("zarr.json") is None:
        if not location.exists():
            raise StoreNotFoundError(f"no store at {location}")
        raise NotAStoreError(
            f"{location} exists but is not an arraystore store (it has no zarr.json); "
            f"choose another output path"
        )
    try:
        group = zarr.open_group(location.zarr_store(read_only=True), mode="r", zarr_format=3,
                                use_consolidated=False)
    except Exception as exc:
        raise NotAStoreError(f"{location} is not a Zarr v3 group: {exc}") from exc
    meta = group.attrs.asdict().get(ATTRS_KEY)
    if not isinstance(meta, dict):
        raise NotAStoreError(
            f"{location} is a Zarr group but not an arraystore store (no {ATTRS_KEY!r} "
            f"attribute)"
        )
    return meta


class Store:
    """An open store. Use :meth:`create`, :meth:`open` or :func:`open_for_writing`."""

    def __init__(self, location: Location, group: zarr.Group, meta: dict[str, Any]) -> None:
        self.location = location
        self.path = location.path  # for messages: a Path, or the URL of an object store
        self.group = group
        self.meta = meta
        self.array_json: dict[str, bytes] = {}  # each array's zarr.json, as :meth:`open` read it
        # called before the arrays grow: a writer's check that it still holds the lock
        self.fence: Callable[[], None] | None = None
        self.writer_token: str | None = None  # set by :meth:`claim`
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreFormatError(
                f"{location}: store format version {version!r}; this arraystore ({__version__}) "
                f"reads version {FORMAT_VERSION}"
            )
        try:
            self.schema = Schema.from_json(meta["schema"])
            self.layout = Layout.from_json(meta["layout"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StoreFormatError(
                f"{location}: the schema or layout in the store's zarr.json is malformed "
                f"({type(exc).__name__}: {exc}); the store is damaged or was not made by "
                f"arraystore") from exc

    @property
    def kind(self) -> str:
        return self.schema.kind

    @property
    def read_only(self) -> bool:
        return self.group.store.read_only

    @property
    def provenance(self) -> dict[str, Any]:
        return self.meta.setdefault("provenance", {})

    @classmethod
    def open(cls, path: StoreTarget, mode: Literal["r", "r+"] = "r", *,
             check_arrays: bool = True,
             storage_options: Mapping[str, Any] | None = None) -> Store:
        """Open an existing, fully initialised store for reading (``r``) or updating (``r+``).

        Its arrays are checked against its schema (:meth:`check_arrays`); ``verify``, which
        reports each problem itself, opens without that check. ``path`` is a local path or an
        object-store URL (``s3://bucket/store.zarr``) with its ``storage_options``."""
        location = Location.of(path, storage_options)
        meta = _read_meta(location)
        if not meta.get("initialized", False):
            raise StoreFormatError(
                f"{location}: the store's creation was interrupted before its arrays existed; "
                f"re-run the ingest command (it recreates the store) or delete {location}"
            )
        group = zarr.open_group(location.zarr_store(read_only=mode == "r"), mode=mode,
                                zarr_format=3, use_consolidated=False)
        store = cls(location, group, meta)
        metadata = store.array_metadata()
        store.array_json = {n: raw for n, raw in metadata.items() if isinstance(raw, bytes)}
        missing = [name for name, raw in metadata.items() if raw is None]
        if missing:
            raise StoreFormatError(f"{location}: arrays {missing} of the schema are missing")
        if check_arrays:
            store.check_arrays(metadata)
        return store

    def array_metadata(self) -> dict[str, bytes | str | None]:
        """Each array's ``zarr.json`` by array name, in two fetches (an object store sends
        each one's requests together, where listing the group and then reading each array's
        metadata in turn cost ~0.44 s an open against moto): ``committed``'s, then the
        others'. Its bytes, None where the array is missing, or why it must not be read (a
        link, or a path out of the store: :meth:`Location.problem`; never read)."""
        names = [f.name for f in (*self.schema.fields, SAMPLE_FIELD, COMMITTED_FIELD)]
        refused = {n: self.location.problem(n) or self.location.problem(f"{n}/zarr.json")
                   or self.location.problem(f"{n}/c") for n in names}
        readable = [n for n in names if not refused[n]]
        fetched: dict[str, bytes | None] = {}
        # ``committed`` first, then the arrays it covers, all at once: a writer grows it after
        # them (:meth:`grow`), so none read after it is shorter than it says unless the store
        # is damaged. Read together, a growth between two reads showed a live store damaged.
        for group in ([n for n in readable if n == COMMITTED_ARRAY],
                      [n for n in readable if n != COMMITTED_ARRAY]):
            if not group:
                continue
            try:
                raw = self.location.read_many([f"{n}/zarr.json" for n in group])
            except OSError as exc:
                raise StoreFormatError(f"{self.path}: could not read the arrays' metadata: "
                                       f"{exc}") from exc
            fetched.update(zip(group, raw, strict=True))
        return {n: refused[n] or fetched[n] for n in names}

    def check_arrays(self, metadata: Mapping[str, bytes | str | None] | None = None) -> None:
        """Refuse a store whose arrays disagree with its schema and layout (their whole
        metadata: :func:`arraystore.contract.disagreements`), that are shorter than
        ``committed`` says, or whose array folders or metadata are links or lead outside it.
        ``metadata``: :meth:`array_metadata`, when the caller has it already."""
        metadata = self.array_metadata() if metadata is None else metadata
        lengths = {}
        for f in (*self.schema.fields, SAMPLE_FIELD, COMMITTED_FIELD):
            raw = metadata[f.name]
            if isinstance(raw, str):
                raise StoreFormatError(f"{self.path}: array {f.name!r} refused: {raw}")
            try:
                if raw is None:
                    raise FileNotFoundError(f"{f.name}/zarr.json does not exist")
                meta = json.loads(raw)
            except (OSError, ValueError) as exc:
                raise StoreFormatError(f"{self.path}: array {f.name!r}: metadata unreadable: "
                                       f"{exc}") from exc
            problems = disagreements(expected_array_metadata(f, self.layout), meta)
            if problems:
                raise StoreFormatError(
                    f"{self.path}: array {f.name!r} disagrees with the store's schema: "
                    f"{'; '.join(problems)}. The store is damaged or was made by something "
                    f"else; `arraystore verify` lists every problem")
            lengths[f.name] = meta["shape"][0]
        short = {n: length for n, length in lengths.items()
                 if length < lengths[COMMITTED_ARRAY]}
        if short:
            raise StoreFormatError(
                f"{self.path}: arrays {sorted(short)} hold {sorted(set(short.values()))} "
                f"samples, fewer than the {lengths[COMMITTED_ARRAY]} that {COMMITTED_ARRAY!r} "
                f"covers; the store is damaged (`arraystore verify` lists every problem)")

    @classmethod
    def create(
        cls,
        path: StoreTarget,
        schema: Schema,
        layout: Layout,
        *,
        overwrite: bool = False,
        extra_attrs: Mapping[str, Any] | None = None,
    ) -> Store:
        """Create an empty store (zero samples). ``overwrite`` replaces an existing *store* only."""
        location = Location.of(path)
        if not location.vacant():
            if not overwrite:
                raise StoreExistsError(
                    f"{location} already exists; use mode 'append' to add to it or 'overwrite' "
                    f"(--overwrite) to replace it"
                )
            _read_meta(location)  # refuses to delete anything that is not a store
            location.remove()
        elif location.exists():
            location.remove()  # an empty folder
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "initialized": False,
            "kind": schema.kind,
            "schema": schema.to_json(),
            "layout": layout.to_json(),
            "provenance": {"tool": f"arraystore {__version__}", "created": utc_now(),
                           "sources": []},
            "extra": dict(extra_attrs or {}),
        }
        group = zarr.open_group(location.zarr_store(read_only=False), mode="w-", zarr_format=3,
                                attributes={ATTRS_KEY: meta})
        for f in (*schema.fields, SAMPLE_FIELD, COMMITTED_FIELD):
            create_field_array(group, f, layout)
        meta["initialized"] = True
        store = cls(location, group, meta)
        store.save_meta()
        return store

    def array(self, name: str) -> zarr.Array:
        """The array of ``name``; writes store every chunk, zeros included, so that every
        committed sample has its chunk files (``write_empty_chunks`` is not persisted by zarr)."""
        return self.group[name].with_config({"write_empty_chunks": True})

    def _fenced(self) -> None:
        if self.fence is not None:
            self.fence()

    def grow(self, names: Iterable[str], stop: int) -> dict[str, zarr.Array]:
        """The arrays of ``names``, each grown to at least ``stop`` samples, never shrunk, and
        only while the writer still holds the store (:attr:`fence`, checked once). A writer
        frozen after that check, whose lock was broken meanwhile, must not shrink what the new
        holder grew: each array's metadata is rewritten only if nobody rewrote it since it was
        read (:meth:`Location.update_each`: ``If-Match`` on S3, the arrays at once; on a
        disk the ``flock`` leaves no other writer), and the arrays are made from the metadata
        stored then, not read again. ``committed`` grows last, once the others have."""
        self._fenced()
        names = list(names)
        stored: dict[str, bytes] = {}
        # ``committed`` after the arrays it covers, which readers read after it
        # (:meth:`array_metadata`): no reader sees it longer than an array it covers
        for group in ([n for n in names if n != COMMITTED_ARRAY],
                      [n for n in names if n == COMMITTED_ARRAY]):
            if group:
                stored.update(zip(group, self.location.update_each(
                    [f"{name}/zarr.json" for name in group],
                    functools.partial(_grown, stop=stop)), strict=True))
        return {name: zarr.Array.from_dict(StorePath(self.group.store, name),
                                           json.loads(stored[name]))
                .with_config({"write_empty_chunks": True}) for name in names}

    def check_writable(self, f: Field, start: int, stop: int) -> None:
        """Refuse to write samples ``start`` to ``stop`` of ``f`` when a folder on the way to
        their files is a link: a planted ``image/c/7`` leading out of the store would take the
        write with it (zarr follows links). A folder not there yet is made by the write."""
        if stop <= start:
            return
        per_file = self.layout.samples_per_file(f)
        self.location.refuse_links_to(
            chunk_folder(f.name, index, 1 + len(f.shape))
            for index in range(start // per_file, (stop - 1) // per_file + 1))

    def __len__(self) -> int:
        """Number of sample slots (committed or not)."""
        return int(self.array(SAMPLE_ARRAY).shape[0])

    def committed_extent(self) -> int:
        """How many slots ``committed`` really covers: its length, cut to the end of its last
        stored block. A writer grows the arrays before it writes, so blocks past the last
        one written hold nothing committed (they read as False); cutting there bounds every
        read of ``committed`` and ``sample`` by what is stored, so a length claimed by
        crafted metadata (10^12 samples) costs one listing, not a buffer of that length."""
        array = self.array(COMMITTED_ARRAY)
        block = array.chunks[0]
        stored = [int(n) for n in self.location.names(f"{COMMITTED_ARRAY}/c") if n.isdigit()]
        return min(array.shape[0], (max(stored) + 1) * block) if stored else 0

    def committed_mask(self) -> np.ndarray:
        """Which of the first :meth:`committed_extent` slots hold complete data: marked in
        ``committed`` and not in a revoked range (:meth:`claim`)."""
        mask = np.asarray(self.array(COMMITTED_ARRAY)[:self.committed_extent()], dtype=bool)
        for start, stop in self.revoked():
            mask[start:stop] = False
        return mask

    def revoked(self) -> list[tuple[int, int]]:
        """The slot ranges whose ``committed`` marks do not count: the slots a writer whose
        lock was broken had not committed when the new holder took over (:meth:`claim`)."""
        try:
            return _ranges(self.meta.get(REVOKED_KEY, []))
        except (TypeError, ValueError) as exc:
            raise StoreFormatError(f"{self.path}: {REVOKED_KEY!r} in the store's zarr.json is "
                                   f"malformed ({exc}); the store is damaged") from exc

    def sample_ids(self) -> np.ndarray:
        """The ids of the first :meth:`committed_extent` slots (the ``sample`` array may be
        longer after an interrupted write; its tail names no committed sample)."""
        return np.asarray(self.array(SAMPLE_ARRAY)[:self.committed_extent()])

    def committed_ids(self, committed: np.ndarray | None = None) -> set[str]:
        """The ids of the committed samples (``committed``: the :meth:`committed_mask` the
        caller read already, not read again)."""
        mask = self.committed_mask() if committed is None else committed
        return {str(s) for s in self.sample_ids()[mask]}

    def num_committed(self) -> int:
        return int(self.committed_mask().sum())

    def claim(self, token: str, revoke: Sequence[tuple[int, int]] = (),
              edit: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Make the writer of lock token ``token`` the store's writer: one conditional rewrite
        of the group's ``zarr.json`` that records the token (and, after a broken lock, the
        ``revoke`` ranges and the caller's ``edit`` of the metadata, made here too). From then
        on every metadata write of this object checks, in the same conditional rewrite, that
        the token is still there: a writer whose lock was broken while it was paused fails at
        its next metadata write instead of overwriting the new holder's, and the samples it
        commits after the new holder took over fall in revoked ranges, which no reader counts
        as committed. The fencing records are the store's: they are taken from its
        ``zarr.json``, never from what this object read at open."""
        def change(document: dict[str, Any]) -> None:
            meta = document["attributes"][ATTRS_KEY]
            meta[WRITER_KEY] = token
            meta[REVOKED_KEY] = [list(r) for r in merged_ranges(
                [*_ranges(meta.get(REVOKED_KEY, [])), *revoke])]
            if edit is not None:
                edit(meta)
            self.meta[REVOKED_KEY] = meta[REVOKED_KEY]

        self._rewrite_group(change)
        if edit is not None:
            edit(self.meta)
        self.meta[WRITER_KEY] = self.writer_token = token

    def save_meta(self) -> None:
        """Write the ``arraystore`` attribute and the consolidated metadata (every array's
        ``zarr.json``, so that ``xarray.open_zarr`` opens the store without a warning, and with
        one request on an object store) in one atomic rewrite of the group's ``zarr.json``.
        The consolidated metadata is a snapshot: writers call this after each run's commits
        (the ids, fields and ``committed`` it lists all agree then); this project's own
        readers never use it, as the arrays may have grown since."""
        arrays = {name: json.loads(raw) for name, raw in self.array_metadata().items()
                  if isinstance(raw, bytes)}

        def change(document: dict[str, Any]) -> None:
            stored = document["attributes"][ATTRS_KEY]  # its revoked ranges are never lost
            self.meta[REVOKED_KEY] = [list(r) for r in merged_ranges(
                [*_ranges(stored.get(REVOKED_KEY, [])), *self.revoked()])]
            document["attributes"][ATTRS_KEY] = self.meta
            document["consolidated_metadata"] = {"kind": "inline", "must_understand": False,
                                                 "metadata": arrays}

        self._rewrite_group(change)

    def _rewrite_group(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Rewrite the group's ``zarr.json`` as ``change`` edits its document, only if nobody
        rewrote it in between (:meth:`Location.update`) and only while the writer's token
        (:meth:`claim`) is the one recorded there."""
        def rewrite(raw: bytes) -> bytes:
            document = json.loads(raw)
            attributes = document.setdefault("attributes", {})
            recorded = attributes.get(ATTRS_KEY, {}).get(WRITER_KEY)
            if self.writer_token is not None and recorded != self.writer_token:
                raise StoreLockedError(
                    f"{self.path}: this writer's lock was broken and another writer took the "
                    f"store over; nothing more is committed by this run")
            attributes.setdefault(ATTRS_KEY, {})
            change(document)
            return json.dumps(document, indent=2).encode()

        self.location.update("zarr.json", rewrite)

    @property
    def added(self) -> list[str]:
        """The fields added in place after the store was made (and their ``has_`` flags):
        sources that append do not produce them."""
        return [str(n) for n in self.meta.get(ADDED_KEY, [])]

    def source_schema(self) -> Schema:
        """The schema a source appending to this store produces: the store's, without the
        fields added in place."""
        added = set(self.added)
        return Schema(self.kind, tuple(f for f in self.schema.fields if f.name not in added))

    def with_added_defaults(self, values: Mapping[str, Any]) -> Mapping[str, Any]:
        """A sample from a source, completed with the fields added in place that it lacks:
        zeros (an empty string), and so an unset ``has_`` flag."""
        lacking = [n for n in self.added if n not in values]
        if not lacking:
            return values
        return {**values, **{n: "" if self.schema[n].is_string else
                             np.zeros(self.schema[n].shape, self.schema[n].dtype)
                             for n in lacking}}

    def change_fields(self, add: Sequence[Field] = (), drop: Sequence[str] = ()) -> None:
        """Add fields (their arrays written already) to the schema, or drop fields from it,
        in one rewrite of the store's metadata (consolidated metadata included): readers
        see a field whole or not at all."""
        kept = tuple(f for f in self.schema.fields if f.name not in set(drop))
        schema = Schema(self.kind, kept + tuple(add))  # checks names and shared dimensions
        self.meta["schema"] = schema.to_json()
        self.meta[ADDED_KEY] = [n for n in self.added if n not in set(drop)] + \
            [f.name for f in add]
        self.schema = schema
        self.save_meta()

    def check_compatible(self, schema: Schema, layout: Layout | None) -> None:
        """Refuse to append data of another kind, schema or layout; say which option differs."""
        if schema.kind != self.kind:
            raise IncompatibleStoreError(
                f"{self.path} holds kind {self.kind!r}; cannot append kind {schema.kind!r}. "
                f"Choose another --out."
            )
        if schema != self.source_schema():
            ours, theirs = self.source_schema().to_json()["fields"], schema.to_json()["fields"]
            diffs = sorted(
                n for n in set(ours) | set(theirs) if ours.get(n) != theirs.get(n)
            )
            details = "; ".join(
                f"{n}: store {ours.get(n)} vs input {theirs.get(n)}" for n in diffs[:4]
            )
            raise IncompatibleStoreError(
                f"{self.path}: the input's schema differs from the store's in fields {diffs} "
                f"({details}). Use the options the store was created with (e.g. --max-boxes) or "
                f"another --out."
            )
        if layout is not None and layout != self.layout:
            raise IncompatibleStoreError(
                f"{self.path} was created with layout {self.layout.to_json()}; the command asked "
                f"for {layout.to_json()}. Omit the layout options to use the store's layout."
            )


def open_for_writing(
    path: StoreTarget,
    schema: Schema,
    layout: Layout | None,
    mode: WriteMode = "append",
    *,
    extra_attrs: Mapping[str, Any] | None = None,
) -> Store:
    """Open ``path`` for a writer.

    ``create`` fails if anything exists at ``path``; ``append`` creates the store if missing and
    otherwise resumes/extends it after checking kind, schema and layout; ``overwrite`` replaces an
    existing store (never a path that is not a store).
    """
    location = Location.of(path)
    if mode not in WRITE_MODES:
        raise OptionError(f"unknown mode {mode!r}; choose one of {WRITE_MODES}")
    location.check_can_hold_store()
    if mode == "overwrite" or location.vacant():
        return Store.create(location, schema, layout or Layout(), overwrite=True,
                            extra_attrs=extra_attrs)
    if mode == "create":
        raise StoreExistsError(
            f"{location} already exists; use --mode append to add to it or --overwrite to "
            f"replace it"
        )
    meta = _read_meta(location)
    if not meta.get("initialized", False):
        return Store.create(location, schema, layout or Layout(), overwrite=True,
                            extra_attrs=extra_attrs)
    store = Store.open(location, mode="r+")
    store.check_compatible(schema, layout)
    return store
