"""A store from elsewhere is untrusted input: arrays that disagree with the schema, and chunks,
array folders or metadata that are links out of the store, are refused with clear errors."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from arraystore import Layout, SampleReader, Store, ingest
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.errors import StoreFormatError
from arraystore.loaders import ZarrDistillDataset
from arraystore.verify import verify
from tests.conftest import run_cli


@pytest.fixture(params=["raw", "sharded"])
def store(request, tmp_path, shard) -> Path:
    out = tmp_path / "s.zarr"
    ingest(Sa1bTarSource(), [shard], out, layout=Layout(request.param, shard_size=2), workers=1)
    return out


def edit_json(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def test_schema_that_disagrees_with_the_arrays_is_refused(store) -> None:
    def absurd(doc):
        doc["attributes"]["arraystore"]["schema"]["fields"]["image"]["shape"] = [
            1_000_000, 1_000_000, 3]
    edit_json(store / "zarr.json", absurd)
    with pytest.raises(StoreFormatError, match=r"array 'image' disagrees with the store's "
                                               r"schema: shape is \(1024, 1024, 3\), the schema "
                                               r"and layout say \(1000000, 1000000, 3\)"):
        Store.open(store)
    with pytest.raises(StoreFormatError, match="disagrees"):
        ZarrDistillDataset(store)  # never gets to allocate 2.7 TiB
    result = run_cli("info", str(store))
    assert result.exit_code == 1 and "disagrees" in result.output
    report = verify(store)
    assert not report.ok and any(p.field == "image" and "shape" in p.message
                                 for p in report.problems)


def test_array_metadata_that_disagrees_is_refused(store) -> None:
    def compressed(doc):
        doc["data_type"] = "float64"
    edit_json(store / "P4_S16" / "zarr.json", compressed)
    with pytest.raises(StoreFormatError, match=r"array 'P4_S16'.*data_type is 'float64'"):
        SampleReader(store)


def test_chunk_linked_outside_the_store_is_refused(store, tmp_path) -> None:
    outside = tmp_path / "outside.bin"
    chunk = store / "image" / "c" / "0" / "0" / "0" / "0"
    outside.write_bytes(chunk.read_bytes())
    chunk.unlink()
    os.symlink(outside, chunk)
    reader = SampleReader(store, backend="direct")
    with pytest.raises(StoreFormatError, match="is a symbolic link"):
        reader.read(0)
    with pytest.raises(StoreFormatError, match="is a symbolic link"):
        reader.read_region(0, "image", (slice(0, 8),))
    report = verify(store)
    assert any("refused" in p.message and "symbolic link" in p.message for p in report.problems)
    np.testing.assert_array_equal(reader.read(len(reader) - 1)["metadata"][4], 3)  # others read


def test_array_folder_or_metadata_linked_elsewhere_is_refused(store, tmp_path) -> None:
    moved = tmp_path / "elsewhere"
    shutil.move(store / "masks", moved)
    os.symlink(moved, store / "masks")
    with pytest.raises(StoreFormatError, match=r"array 'masks' refused: .* symbolic link"):
        Store.open(store)
    os.unlink(store / "masks")
    shutil.move(moved, store / "masks")
    Store.open(store)  # back in place: fine
    meta = store / "bboxes" / "zarr.json"
    (tmp_path / "meta.json").write_bytes(meta.read_bytes())
    meta.unlink()
    os.symlink(tmp_path / "meta.json", meta)
    with pytest.raises(StoreFormatError, match="array 'bboxes' refused"):
        Store.open(store)


def test_a_missing_array_is_named(store) -> None:
    (store / "masks" / "zarr.json").unlink()
    missing = r"arrays \['masks'\] of the schema are missing"
    for open_store in (Store.open, SampleReader):
        with pytest.raises(StoreFormatError, match=missing):
            open_store(store)
    (problem,) = verify(store).problems
    assert re.search(missing, problem.message)


def test_unreadable_array_metadata_is_a_clear_error(store) -> None:
    metadata = store / "masks" / "zarr.json"
    metadata.unlink()
    metadata.mkdir()  # there, but no file to read
    with pytest.raises(StoreFormatError, match=r"could not read the arrays' metadata: .*zarr"):
        Store.open(store)
