"""Crafted stores: one case per class of damage a store from elsewhere (or a failing disk) can
carry, each on every layout on the local disk and on the three S3 layouts of the read tests
(uncompressed, compressed, sharded with checksums: every read path; a bucket per case). Each is
refused with a typed error naming what is wrong, by every backend and by ``verify``; none reads
as zeros, as another sample's bytes, or as a value another library would read differently."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import (
    BACKENDS,
    LAYOUTS,
    S3_LAYOUTS,
    _layout_store,
    edit_shard,
    known_samples,
    shard_file,
)

from arraystore import SampleReader, open_xarray
from arraystore.errors import MissingChunkError, StoreFormatError
from arraystore.layout import Layout
from arraystore.loaders import ZarrDistillDataset
from arraystore.store import Store
from arraystore.verify import verify

Craft = Callable[[Path, Layout], None]
Make = Callable[[Craft], str]
SAMPLE = 1  # the sample each case damages


@pytest.fixture(params=[*((name, "local") for name in LAYOUTS),
                        *((name, "s3") for name in S3_LAYOUTS)],
                ids=lambda p: f"{p[0]}@{p[1]}")
def crafted(request: pytest.FixtureRequest, tmp_path: Path,
            tmp_path_factory: pytest.TempPathFactory, shard: Path) -> Make:
    """A function that copies a clean store of the layout, damages it with ``craft`` and
    returns where it is: a path, or a URL in a new bucket of an S3-compatible server that
    serves a folder (the copy is in the object store as an upload would put it, links
    followed, without a request per file)."""
    name, where = request.param
    clean = _layout_store(name, tmp_path_factory, shard)

    def make(craft: Craft) -> str:
        copy = tmp_path / "s.zarr"
        shutil.copytree(clean, copy, symlinks=True)
        craft(copy, LAYOUTS[name])
        if where == "local":
            return str(copy)
        bucket: Path = request.getfixturevalue("folder_s3_bucket")
        shutil.copytree(copy, bucket / "s.zarr")  # links followed, as an upload reads them
        return f"s3://{bucket.name}/s.zarr"

    make.layout = LAYOUTS[name]  # type: ignore[attr-defined]
    make.remote = where == "s3"  # type: ignore[attr-defined]
    return make


def edit_metadata(store: Path, array: str, change: Callable[[dict], None]) -> None:
    path = store / array / "zarr.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def remove_chunk(store: Path, layout: Layout, field: str = "masks") -> None:
    """Lose sample ``SAMPLE``'s chunk of ``field``: its file, or its entry in the shard."""
    path = shard_file(store, field, SAMPLE, layout)
    if layout.sharded:
        def empty(index: np.ndarray, _: bytearray) -> None:
            index[SAMPLE % layout.shard_size] = 2**64 - 1
        edit_shard(path, layout.shard_size, empty)
    else:
        path.unlink()


def read_with(target: str, backend: str, index: int) -> dict:
    return SampleReader(target, backend=backend).read(index)


def problems(target: str, deep: bool = False) -> str:
    report = verify(target, deep=deep)
    assert not report.ok
    return "\n".join(str(p) for p in report.problems)


def test_a_lost_chunk_of_a_committed_sample_is_an_error(crafted: Make) -> None:
    target = crafted(remove_chunk)
    for backend in BACKENDS:
        with pytest.raises(MissingChunkError, match=r"field 'masks', sample 1: .* is missing "
                                                    r"although the sample is committed"):
            read_with(target, backend, SAMPLE)
        assert read_with(target, backend, 0)["masks"].any(), backend  # the others read
        reader = SampleReader(target, backend=backend)
        with pytest.raises(MissingChunkError):
            reader.read_region(SAMPLE, "masks", (slice(0, 1), slice(0, 8)))
    with pytest.raises(MissingChunkError):
        ZarrDistillDataset(target)[SAMPLE]
    assert "missing" in problems(target)


def test_a_lost_block_of_a_committed_sample_is_an_error(crafted: Make) -> None:
    target = crafted(lambda store, _: (store / "metadata" / "c" / "0" / "0").unlink())
    with pytest.raises(MissingChunkError, match="field 'metadata', sample 0"):
        read_with(target, "auto", SAMPLE)
    assert "chunk file missing" in problems(target)


