"""String fields through the direct backend: ``vlen-utf8`` chunks decoded from their bytes give
zarr-python's values on every uncompressed layout, per-sample and block-chunked; a chunk never
written reads as the fill value, as in zarr; bytes that do not fit the encoding are a clear
error naming the field, sample and file."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
from conftest import LAYOUTS
from crc32c import crc32c

from arraystore import SampleReader, Store
from arraystore.chunk_format import decode_vlen_utf8
from arraystore.errors import ChecksumMismatchError, MissingChunkError, StoreFormatError
from arraystore.keys import chunk_key
from arraystore.node_cache import CacheWarning
from arraystore.readers import mapped
from arraystore.schema import Field, Schema
from arraystore.writer import StoreWriter

SCHEMA = Schema("texts", (Field("caption", (), "str", ()),
                          Field("tag", (), "str", (), "block"),
                          Field("x", (2,), "int32", ("n",))))
TEXTS = ["", "a", "bild_ä", "画像 with 🎉", "x" * 5000, "line\nbreak\0nul", "ends in nul\0", "last"]
UNCOMPRESSED = [name for name in LAYOUTS if "zstd" not in name]


def write_texts(path, layout: str) -> None:
    with StoreWriter(Store.create(path, SCHEMA, LAYOUTS[layout])) as writer:
        for i, text in enumerate(TEXTS):
            writer.append(f"s{i}", {"caption": text, "tag": f"tag {i} {text[:3]}",
                                    "x": np.array([i, -i], np.int32)})


@pytest.mark.parametrize("layout", UNCOMPRESSED)
def test_direct_string_reads_equal_zarr(tmp_path, layout: str) -> None:
    path = tmp_path / "t.zarr"
    write_texts(path, layout)
    direct, reference = SampleReader(path, backend="auto"), SampleReader(path, backend="zarr")
    assert direct.backend_of("caption") == direct.backend_of("tag") == "direct"
    for index, text in enumerate(TEXTS):
        got, expected = direct.read(index), reference.read(index)
        assert got["caption"] == expected["caption"] == text
        assert got["tag"] == expected["tag"] and isinstance(got["tag"], str)
        np.testing.assert_array_equal(got["x"], expected["x"])
    order = [5, 0, 7, 5, 2]
    for name in ("caption", "tag"):  # a batch's strings, read together, as read gives them
        expected = [reference.read(i)[name] for i in order]
        assert direct.read_each(order, name) == reference.read_each(order, name) == expected
    for name in ("caption", "tag"):
        ours = direct.field_reader(name)[0].read(1, len(TEXTS))
        theirs = reference.field_reader(name)[0].read(1, len(TEXTS))
        assert ours.dtype == theirs.dtype and ours.tolist() == theirs.tolist()


def test_string_shards_are_read_with_pread_not_mapped(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(mapped, "MIN_MAPPED_CHUNK", 1)  # map "x"'s 8-byte chunks too
    path = tmp_path / "t.zarr"
    write_texts(path, "sharded")
    reader = SampleReader(path, backend="direct")
    for _ in range(2):  # a numeric chunk read again comes out of a mapping
        assert reader.read(3)["caption"] == TEXTS[3]
    strings, numbers = (reader.field_reader(name)[0] for name in ("caption", "x"))
    assert [h.mapped for h in strings._open.values()] == [None]
    assert numbers._open and all(h.mapped is not None for h in numbers._open.values())


@pytest.mark.parametrize("layout", ["raw", "sharded"])
def test_a_lost_string_chunk_is_an_error_not_the_fill_value(tmp_path, layout: str) -> None:
    """zarr reads a chunk that is not there as "", which would pass for an empty caption."""
    path = tmp_path / "t.zarr"
    write_texts(path, layout)
    if layout == "raw":  # a per-sample chunk file gone
        (path / chunk_key("caption", 2, 1)).unlink()
    else:  # the first shard's slot 2 emptied in its index
        shard = path / chunk_key("caption", 0, 1)
        data = bytearray(shard.read_bytes())
        size = LAYOUTS[layout].shard_size
        start = len(data) - 4 - size * 16
        data[start + 2 * 16: start + 3 * 16] = b"\xff" * 16
        data[-4:] = crc32c(bytes(data[start:-4])).to_bytes(4, "little")
        shard.write_bytes(bytes(data))
    for backend in ("direct", "zarr"):
        with pytest.raises(MissingChunkError, match="field 'caption', sample 2"):
            SampleReader(path, backend=backend).read(2)


def test_crafted_string_chunks_are_clear_errors(tmp_path) -> None:
    path = tmp_path / "t.zarr"
    write_texts(path, "raw")
    chunk = path / chunk_key("caption", 3, 1)
    chunk.write_bytes(struct.pack("<II", 1, 400) + b"short")
    with pytest.raises(StoreFormatError, match=r"'caption', chunk 3, file .*runs past"):
        SampleReader(path, backend="direct").read(3)
    what = "field 'caption', sample 0"
    one = struct.pack("<II", 1, 2) + b"ok"
    assert decode_vlen_utf8(one, 1, what) == ["ok"]
    with pytest.raises(StoreFormatError, match="of 2 items, expected 1"):
        decode_vlen_utf8(struct.pack("<II", 2, 2) + b"ok", 1, what)
    with pytest.raises(StoreFormatError, match="no items"):
        decode_vlen_utf8(b"\x01", 1, what)
    with pytest.raises(StoreFormatError, match="inside an item's length"):
        decode_vlen_utf8(struct.pack("<I", 1) + b"\x02", 1, what)
    with pytest.raises(StoreFormatError, match="not valid UTF-8"):
        decode_vlen_utf8(struct.pack("<II", 1, 2) + b"\xff\xfe", 1, what)
    with pytest.raises(StoreFormatError, match="3 bytes after"):
        decode_vlen_utf8(one + b"end", 1, what)


@pytest.mark.parametrize("layout", ["raw+crc32c", "sharded+crc32c"])
def test_a_string_chunk_with_a_wrong_checksum_is_refused(tmp_path, layout: str) -> None:
    path = tmp_path / "t.zarr"
    write_texts(path, layout)
    file = path / chunk_key("caption",
                            3 if layout.startswith("raw") else 3 // LAYOUTS[layout].shard_size, 1)
    data = bytearray(file.read_bytes())
    at = data.find("画像".encode())
    data[at] ^= 0xFF  # one byte of the string, its crc left as it was
    file.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=r"'caption', sample 3"):
        SampleReader(path, backend="direct").read(3)


@pytest.mark.parametrize("layout", ["sharded", "sharded+crc32c", "raw"])
def test_string_fields_in_an_object_store(folder_s3_bucket, tmp_path, layout: str) -> None:
    """In shards, a string field is read direct with ranged GETs (through the node-local cache
    too) and equals zarr-python's values; one chunk an object (raw) stays with zarr-python."""
    write_texts(folder_s3_bucket / "t.zarr", layout)
    url = f"s3://{folder_s3_bucket.name}/t.zarr"
    reference = SampleReader(url, backend="zarr")
    for cache in (None, tmp_path / "cache", tmp_path / "cache"):  # cold, then warm
        reader = SampleReader(url, cache_dir=cache)
        assert reader.backend_of("caption") == ("zarr" if layout == "raw" else "direct")
        for index, text in enumerate(TEXTS):
            got = reader.read(index)
            assert got["caption"] == reference.read(index)["caption"] == text
            assert isinstance(got["caption"], str)
        ours = reader.field_reader("caption")[0].read(1, len(TEXTS))
        theirs = reference.field_reader("caption")[0].read(1, len(TEXTS))
        assert ours.dtype == theirs.dtype and ours.tolist() == theirs.tolist()


