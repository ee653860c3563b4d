"""The store read by plain zarr-python, TensorStore and ``xarray.open_zarr`` -- no project code --
gives the values the loader returns; ``open_xarray`` gives named dims and the sample index."""

from __future__ import annotations

import numpy as np
import pytest
import tensorstore as ts
import xarray as xr
import zarr

import arraystore
from arraystore.loaders import ZarrDistillDataset


def test_plain_libraries_agree_with_the_loader(layout_store) -> None:
    layout, path = layout_store
    dataset = ZarrDistillDataset(path)
    group = zarr.open_group(str(path), mode="r")
    plain = xr.open_zarr(str(path), consolidated=False)
    ids = [str(s) for s in group["sample"][:]]
    for index in range(len(dataset)):
        item = dataset[index]
        pos = ids.index(item["image_id"])
        image = np.asarray(item["image"].permute(1, 2, 0))
        np.testing.assert_array_equal(group["image"][pos], image)
        np.testing.assert_array_equal(plain["image"].sel(sample=item["image_id"]).values, image)
        for name, key in (("P4_S16", "teacher_features"), ("edge_64x64", "edge_map"),
                          ("fg_map_64", "fg_map"), ("bg_map_64", "bg_map")):
            expected = np.asarray(item[key]).reshape(group[name].shape[1:])
            np.testing.assert_array_equal(group[name][pos].astype(expected.dtype), expected, name)
            stored = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                             "path": str(path / name)}}).result()
            np.testing.assert_array_equal(stored[pos].read().result().astype(expected.dtype),
                                          expected, f"tensorstore {name} ({layout})")
        n = item["num_bboxes"]
        np.testing.assert_array_equal(plain["bboxes"].values[pos][:n], item["box_prompts_xyxy"])
        np.testing.assert_array_equal(plain["metadata"].values[pos][2:], item["image_shape"])


def test_xarray_view_is_lazy_named_and_indexed_by_sample(layout_store) -> None:
    _, path = layout_store
    ds = arraystore.open_xarray(path)
    assert list(ds["sample"].values) == ["big", "small", "tall", "empty", "ties"]
    assert ds["image"].dims == ("sample", "y1024", "x1024", "rgb")
    assert ds["P4_S16"].dims == ("sample", "c256", "y64", "x64")
    assert ds["edge_64x64"].dims == ds["fg_map_64"].dims == ("sample", "y64", "x64")
    assert ds["image"].chunks is not None  # dask: nothing read yet
    assert "committed" not in ds
    assert ds["metadata"].sel(sample="small").values.tolist()[2:] == [480, 640, 3]
    assert ds.attrs["arraystore"]["kind"] == "sa1b"


@pytest.mark.parametrize("committed_only", [True, False])
def test_xarray_view_hides_uncommitted_samples(tmp_path, shard, committed_only) -> None:
    from arraystore import Store, ingest
    from arraystore.converters.sa1b.source import Sa1bTarSource

    out = tmp_path / "s.zarr"
    ingest(Sa1bTarSource(), [shard], out, workers=1)
    store = Store.open(out, mode="r+")
    store.array("committed")[1] = False  # as if sample 1's flush had not finished
    ds = arraystore.open_xarray(out, committed_only=committed_only)
    expected = 4 if committed_only else 5
    assert ds.sizes["sample"] == expected
    assert ("small" in ds["sample"].values) is not committed_only
    assert len(ZarrDistillDataset(out)) == 4
    assert [ZarrDistillDataset(out)[i]["image_id"] for i in range(4)] == [
        "big", "tall", "empty", "ties"]


def open_plain(path, **kwargs) -> xr.Dataset:
    """``xarray.open_zarr`` with its defaults, as a user without this project calls it, failing
    on any warning (it warned on every open before stores had consolidated metadata)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(str(path), **kwargs)


def test_plain_xarray_opens_consolidated_with_committed_as_a_coordinate(located_store) -> None:
    """Every layout, on disk and in the bucket: no warning, the data variables are the schema's
    fields, and ``committed`` is a coordinate along ``sample`` marking the complete samples."""
    _, path = located_store
    ds = open_plain(path)
    assert "committed" in ds.coords and "committed" not in ds.data_vars
    assert ds["committed"].dims == ("sample",) and bool(ds["committed"].all())
    assert set(ds.data_vars) == set(arraystore.SampleReader(path).schema.names)
    assert ds["image"].dims == ("sample", "y1024", "x1024", "rgb")
    assert list(ds["sample"].values) == ["big", "small", "tall", "empty", "ties"]


def test_consolidated_metadata_follows_appends_and_fixes(tmp_path, shard) -> None:
    """Written when the store is made, after each committed input, and after a fix; the
    uncommitted sample is marked, and ``isel(sample=committed.values)`` drops it."""
    import json

    from arraystore import Store, ingest
    from arraystore.converters.npz.source import NpzDirectorySource
    from arraystore.testing.npz_examples import write_sav_pairs

    out = tmp_path / "s.zarr"
    ingest(NpzDirectorySource(), [write_sav_pairs(tmp_path / "a", 3, size=32)], out, workers=1)
    assert open_plain(out).sizes["sample"] == 3
    ingest(NpzDirectorySource(), [write_sav_pairs(tmp_path / "b", 5, size=32)], out,
           workers=1)
    grown = open_plain(out)
    assert grown.sizes["sample"] == 5 and grown["image1"].shape[0] == 5
    consolidated = json.loads((out / "zarr.json").read_text())["consolidated_metadata"]
    assert consolidated["metadata"]["image1"]["shape"][0] == 5
    store = Store.open(out, mode="r+")
    store.array("committed")[1] = False  # as if sample 1's flush had not finished
    store.provenance.setdefault("fixes", []).append({"what": "test"})
    store.save_meta()  # what every fix does when it records itself
    marked = open_plain(out)
    assert marked["committed"].values.tolist() == [True, False, True, True, True]
    kept = marked.isel(sample=marked.committed.values)
    assert kept.sizes["sample"] == 4 and "sav_1" not in kept["sample"].values.tolist()


def test_the_project_never_reads_stale_consolidated_metadata(tmp_path) -> None:
    """An append in progress (arrays grown, consolidated metadata not yet rewritten) is read by
    the project from the arrays themselves."""
    from arraystore import Field, Layout, Schema, Store, StoreWriter

    schema = Schema("toy", (Field("x", (2,), "float32", ("a2",)),))
    with StoreWriter(Store.create(tmp_path / "t.zarr", schema, Layout("raw"))) as writer:
        writer.append("s0", {"x": np.ones(2, np.float32)})
        writer.flush()
        writer.append("s1", {"x": np.full(2, 2, np.float32)})
        writer.flush()  # committed, not yet consolidated (that happens when the writer closes)
        assert len(arraystore.SampleReader(tmp_path / "t.zarr")) == 2
        assert open_plain(tmp_path / "t.zarr").sizes["sample"] == 0
    assert open_plain(tmp_path / "t.zarr").sizes["sample"] == 2