def test_a_sample_count_claimed_by_metadata_is_bounded_by_the_stored_blocks(
        crafted: Make) -> None:
    def claim(store: Path, _: Layout) -> None:
        for array in [p.name for p in store.iterdir() if (p / "zarr.json").exists()]:
            edit_metadata(store, array, lambda d: d["shape"].__setitem__(0, 10**12))
    target = crafted(claim)
    tracemalloc.start()
    try:
        reader = SampleReader(target)
        ids = list(reader.sample_ids)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak  # 10^12 flags would be 931 GiB
    assert len(reader) == len(ids) == len(known_samples())
    assert verify(target).committed == len(known_samples())


def test_a_sample_marked_committed_but_never_written_is_caught(crafted: Make) -> None:
    def mark(store: Path, _: Layout) -> None:
        group = zarr.open_group(store, mode="r+", zarr_format=3, use_consolidated=False)
        extra = group["committed"].shape[0]
        for array in group.array_values():
            array.resize((extra + 1, *array.shape[1:]))
        group["committed"][extra] = True
    target = crafted(mark)
    extra = len(SampleReader(target)) - 1
    with pytest.raises(MissingChunkError):
        read_with(target, "auto", extra)
    found = problems(target)
    assert "committed, but has no id" in found and "missing" in found


METADATA = {
    "byte order": ("P4_S16", lambda d: _bytes_codec(d)["configuration"].__setitem__(
        "endian", "big"), "codecs"),
    "chunk key encoding": ("masks", lambda d: d["chunk_key_encoding"]["configuration"]
                           .__setitem__("separator", "."), "chunk_key_encoding"),
    "fill value": ("masks", lambda d: d.__setitem__("fill_value", 7), "fill_value is 7"),
    "extra key": ("image", lambda d: d.__setitem__("storage_transformers", [{"name": "x"}]),
                  "storage_transformers"),
    "not an object": ("image", None, "not an object"),
}


def _bytes_codec(document: dict) -> dict:
    codec = document["codecs"][0]
    return codec["configuration"]["codecs"][0] if codec["name"] == "sharding_indexed" else codec


@pytest.mark.parametrize("case", list(METADATA))
def test_array_metadata_is_checked_whole(crafted: Make, case: str) -> None:
    array, change, named = METADATA[case]

    def craft(store: Path, _: Layout) -> None:
        if change is None:
            (store / array / "zarr.json").write_text("[1, 2]")
        else:
            edit_metadata(store, array, change)
    target = crafted(craft)
    with pytest.raises(StoreFormatError, match=rf"array {array!r} disagrees with the store's "
                                               rf"schema: .*{named}"):
        Store.open(target)
    with pytest.raises(StoreFormatError, match="disagrees"):
        SampleReader(target)
    assert named in problems(target)


def test_overlapping_shard_index_entries_are_refused(crafted: Make) -> None:
    layout: Layout = crafted.layout  # type: ignore[attr-defined]
    if not layout.sharded:
        pytest.skip("a raw layout has no shard index")

    def overlap(store: Path, _: Layout) -> None:
        def point_at_previous(index: np.ndarray, _: bytearray) -> None:
            index[SAMPLE % layout.shard_size] = index[SAMPLE % layout.shard_size - 1]
        edit_shard(shard_file(store, "image", SAMPLE, layout), layout.shard_size,
                   point_at_previous)
    target = crafted(overlap)
    for backend in BACKENDS:
        with pytest.raises(StoreFormatError, match="overlap"):
            read_with(target, backend, SAMPLE)
    assert "overlap" in problems(target, deep=True)


def test_ids_shorter_than_committed_are_refused(crafted: Make) -> None:
    target = crafted(lambda store, _: edit_metadata(store, "sample",
                                                    lambda d: d["shape"].__setitem__(0, 2)))
    with pytest.raises(StoreFormatError, match=r"arrays \['sample'\] hold \[2\] samples, fewer "
                                               r"than the \d+ that 'committed' covers"):
        SampleReader(target)
    assert "'sample' holds 2 ids" in problems(target)


