"""Chunk reads on S3 through URLs signed once per object (``arraystore.s3_gets``): they give
what s3fs's path gives, on every layout; stores whose options need a header on every request,
or an environment with an HTTP proxy, keep s3fs's path; a chunk is handed out as the fetched
buffer itself, writable, with no copy."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import UNCOMPRESSED, assert_same_values

from arraystore.reader import SampleReader
from arraystore.readers.ranged import fetch_samples
from arraystore.s3_gets import PresignedGets, presigned_gets_apply
from arraystore.testing.cloud_region import Region

SAMPLE = 1


def counted_gets(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many requests went through signed URLs since (one count per batch of GETs)."""
    calls: list[int] = []
    real = PresignedGets.get_many

    def counting(self, fs, requests):
        calls.append(len(requests))
        return real(self, fs, requests)

    monkeypatch.setattr(PresignedGets, "get_many", counting)
    return calls


@pytest.mark.parametrize("layout", UNCOMPRESSED)
def test_signed_gets_read_what_s3fs_reads(region: Region, layout: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counted_gets(monkeypatch)
    url = f"s3://stores/{layout}.zarr"
    signed = SampleReader(url, storage_options=region.storage_options()).read(SAMPLE)
    assert sum(calls) > 0  # the chunks came through signed URLs
    before = sum(calls)
    # requester_pays puts a header on every request: not possible in a signed URL
    through_s3fs = SampleReader(url, storage_options={**region.storage_options(),
                                                      "requester_pays": True}).read(SAMPLE)
    assert sum(calls) == before
    assert_same_values(signed, through_s3fs, layout)


def test_a_fetched_chunk_is_its_buffer_writable_and_its_own(region: Region) -> None:
    reader = SampleReader("s3://stores/sharded.zarr", storage_options=region.storage_options(),
                          fields=("image", "masks"))
    first, again = reader.read(SAMPLE), reader.read(SAMPLE)
    for name in ("image", "masks"):
        owner = first[name]
        while isinstance(owner, np.ndarray):
            owner = owner.base
        assert isinstance(owner, memoryview), name  # the fetched buffer, not a copy of it
        assert first[name].flags.writeable
        first[name][...] = 0  # a write reaches no other read
        assert again[name].any() and reader.read(SAMPLE)[name].any()


def test_signed_gets_apply_unless_a_request_needs_more(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert presigned_gets_apply({"endpoint_url": "http://127.0.0.1:9", "key": "k"})
    assert not presigned_gets_apply({"requester_pays": True})
    assert not presigned_gets_apply({"s3_additional_kwargs": {"SSECustomerKey": "x"}})
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert not presigned_gets_apply({})


def test_chunks_read_twice_in_one_fetch_share_no_bytes(region: Region) -> None:
    """The same chunk asked twice in one round of requests (one joined GET serves both) comes
    as two arrays of their own: a write to one reaches the other not."""
    reader = SampleReader("s3://stores/sharded.zarr", storage_options=region.storage_options(),
                          fields=("image",))
    field = reader.field_reader("image")[0]
    position = reader.position(SAMPLE)
    first, again = fetch_samples(reader.location, [(field, position), (field, position)])
    assert np.array_equal(first, again) and not np.shares_memory(first, again)
