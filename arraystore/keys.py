"""Where a chunk lives on disk: the Zarr v3 default chunk-key encoding (``c/<i>/<j>/...``),
and what a writer needs to make its files durable.

Shared by the writer (to fsync exactly the files it wrote) and the direct reader (to ``pread``
them); both rely on arrays chunked along ``sample`` only, which is how every store is laid out.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from pathlib import Path


def chunk_key(array: str, sample_chunk: int, rank: int) -> str:
    """The store key (``image/c/3/0/0``) of the chunk (or shard) at index ``sample_chunk``
    along ``sample`` of the rank-``rank`` array named ``array``, whose other dimensions are one
    chunk each."""
    return ChunkPaths(Path(array), rank).path(sample_chunk)


def chunk_folder(array: str, sample_chunk: int, rank: int) -> str:
    """The store key of the folder that holds :func:`chunk_key`'s chunk (``image/c/3/0``)."""
    return chunk_key(array, sample_chunk, rank).rsplit("/", 1)[0]


class ChunkPaths:
    """Chunk paths of one array as plain strings, built without pathlib (a hot path of reads)."""

    def __init__(self, array_dir: Path, rank: int) -> None:
        self._prefix = os.path.join(os.fspath(array_dir), "c", "")
        self._suffix = "/0" * (rank - 1)

    def path(self, sample_chunk: int) -> str:
        return f"{self._prefix}{sample_chunk}{self._suffix}"


def group_by_chunk(positions: Iterable[int], per_chunk: int) -> dict[int, list[int]]:
    """Sample positions grouped by the index of the chunk (or shard file) of ``per_chunk``
    samples that holds them: chunk indices ascending, each group in the order given."""
    groups: dict[int, list[int]] = {}
    for position in positions:
        groups.setdefault(int(position) // per_chunk, []).append(int(position))
    return dict(sorted(groups.items()))


def settle_pending_writes() -> None:
    """Wait for every write zarr still has in flight.

    zarr runs a selection's chunk writes as concurrent tasks (``asyncio.gather``): when one
    fails (disk full), the error reaches the caller while its siblings may still be writing.
    The writer lock waits for them before it is released, so nothing lands in the store after
    its writer has stopped.
    """
    from zarr.core.sync import sync

    async def others_done() -> None:
        current = asyncio.current_task()
        await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not current),
                             return_exceptions=True)

    sync(others_done())


def fsync_path(path: Path) -> None:
    """Flush a file's (or directory's) data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