def test_a_duplicate_id_is_reported(crafted: Make) -> None:
    def duplicate(store: Path, _: Layout) -> None:
        ids = zarr.open_array(store / "sample", mode="r+", zarr_format=3)
        ids[SAMPLE] = ids[0]
    target = crafted(duplicate)
    first = str(SampleReader(target).sample_ids[0])
    assert f"sample id {first!r} is committed 2 times" in problems(target)


def test_a_corrupt_string_chunk_is_refused(crafted: Make) -> None:
    def garble(store: Path, _: Layout) -> None:
        path = store / "image_id" / "c" / "0"
        data = bytearray(path.read_bytes())
        data[4:8] = (10**6).to_bytes(4, "little")  # the first string's length
        path.write_bytes(bytes(data))
    target = crafted(garble)
    with pytest.raises((StoreFormatError, OSError)):
        read_with(target, "auto", 0)
    assert "image_id" in problems(target, deep=True)


def test_a_linked_array_metadata_file_is_reported(tmp_path: Path, crafted: Make) -> None:
    def link(store: Path, _: Layout) -> None:
        outside = tmp_path / "outside.json"
        shutil.copy(store / "bboxes" / "zarr.json", outside)
        (store / "bboxes" / "zarr.json").unlink()
        os.symlink(outside, store / "bboxes" / "zarr.json")
    if crafted.remote:  # type: ignore[attr-defined]
        pytest.skip("an object store has no links (an upload copies the file)")
    target = crafted(link)
    with pytest.raises(StoreFormatError, match="array 'bboxes' refused"):
        SampleReader(target)
    assert "refused" in problems(target) and "symbolic link" in problems(target)


@pytest.mark.parametrize("where", ["c", "chunk folder"])
def test_a_link_anywhere_below_the_root_is_never_followed(tmp_path: Path, crafted: Make,
                                                          where: str) -> None:
    """``masks/c`` or the folder of one chunk (``masks/c/1`` raw, ``masks/c/0`` sharded) moved
    outside and linked back: open refuses the first, every backend and the xarray view the
    second as they read, an append refuses to write through it (zarr's writes too), and
    ``verify`` names the link."""
    layout: Layout = crafted.layout  # type: ignore[attr-defined]
    outside = tmp_path / "outside"

    def link(store: Path, _: Layout) -> None:
        folder = store / "masks" / "c"
        if where == "chunk folder":
            folder = folder / str(SAMPLE // layout.shard_size if layout.sharded else SAMPLE)
        shutil.move(folder, outside)
        os.symlink(outside, folder)
    if crafted.remote:  # type: ignore[attr-defined]
        pytest.skip("an object store has no links (an upload copies the files)")
    target = crafted(link)
    if where == "c":
        with pytest.raises(StoreFormatError, match=r"array 'masks' refused: .*symbolic link"):
            SampleReader(target)
    else:
        for backend in BACKENDS:
            with pytest.raises(StoreFormatError, match="symbolic link"):
                read_with(target, backend, SAMPLE)
        store = Store.open(target, mode="r+")
        with pytest.raises(StoreFormatError, match="symbolic link"):
            store.check_writable(store.schema["masks"], SAMPLE, SAMPLE + 1)
        with pytest.raises(StoreFormatError, match="symbolic link"):  # zarr's own writes too
            store.array("masks")[SAMPLE] = 0
        with pytest.raises(StoreFormatError, match="symbolic link"):  # the xarray view
            open_xarray(target)["masks"][SAMPLE].load()
    assert "a symbolic link inside the store" in problems(target)


def test_slots_past_the_stored_committed_blocks_are_not_in_the_xarray_view(
        crafted: Make) -> None:
    """Arrays grown past the last stored ``committed`` block (a first flush interrupted after
    the resize) hold nothing committed: the view leaves them out like every reader."""
    def grow(store: Path, _: Layout) -> None:
        for array in [p.name for p in store.iterdir() if (p / "zarr.json").exists()]:
            edit_metadata(store, array, lambda d: d["shape"].__setitem__(0, 5000))
    target = crafted(grow)
    assert open_xarray(target).sizes["sample"] == len(known_samples())
