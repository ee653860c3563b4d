"""Direct reads of string fields (captions, names) from uncompressed local chunks.

zarr-python decodes a one-string chunk in ~1.4 ms (its async machinery, per call); a RefCOCO-like
source spent most of an item there. The bytes of Zarr v3's ``vlen-utf8`` codec are simple: a
little-endian uint32 count of items, then per item its uint32 byte length and its UTF-8 bytes,
optionally followed by a 4-byte crc32c of all of that. These readers ``pread`` a chunk (a file in
the raw layout, an inner chunk's byte range in the sharded one, located through the same cached
shard index as numeric fields) and decode it here, every length checked against the bytes read;
in an object store :class:`~arraystore.readers.ranged.RangedStringShardReader` does the same
with ranged GETs.
The values equal zarr-python's: a ``StringDType`` array, ``str`` for one sample.
"""

from __future__ import annotations

import math
import os

import numpy as np

from arraystore.chunk_format import decode_vlen_utf8, string_array, without_crc
from arraystore.errors import StoreFormatError
from arraystore.readers.base import FieldReader, missing_chunk
from arraystore.readers.local_files import ChunkFileReader, ShardReader


class _StringSamples(FieldReader):
    """One sample of a string field, sliced from ``read`` (where a reader has no quicker way):
    a string's size is not known before it is read, so there is no buffer to ``preadv`` into.
    The interface's defaults, in place of the numeric readers' ``preadv`` paths this class
    comes before in the MRO."""

    read_sample = FieldReader.read_sample
    read_into = FieldReader.read_into
    read_region = FieldReader.read_region


class StringChunkFileReader(_StringSamples, ChunkFileReader):
    """String chunks of ``per_chunk`` samples, one file each (the raw layout, and block-chunked
    string fields)."""

    def read(self, start: int, stop: int) -> np.ndarray:
        values: list[str] = []
        items = math.prod(self.shape)
        for index in range(start // self.per_chunk, (stop - 1) // self.per_chunk + 1):
            chunk = self._chunk_strings(index, self.per_chunk * items)
            lo = index * self.per_chunk
            a, b = max(lo, start) - lo, min(lo + self.per_chunk, stop) - lo
            values.extend(chunk[a * items:b * items])
        return string_array(values, (stop - start, *self.shape))

    def _chunk_strings(self, index: int, count: int) -> list[str]:
        path = self.paths.path(index)
        fd = self.root.open(self.keys.path(index))
        if fd is None:
            raise missing_chunk(self.field.name, index * self.per_chunk, f"chunk file {path}")
        try:
            data = os.pread(fd, os.fstat(fd).st_size, 0)
        finally:
            os.close(fd)
        what = f"field {self.field.name!r}, chunk {index}, file {path}"
        if self.checksum:
            data = without_crc(data, self.field.name, index * self.per_chunk, path)
        return decode_vlen_utf8(data, count, what)


class StringShardReader(_StringSamples, ShardReader):
    """One-sample string chunks packed in shards (the sharded layout)."""

    maps_shards = False  # a few bytes a sample, read whole with one pread: nothing to gain

    def read(self, start: int, stop: int) -> np.ndarray:
        items = math.prod(self.shape)
        values: list[str] = []
        for sample in range(start, stop):
            values.extend(self._sample_strings(sample, items))
        return string_array(values, (stop - start, *self.shape))

    def read_sample(self, sample: int) -> str:
        """One sample's ``str`` (string fields hold one a sample), as :meth:`read` gives it,
        without building an array for it: that took half of a caption's read through
        :meth:`SampleReader.read` (13.7 against 6.8 µs)."""
        return self._sample_strings(sample, 1)[0]

    def _sample_strings(self, sample: int, count: int) -> list[str]:
        (fd, _, path, _), offset, nbytes, _ = self._chunk_of(sample)
        data = os.pread(fd, nbytes, offset)
        if len(data) != nbytes:
            raise StoreFormatError(f"field {self.field.name!r}, sample {sample}: shard {path} "
                                   f"ends inside the inner chunk")
        if self.checksum:
            data = without_crc(data, self.field.name, sample, path)
        return decode_vlen_utf8(data, count, f"field {self.field.name!r}, sample {sample}, "
                                             f"shard {path}")

