"""An object store that misbehaves (``Region.inject``: throttling, server errors, connections
cut mid-answer, answers shorter than asked): transient failures are retried with backoff and the
values are right; failures that last raise a typed error naming the object; a short answer is
refused, never returned; none of it leaves a bad entry in the node-local cache."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator

import pytest
from conftest import UNCOMPRESSED, _layout_store, assert_same_values, per_sample_fields

from arraystore.errors import StoreAccessError, StoreFormatError
from arraystore.reader import SampleReader
from arraystore.testing.cloud_region import Region

SAMPLE = 1
TIMEOUT_SECONDS = 60  # how long a read may retry before it must have given up


@pytest.fixture
def faulty(region: Region) -> Iterator[Region]:
    """The module's region, its faults cleared after the test."""
    yield region
    region.inject("cut", 0)


def remote(region: Region, layout: str, **options) -> SampleReader:
    return SampleReader(f"s3://stores/{layout}.zarr", storage_options=region.storage_options(),
                        **options)


def expected(layout: str, tmp_path_factory, shard) -> dict:
    return SampleReader(_layout_store(layout, tmp_path_factory, shard)).read(SAMPLE)


# a cut answer on every layout (its ranges differ); throttling and server errors are answered
# before any body, the same whatever the layout: two layouts (each retry waits up to a second)
TRANSIENT = [*((layout, "cut") for layout in UNCOMPRESSED),
             *((layout, mode) for layout in ("raw", "sharded+crc32c")
               for mode in ("slowdown", "error"))]


@pytest.mark.parametrize(("layout", "mode"), TRANSIENT)
def test_transient_failures_are_retried_and_the_values_are_right(faulty, layout, mode,
                                                                 tmp_path_factory,
                                                                 shard) -> None:
    reader = remote(faulty, layout)
    before = len(faulty.requests()["faulted"])
    faulty.inject(mode, 1, match=f"{layout}.zarr/image/")
    got = reader.read(SAMPLE)
    assert len(faulty.requests()["faulted"]) - before == 1  # the failed answer was given
    assert_same_values(got, expected(layout, tmp_path_factory, shard), f"{layout} {mode}")


def test_retries_back_off(faulty) -> None:
    """A request cut three times is sent again after longer and longer waits, not at once."""
    reader = remote(faulty, "raw")
    before = len(faulty.requests()["faulted"])
    faulty.inject("cut", 3, match="raw.zarr/image/")
    reader.read(SAMPLE)
    times = faulty.requests()["faulted"][before:]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert len(gaps) == 2 and min(gaps) >= 0.09 and gaps[1] > gaps[0], gaps


@pytest.mark.parametrize("layout", ["raw", "sharded+crc32c"])
def test_a_service_that_keeps_failing_is_an_error_naming_the_object(faulty, layout,
                                                                    tmp_path_factory,
                                                                    shard) -> None:
    reader = remote(faulty, layout)
    faulty.inject("cut", 1000, match=f"{layout}.zarr/image/")
    started = time.monotonic()
    with pytest.raises(StoreAccessError, match=re.escape(f"s3://stores/{layout}.zarr/image/")) \
            as raised:
        reader.read(SAMPLE)
    assert time.monotonic() - started < TIMEOUT_SECONDS  # it gave up, and said so
    assert "kept failing after the client's retries" in str(raised.value)
    faulty.inject("cut", 0)  # the service recovers: the same reader reads again
    assert_same_values(reader.read(SAMPLE), expected(layout, tmp_path_factory, shard), layout)


@pytest.mark.parametrize("layout", UNCOMPRESSED)
def test_a_short_answer_is_refused_not_returned(faulty, layout) -> None:
    """Every answer about the image one byte short (the shard index's too, on a fresh
    reader): a typed error naming the object, never values."""
    reader = remote(faulty, layout)
    faulty.inject("short", 1000, match=f"{layout}.zarr/image/")
    with pytest.raises(StoreFormatError, match=re.escape(f"s3://stores/{layout}.zarr/image/")):
        reader.read(SAMPLE)


@pytest.mark.parametrize("mode", ["cut", "short"])
@pytest.mark.parametrize("layout", ["raw", "sharded"])
def test_a_failed_fetch_leaves_nothing_in_the_cache(faulty, layout, mode, tmp_path,
                                                    tmp_path_factory, shard) -> None:
    cache = tmp_path / "cache"
    faulty.inject(mode, 1000, match=f"{layout}.zarr/image/")
    with pytest.raises((StoreAccessError, StoreFormatError)):
        remote(faulty, layout, cache_dir=cache).read(SAMPLE)
    faulty.inject(mode, 0)
    want = expected(layout, tmp_path_factory, shard)
    after = remote(faulty, layout, cache_dir=cache)
    assert_same_values(after.read(SAMPLE), want, layout)
    per_sample = per_sample_fields(after)
    warm = remote(faulty, layout, cache_dir=cache, fields=per_sample)  # the fields it keeps
    gets = faulty.requests()["gets"]
    assert_same_values(warm.read(SAMPLE), {k: want[k] for k in per_sample}, f"{layout} warm")
    assert faulty.requests()["gets"] == gets  # what the second read kept serves the third
