"""Grow a store in place: ``arraystore fields add|drop`` -- a new teacher's features, new
embeddings, without rewriting what the store holds.

An added field is one new array beside the others plus a ``has_<name>`` flag array (which
samples hold a value); no other array is touched. A new field's arrays are written first, a file
at a time, every committed sample's file included (zeros where the source has no value), and the
field joins the schema in one metadata rewrite at the end: a reader never sees a half-added field,
and readers opened before keep reading what they knew. A killed add resumes from the files it
recorded as done. Adding again to an existing added field fills the samples whose flag is unset
(all with ``force``), data made durable before flags. Samples appended later get zeros and an
unset flag. Only added fields can be dropped: the others are the kind's contract.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from rich.progress import Progress

from arraystore.errors import OptionError, UnknownSampleError
from arraystore.field_values import FieldValues
from arraystore.schema import Field
from arraystore.store import Store, create_field_array, utc_now
from arraystore.update import StoreUpdater

FLAG_PREFIX = "has_"
ADDING_KEY = "adding"  # {name: {"field": ..., "files_done": n}} while a new field is written
RECORD_EVERY_SECONDS = 2.0  # how often a new field's progress is recorded (redone on resume)


def flag_field(field: Field) -> Field:
    return Field(FLAG_PREFIX + field.name, (), "bool", (), "block",
                 f"the sample holds a value of {field.name!r}")


def _unknown_ids(source: FieldValues, committed: set[str], store: Store) -> None:
    ids = source.ids()
    if ids is None:
        return
    unknown = [i for i in ids if i not in committed]
    if unknown:
        raise UnknownSampleError(
            f"{source.describe().get('path', source)}: {len(unknown)} of its {len(ids)} sample "
            f"ids are not committed samples of {store.path} (e.g. {unknown[:5]}); nothing was "
            f"written. Add the samples first, or give a source with only the store's ids")


def _check_new(store: Store, field: Field) -> None:
    taken = [n for n in (field.name, FLAG_PREFIX + field.name) if n in store.schema]
    if taken:
        raise OptionError(f"{store.path}: the store already has a field {taken[0]!r} of its "
                          f"kind {store.kind!r}; choose another name")


def add_field(store_path: str | os.PathLike[str], name: str, source: FieldValues, *,
              force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Add field ``name`` with ``source``'s values to the store (see the module docstring), or
    fill more samples of a field added before. Returns a summary with ``message``."""
    store = Store.open(store_path, "r+")
    source.open(store_path)
    field = source.declare(name)
    _unknown_ids(source, store.committed_ids(), store)  # before the store is touched
    with StoreUpdater(store) as updater:
        committed = np.flatnonzero(updater.committed)
        ids = [str(s) for s in store.sample_ids()[committed]]
        if name in store.added:
            if replace(store.schema[name], description=field.description) != field:
                raise OptionError(f"{store.path}: field {name!r} was added as "
                                  f"{store.schema[name].to_json()}; this source gives "
                                  f"{field.to_json()}: drop it first to change it")
            flags = np.asarray(store.array(FLAG_PREFIX + name)[:len(updater.committed)])
            todo = [n for n, p in enumerate(committed) if force or not flags[p]]
            written = _fill(updater, field, committed, ids, todo, source, progress)
            new = False
        else:
            _check_new(store, field)
            written = _write_new(updater, store, field, committed, ids, source, progress)
            new = True
        store.provenance.setdefault("fields", []).append(
            {"field": name, "added": new, "samples": written, "when": utc_now(),
             **source.describe()})
        store.save_meta()
    flags = np.asarray(store.array(FLAG_PREFIX + name)[:len(updater.committed)])
    holding = int(flags[committed].sum())
    return {"ok": True, "field": name, "written": written, "holding": holding,
            "committed": len(committed),
            "message": f"{'added' if new else 'filled'} field {name!r} "
                       f"({'x'.join(map(str, field.shape)) or 'scalar'} {field.dtype}): "
                       f"{written} samples written; {holding} of {len(committed)} committed "
                       f"samples hold a value (flag {FLAG_PREFIX}{name})"}


def _fill(updater: StoreUpdater, field: Field, committed: np.ndarray, ids: list[str],
          todo: Sequence[int], source: FieldValues, progress: bool) -> int:
    """Write ``source``'s values of the committed samples ``todo`` (indices into
    ``committed``) that it has, then set their flags; returns how many."""
    positions = [int(committed[n]) for n in todo]
    id_at = {int(committed[n]): ids[n] for n in todo}
    written = 0
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"fields add {field.name}", total=len(positions))
        for group in updater.file_groups(positions, (field.name,)):
            values = _group_values(source, field, group, id_at)
            have = [(p, v) for p, v in zip(group, values, strict=True) if v is not None]
            if have:
                updater.write([p for p, _ in have], {field.name: np.stack([v for _, v in have])},
                              {FLAG_PREFIX + field.name: True})
                written += len(have)
            bar.advance(task, len(group))
    return written


