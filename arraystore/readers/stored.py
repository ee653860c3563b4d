"""What the library backends (zarr-python, TensorStore) do not check before they decode.

zarr-python reads a chunk that is not there as the fill value, and neither library checks that
the entries of a shard's index stay apart: two entries pointing at one inner chunk return one
sample's bytes for another. Only committed samples are read, and a writer stores every chunk
of those, so :class:`StoredChunks` checks, before a read, that the chunk files of its samples
exist (on a disk: reached with no link on the way, :mod:`arraystore.beneath`) and that each
shard's index is sound (:func:`~.direct.parse_shard_index`) and holds their inner chunks. A
size request per chunk file and a read of each shard's index: a shard found complete is not
checked again by the same reader.
"""

from __future__ import annotations

from arraystore.chunk_format import EMPTY
from arraystore.keys import chunk_key
from arraystore.layout import Layout
from arraystore.location import Location
from arraystore.readers.base import fetch_shard_index, missing_chunk
from arraystore.schema import Field

CHECKED_SHARDS = 4096  # complete shards remembered per reader (a set of ints)


class StoredChunks:
    """Checks the stored chunks of one field of one store before a library reads them."""

    def __init__(self, field: Field, location: Location, layout: Layout) -> None:
        self.field = field
        self.location = location
        self.per_file = layout.samples_per_file(field)
        self.sharded = field.chunking == "sample" and layout.sharded
        self._complete: set[int] = set()

    def check(self, start: int, stop: int) -> None:
        """Raise :class:`MissingChunkError` for the first of samples ``start`` to ``stop``
        whose chunk file or inner chunk is not stored, :class:`StoreFormatError` for a shard
        index that is not sound."""
        name, rank = self.field.name, 1 + len(self.field.shape)
        for index in range(start // self.per_file, (stop - 1) // self.per_file + 1):
            if index in self._complete:
                continue
            key = chunk_key(name, index, rank)
            first = max(start, index * self.per_file)
            size = self.location.size(key)
            if size is None:
                raise missing_chunk(name, first, self.location.where(key))
            if not self.sharded:
                continue
            table = fetch_shard_index(self.location, key, size, self.per_file, None)
            for sample in range(first, min(stop, (index + 1) * self.per_file)):
                if table[sample % self.per_file, 0] == EMPTY:
                    raise missing_chunk(name, sample, f"inner chunk {sample % self.per_file} "
                                                      f"of shard {self.location.where(key)}")
            if (table[:, 0] != EMPTY).all() and len(self._complete) < CHECKED_SHARDS:
                self._complete.add(index)
