"""Regions of sample positions reserved for units that are written elsewhere (distributed ingest).

A distributed ingest cannot know where each unit's samples go before it has read them, so the
driver gives each unit (a TAR shard) a *region*: a range of positions as long as an upper bound
of its samples, rounded up to whole files of the layout (a shard's worth in the sharded layout),
so no two units ever write the same chunk file. The reservation is recorded in the store's
metadata before the unit's task starts; a run that is killed redoes an unfinished unit into the
same region. Positions a unit did not fill stay uncommitted: readers and xarray's committed view
never see them, ``arraystore info`` counts them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from arraystore.store import Store

PENDING = "pending_regions"


def file_unit(store: Store) -> int:
    """Samples per file of the per-sample fields: region starts and lengths are multiples of
    this, so a region owns its chunk files alone."""
    return max((store.layout.samples_per_file(f) for f in store.schema.fields
                if f.chunking == "sample"), default=1)


def pending(store: Store) -> list[dict[str, Any]]:
    """The reserved regions of units not finished yet: ``{"unit", "start", "stop"}``."""
    return list(store.provenance.get(PENDING, []))


def reserved_end(store: Store) -> int:
    """The first position after every reserved region (0 when there is none)."""
    return max((r["stop"] for r in pending(store)), default=0)


def region_of(store: Store, unit: dict[str, Any]) -> tuple[int, int] | None:
    """The region recorded for the unit of identity ``unit``, if it has one."""
    for region in pending(store):
        if region["unit"] == unit:
            return region["start"], region["stop"]
    return None


def reserve(store: Store, wanted: Sequence[tuple[dict[str, Any], int]]) -> list[tuple[int, int]]:
    """A region per ``(unit, capacity)`` of ``wanted``: the one recorded for that unit, else a
    new one of at least ``capacity`` positions after everything stored or reserved, aligned to
    :func:`file_unit`. The arrays are grown to cover them and the reservations saved (one
    metadata write) before this returns."""
    align = file_unit(store)
    end = -(-max(len(store), reserved_end(store)) // align) * align
    regions = []
    for unit, capacity in wanted:
        region = region_of(store, unit)
        if region is None:
            region = (end, end + max(align, -(-capacity // align) * align))
            end = region[1]
            store.provenance.setdefault(PENDING, []).append(
                {"unit": unit, "start": region[0], "stop": region[1]})
        regions.append(region)
    stop = max((r[1] for r in regions), default=0)
    store.grow((*store.schema.names, "sample", "committed"), stop)
    store.save_meta()
    return regions


def release(store: Store, unit: dict[str, Any]) -> None:
    """Forget the reservation of a finished unit (the caller saves the metadata)."""
    store.provenance[PENDING] = [r for r in pending(store) if r["unit"] != unit]