def test_string_chunks_fetched_ahead_with_a_batch(folder_s3_bucket, monkeypatch) -> None:
    """A batch of a store with captions: the captions come with the batch's requests (fetched
    ahead), not one round trip per item."""
    from arraystore.loaders import StoreItems
    from arraystore.readers import ranged

    write_texts(folder_s3_bucket / "t.zarr", "sharded")
    items = StoreItems(f"s3://{folder_s3_bucket.name}/t.zarr")
    rounds: list[int] = []
    real = ranged._fetch

    def counting(location, requests):
        rounds.append(len(requests))
        return real(location, requests)

    monkeypatch.setattr(ranged, "_fetch", counting)
    batch = items.__getitems__([1, 3, 4])
    assert [item["caption"] for item in batch] == [TEXTS[1], TEXTS[3], TEXTS[4]]
    assert batch.batch["caption"] == [TEXTS[1], TEXTS[3], TEXTS[4]]
    assert len(rounds) == 2  # the shard indexes, then every chunk of the batch at once


def test_string_chunks_come_out_of_the_node_cache(folder_s3_bucket, tmp_path,
                                                  monkeypatch) -> None:
    """A second pass through a node-local cache takes each caption out of its entry (checked,
    decoded), with no request; a damaged entry is fetched again."""
    from arraystore.loaders import StoreItems
    from arraystore.readers import ranged

    write_texts(folder_s3_bucket / "t.zarr", "sharded+crc32c")
    url = f"s3://{folder_s3_bucket.name}/t.zarr"
    wanted = list(range(len(TEXTS)))
    StoreItems(url, cache_dir=tmp_path).__getitems__(wanted)  # cold: fills the cache
    from_cache: list[int] = []
    real = ranged.RangedStringShardReader.read_cached

    def counting(self, sample, entry, out=None):
        from_cache.append(sample)
        return real(self, sample, entry, out)

    monkeypatch.setattr(ranged.RangedStringShardReader, "read_cached", counting)
    warm = StoreItems(url, cache_dir=tmp_path).__getitems__(wanted)
    assert warm.batch["caption"] == TEXTS and sorted(from_cache) == wanted
    damaged = 0
    for entry in (tmp_path / "objects").rglob("*"):  # every chunk's entry damaged
        if re.fullmatch(r"\d+-\d+", entry.name):  # a range (not an index, not the object)
            data = bytearray(entry.read_bytes())
            data[-1] ^= 0xFF
            entry.write_bytes(bytes(data))
            damaged += 1
    assert damaged
    with pytest.warns(CacheWarning, match="damaged"):
        again = StoreItems(url, cache_dir=tmp_path).__getitems__(wanted)
    assert again.batch["caption"] == TEXTS