def _write_new(updater: StoreUpdater, store: Store, field: Field, committed: np.ndarray,
               ids: list[str], source: FieldValues, progress: bool) -> int:
    """Write a new field's arrays for every committed sample, recording progress, then make
    the field part of the schema."""
    flag = flag_field(field)
    pending = store.meta.setdefault(ADDING_KEY, {})
    record = pending.get(field.name)
    if record is not None and record["field"] != field.to_json():
        raise OptionError(f"{store.path}: an interrupted add of {field.name!r} wrote "
                          f"{record['field']}; this source gives {field.to_json()}. Re-run it "
                          f"with the same source, or `arraystore fields drop` it first")
    if record is None:
        for made in (field, flag):
            if made.name in store.group:  # left by an add that died before recording
                del store.group[made.name]
            create_field_array(store.group, made, store.layout)
        store.grow([field.name, flag.name], len(store))
        record = pending[field.name] = {"field": field.to_json(), "files_done": 0}
        store.save_meta()
    updater.unlisted.update({field.name: field, flag.name: flag})
    id_at = dict(zip(committed.tolist(), ids, strict=True))
    groups = updater.file_groups(committed.tolist(), (field.name,))
    written, recorded = 0, time.monotonic()
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"fields add {field.name}", total=len(committed),
                            completed=sum(len(g) for g in groups[:record["files_done"]]))
        for number, group in enumerate(groups[record["files_done"]:], record["files_done"]):
            values = _group_values(source, field, group, id_at)
            has = np.array([v is not None for v in values])
            rows = np.zeros((len(group), *field.shape), field.dtype)
            for row, value in enumerate(values):
                if value is not None:
                    rows[row] = value
            updater.write(group, {field.name: rows}, {flag.name: has})
            written += int(has.sum())
            bar.advance(task, len(group))
            if time.monotonic() - recorded > RECORD_EVERY_SECONDS:
                record["files_done"], recorded = number + 1, time.monotonic()
                store.save_meta()
    del pending[field.name]
    if not pending:
        del store.meta[ADDING_KEY]
    store.change_fields(add=[field, flag])
    return written


def _group_values(source: FieldValues, field: Field, group: list[int],
                  id_at: dict[int, str]) -> list[np.ndarray | None]:
    """``source``'s values of the samples at store positions ``group`` (None: it has none),
    each checked against ``field``."""
    values = source.read([id_at[p] for p in group], group)
    return [None if value is None else _checked(value, field, id_at[p])
            for p, value in zip(group, values, strict=True)]


def _checked(value: Any, field: Field, sample_id: str) -> np.ndarray:
    value = np.asarray(value)
    if value.shape != field.shape or not np.can_cast(value.dtype, field.dtype, "same_kind"):
        raise OptionError(f"sample {sample_id!r}: a value of shape {value.shape} {value.dtype}; "
                          f"field {field.name!r} is {field.shape} {field.dtype} (as its first "
                          f"value declared it)")
    return value


def drop_field(store_path: str | os.PathLike[str], name: str) -> dict[str, Any]:
    """Remove a field added in place (and its flag): out of the schema first, then its
    arrays, so a reader never meets a listed field without its arrays."""
    store = Store.open(store_path, "r+")
    with StoreUpdater(store):
        pending = store.meta.get(ADDING_KEY, {})
        if name not in store.added and name not in pending:
            listed = [n for n in store.added if not n.startswith(FLAG_PREFIX)]
            raise OptionError(f"{store.path}: {name!r} is not a field added in place "
                              f"(added: {listed or 'none'}); the kind's own fields stay")
        names = [name, FLAG_PREFIX + name]
        if name in store.added:
            store.change_fields(drop=names)
        if name in pending:
            del pending[name]
            store.save_meta()
        for array in names:
            if array in store.group:
                del store.group[array]
        store.provenance.setdefault("fields", []).append(
            {"field": name, "dropped": True, "when": utc_now()})
        store.save_meta()
    return {"ok": True, "field": name, "message": f"dropped field {name!r} (and "
                                                  f"{FLAG_PREFIX}{name}) from {store.path}"}

