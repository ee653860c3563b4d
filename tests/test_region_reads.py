"""``SampleReader.read_region``: a window equals the whole sample sliced, on every layout and
backend, and the direct backend reads only the rows the window covers."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import BACKENDS, served

from arraystore import SampleReader

WINDOWS = {
    "image": [(slice(100, 356), slice(700, 956)), (slice(0, 1024),), (slice(5, 6), slice(0, 1))],
    "P4_S16": [(slice(10, 20), slice(3, 40), slice(0, 64)), (slice(0, 256), slice(8, 9))],
    "masks": [(slice(1, 2), slice(30, 90), slice(40, 200))],
    "bboxes": [(slice(0, 1), slice(2, 4))],  # block-chunked: read whole, then sliced
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_region_equals_the_sliced_sample(located_store, backend: str) -> None:
    layout, path = located_store
    reader = SampleReader(path, backend=backend)
    for index in range(len(reader)):
        sample = reader.read(index)
        for name, windows in WINDOWS.items():
            for window in windows:
                got = reader.read_region(index, name, window)
                expected = sample[name][window]
                assert got.dtype == expected.dtype, (layout, backend, name)
                np.testing.assert_array_equal(got, expected, err_msg=f"{layout}/{backend}/{name}")


@pytest.mark.parametrize("layout_store", ["raw", "sharded"], indirect=True)
def test_direct_region_reads_only_the_window_rows(layout_store, monkeypatch) -> None:
    _, path = layout_store  # uncompressed, no checksum: the crc would need the whole chunk
    reader = SampleReader(path, backend="direct")
    reader.read_region(0, "image", (slice(0, 1), slice(0, 1)))  # open handles, shard index
    read_bytes: list[int] = []
    real_preadv = os.preadv

    def counting(fd, buffers, offset):
        got = real_preadv(fd, buffers, offset)
        read_bytes.append(got)
        return got

    monkeypatch.setattr(os, "preadv", counting)
    reader.read_region(0, "image", (slice(100, 356), slice(700, 956)))
    assert read_bytes == [256 * 1024 * 3]  # one pread of the window's rows, not 3 MiB
    read_bytes.clear()
    reader.read_region(0, "P4_S16", (slice(0, 256), slice(8, 24), slice(0, 64)))
    assert len(read_bytes) == 256 and sum(read_bytes) == 256 * 16 * 64 * 4


def test_bad_windows_are_refused(layout_store) -> None:
    _, path = layout_store
    reader = SampleReader(path)
    for window, message in [
        ((slice(0, 2000),), r"\[0, 2000\), outside the sample's extent \[0, 1024\)"),
        ((slice(0, 10, 2),), "step 1"),
        ((slice(5, 5),), "or empty"),
        ((slice(None),) * 4, "4 slices for a per-sample shape"),
    ]:
        with pytest.raises(ValueError, match=message):
            reader.read_region(0, "image", window)


def test_remote_region_reads_fetch_only_the_window_rows(region) -> None:
    reader = SampleReader("s3://stores/sharded.zarr", storage_options=region.storage_options())
    reader.read_region(0, "image", (slice(0, 1), slice(0, 1)))  # the shard index
    local = reader.read(0)

    def fetched(name: str, window: tuple[slice, ...]) -> dict[str, int]:
        got = []
        answered = served(region, lambda: got.append(reader.read_region(0, name, window)))
        np.testing.assert_array_equal(got[0], local[name][window])
        return answered

    assert fetched("image", (slice(100, 356), slice(700, 956))) == {
        "gets": 1, "heads": 0, "bytes": 256 * 1024 * 3}  # the window's rows, not 3 MiB
    assert fetched("masks", (slice(0, 2), slice(30, 90), slice(40, 200)))["gets"] == 2
    span = fetched("P4_S16", (slice(0, 256), slice(8, 24), slice(0, 64)))  # 256 runs: a span
    assert span["gets"] == 1 and span["bytes"] == (255 * 64 + 16) * 64 * 4
