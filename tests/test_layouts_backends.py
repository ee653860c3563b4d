"""One suite over every layout (raw, sharded; with and without zstd and crc32c) and every reader
backend: each must return exactly what the source derived, and the loader's items must agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import BACKENDS

from arraystore import SampleReader
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.errors import ChecksumMismatchError
from arraystore.loaders import DISTILL_FIELDS, ZarrDistillDataset
from tests.conftest import assert_same_values


@pytest.fixture(scope="session")
def derived(shard: Path) -> dict[str, dict]:
    """What the source derives for each record, computed in-process: the expected values."""
    source = Sa1bTarSource(max_boxes=2)
    (unit,) = source.units([shard])
    return {r.sample_id: source.derive(r) for r in source.records(unit)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_reads_what_was_derived(located_store, backend: str, derived: dict) -> None:
    layout, path = located_store
    reader = SampleReader(path, backend=backend)
    assert list(reader.sample_ids) == list(derived)
    for read in ("first read", "read again"):  # again: out of the shard's mapping where mapped
        for index, sample_id in enumerate(reader.sample_ids):
            got = reader.read(index)  # in the store's field order
            assert_same_values(got, {name: derived[sample_id][name] for name in got},
                               f"{layout}/{backend}/{sample_id}, {read}")
            assert set(got) == set(derived[sample_id])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_chain_picks_the_documented_backend(layout_store, backend: str) -> None:
    layout, path = layout_store
    reader = SampleReader(path, backend=backend)
    compressed = "zstd" in layout
    expected = {
        "auto": "tensorstore" if compressed else "direct",
        "direct": "tensorstore" if compressed else "direct",
        "tensorstore": "tensorstore",
        "zarr": "zarr",
    }[backend]
    assert reader.backend_of("image") == expected
    # strings: the direct reader decodes uncompressed vlen-utf8 chunks on a local disk;
    # otherwise zarr-python (TensorStore has no string type)
    strings = "direct" if expected == "direct" else "zarr"
    assert reader.backend_of("image_id") == strings


@pytest.mark.parametrize("backend", BACKENDS)
def test_loader_items_agree_across_backends(layout_store, backend: str) -> None:
    _, path = layout_store
    reference = ZarrDistillDataset(path, backend="zarr")
    dataset = ZarrDistillDataset(path, backend=backend)
    assert len(dataset) == len(reference) == 5
    for index in range(len(dataset)):
        got, expected = dataset[index], reference[index]
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if hasattr(value, "shape"):
                np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), key)
            else:
                assert got[key] == value, key


def test_reader_reads_only_requested_fields(layout_store) -> None:
    _, path = layout_store
    reader = SampleReader(path, fields=DISTILL_FIELDS)
    assert set(reader.read(0)) == set(DISTILL_FIELDS)
    assert "P5_S32" not in reader._open.get().readers  # never opened


def test_flipped_byte_in_checksummed_chunk_is_reported(tmp_path: Path, shard: Path) -> None:
    from arraystore import Layout, ingest

    for name in ("raw", "sharded"):
        out = tmp_path / f"{name}.zarr"
        ingest(Sa1bTarSource(), [shard], out, layout=Layout(name, shard_size=4, checksum=True),
               workers=1)
        chunk = out / "image" / "c" / "0" / "0" / "0" / "0"
        data = bytearray(chunk.read_bytes())
        data[1000] ^= 0xFF
        chunk.write_bytes(bytes(data))
        reader = SampleReader(out, backend="direct")
        with pytest.raises(ChecksumMismatchError) as caught:
            reader.read(0)
        message = str(caught.value)
        assert "'image'" in message and "sample 0" in message and str(chunk) in message
        reader.read(len(reader) - 1)  # other samples still read
        with pytest.raises(Exception, match=r"(?i)crc|checksum"):
            SampleReader(out, backend="zarr").read(0)
