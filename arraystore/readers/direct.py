"""The direct backend: uncompressed chunks read as bytes, with no library between the store and
the output buffer.

For an uncompressed chunk the stored bytes *are* the array (little-endian, C order), optionally
followed by a 4-byte crc32c: on a disk they are read with ``pread`` (:mod:`.local_files`, strings
in :mod:`.strings`), in an object store with ranged GETs (:mod:`.ranged`). The bytes are the ones
zarr-python and TensorStore decode, so all three backends return identical arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from arraystore.chunk_format import plain_chunks
from arraystore.layout import Layout
from arraystore.location import Location
from arraystore.readers.base import Backend, FieldReader
from arraystore.readers.halves import Split, read_in_halves, split_by_size
from arraystore.readers.local_files import ChunkFileReader, ShardReader
from arraystore.readers.ranged import (
    RangedBlockReader,
    RangedFieldReader,
    RangedShardReader,
    RangedStringShardReader,
    fetch_samples,
)
from arraystore.readers.strings import StringChunkFileReader, StringShardReader
from arraystore.schema import Field


class DirectBackend(Backend):
    """Uncompressed chunks read as bytes: ``pread`` on a disk, ranged GETs in an object
    store (:mod:`arraystore.readers.ranged`)."""

    name = "direct"

    def __init__(self, location: Location, layout: Layout,
                 array_json: Mapping[str, bytes] | None = None) -> None:
        super().__init__(location, layout, array_json)
        # the strategy, chosen once: files (``pread``, mappings) or ranged GETs
        self._files = location.is_local
        # by the ids of the readers and which of them were not mapped
        self._splits: dict[tuple[tuple[int, ...], tuple[int, ...]], Split] = {}

    @classmethod
    def supports(cls, field: Field, layout: Layout, location: Location) -> bool:
        """Uncompressed layouts; string fields on a local disk (:mod:`.strings`), and in an
        object store those of one sample a chunk in shards (the sharded layout's)."""
        return layout.compression == "none" and (
            not field.is_string or location.is_local
            or (layout.sharded and field.chunking == "sample"))

    def open_field(self, field: Field) -> FieldReader:
        where = self.location.where(field.name)
        chunks = plain_chunks(self.array_meta(field.name), where, field.is_string)
        crcs = (chunks.chunk_crc, chunks.index_crc)
        if chunks.shard_size is not None:
            if self._files:
                shards = StringShardReader if field.is_string else ShardReader
                return shards(field, self.location.file(field.name), chunks.shard_size, *crcs)
            shards = RangedStringShardReader if field.is_string else RangedShardReader
            return shards(field, self.location, chunks.shard_size, *crcs)
        if self._files:
            files = StringChunkFileReader if field.is_string else ChunkFileReader
            return files(field, self.location.file(field.name), chunks.per_chunk,
                         chunks.chunk_crc)
        if chunks.per_chunk == 1:
            return RangedFieldReader(field, self.location, chunks.chunk_crc)
        return RangedBlockReader(field, self.location, chunks.per_chunk, chunks.chunk_crc)

    def read_fields(self, readers: Sequence[FieldReader], sample: int) -> list[np.ndarray]:
        """One sample of several fields: from an object store as one batch of concurrent ranged
        GETs; from a disk, the chunks that can be mapped without a copy first
        (:meth:`FieldReader.mapped_sample`), the others in two halves of their bytes at once
        (:mod:`.halves`; a thread per field made items slower on 2 cores, one hand-off per
        item makes them faster)."""
        if not self._files:
            return fetch_samples(self.location, [(r, sample) for r in readers])
        if len(readers) == 1:  # nothing to split (a batch's captions, read one by one)
            return [readers[0].read_sample(sample)]
        out = [reader.mapped_sample(sample) for reader in readers]
        rest = tuple(i for i, value in enumerate(out) if value is None)
        key = (tuple(map(id, readers)), rest)
        if key not in self._splits:
            self._splits[key] = split_by_size(
                [readers[i].field.nbytes for i in rest])  # type: ignore[attr-defined]
        read = read_in_halves([readers[i] for i in rest], sample, self._splits[key])
        for i, value in zip(rest, read, strict=True):
            out[i] = value
        return out  # type: ignore[return-value]