def test_damaged_string_shards_in_an_object_store(folder_s3_bucket) -> None:
    path = folder_s3_bucket / "t.zarr"
    write_texts(path, "sharded+crc32c")
    url = f"s3://{folder_s3_bucket.name}/t.zarr"
    shard = path / chunk_key("caption", 0, 1)
    good = shard.read_bytes()
    size = LAYOUTS["sharded+crc32c"].shard_size
    start = len(good) - 4 - size * 16

    def with_index_entry(slot: int, offset: int, nbytes: int) -> bytes:
        data = bytearray(good)
        data[start + slot * 16: start + slot * 16 + 16] = struct.pack("<QQ", offset, nbytes)
        data[-4:] = crc32c(bytes(data[start:-4])).to_bytes(4, "little")
        return bytes(data)

    data = bytearray(good)
    data[data.find("画像".encode())] ^= 0xFF  # a string's byte, its crc as it was
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=r"'caption', sample 3"):
        SampleReader(url).read(3)
    shard.write_bytes(with_index_entry(2, 2**40, 2**40))  # a terabyte, past the others
    with pytest.raises(StoreFormatError, match=r"sample 2: shard .* declares a string chunk"):
        SampleReader(url).read(2)
    shard.write_bytes(with_index_entry(2, 2**64 - 1, 2**64 - 1))  # never written
    with pytest.raises(MissingChunkError, match="field 'caption', sample 2"):
        SampleReader(url).read(2)
