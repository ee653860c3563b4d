"""``arraystore show``: one PNG, a row per sample; boxes drawn where the stored ``bboxes`` say;
views for every kind the project builds; clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_gopro import GEOMETRY, IMAGE, SPIKE

from arraystore import Field, Layout, SampleReader, Schema, Store, ingest
from arraystore.converters.gopro.source import GoproSpikeSource
from arraystore.converters.npz.source import NpzDirectorySource
from arraystore.converters.sa1b.source import Sa1bTarSource
from arraystore.converters.sa1b.view import COLORS
from arraystore.converters.sa1b_bin.source import BinDirectorySource
from arraystore.errors import UnknownFieldError
from arraystore.show import (
    CELL,
    LEGEND_WIDTH,
    PAD,
    ROW_HEADER,
    TITLE,
    MissingExtraError,
    NothingToShowError,
    show,
)
from arraystore.testing.gopro_trees import write_gopro_tree
from tests.conftest import run_cli

ROW = ROW_HEADER + TITLE + CELL + PAD


def png(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def check_png(result, rows: int) -> np.ndarray:
    image = png(result.path)
    assert image.shape[:2] == (result.height, result.width)
    assert result.height == PAD + rows * ROW and result.rows == rows
    return image


@pytest.fixture(scope="module")
def sa1b_store(tmp_path_factory, shard) -> Path:
    out = tmp_path_factory.mktemp("show") / "sa1b.zarr"
    ingest(Sa1bTarSource(max_boxes=2), [shard], out, workers=1)
    return out


def test_sa1b_rows_and_boxes_where_the_store_says(sa1b_store) -> None:
    result = show(sa1b_store)
    image = check_png(result, 4)
    assert result.path == Path(f"{sa1b_store}.show.png")
    reader = SampleReader(sa1b_store)
    checked = 0
    for row, sample_id in enumerate(result.sample_ids):
        sample = reader.read(reader.sample_ids.index_of([sample_id])[0])
        panel = next(p for p in result.panels if p.row == row and p.column == 0)
        assert panel.width == panel.height == CELL and panel.scale == CELL / 1024
        for k in range(int(sample["metadata"][0])):
            x0, y0, x1, y1 = sample["bboxes"][k] * panel.scale
            left = panel.x + round(x0)
            middle = panel.y + round((y0 + y1) / 2)
            top, center = panel.y + round(y0), panel.x + round((x0 + x1) / 2)
            assert tuple(image[middle, left]) == COLORS[k], (sample_id, k, "left edge")
            assert tuple(image[top, center]) == COLORS[k], (sample_id, k, "top edge")
            checked += 1
    assert checked >= 4  # big, small and tall have boxes, two each where there are two


def test_feature_panel_says_not_computed(sa1b_store) -> None:
    from arraystore.views import view_for

    reader = SampleReader(sa1b_store)
    view = view_for("sa1b")
    names = view.fields(reader.schema, ())
    panels = {p.title: p for p in view.panels(reader.read(1, names), reader.schema, ())}
    assert "not computed" in panels["P4_S16 (PCA)"].text  # 'small' has no features NPZ
    panels = {p.title: p for p in view.panels(reader.read(0, names), reader.schema, ())}
    assert panels["P4_S16: PCA 1-3 as RGB"].image.shape == (64, 64, 3)
    assert "bg_map_64" not in names  # only if asked


def test_chosen_samples_and_fields_through_the_cli(sa1b_store, tmp_path) -> None:
    out = tmp_path / "look.png"
    result = run_cli("show", str(sa1b_store), "small", "ties", "-o", str(out),
                                      "--fields", "image", "bg_map_64", "edge_64x64")
    assert result.exit_code == 0, result.output
    assert f"2 samples drawn: {out}" in result.output
    assert png(out).shape[:2] == (PAD + 2 * ROW, PAD + 3 * (CELL + PAD))
    result = run_cli("show", str(sa1b_store))
    assert result.exit_code == 0 and f"{sa1b_store}.show.png" in result.output


def test_only_the_samples_shown_are_read(sa1b_store, tmp_path, monkeypatch) -> None:
    calls = []
    real = SampleReader.read
    monkeypatch.setattr(SampleReader, "read",
                        lambda self, i, fields=None: calls.append(i) or real(self, i, fields))
    show(sa1b_store, ["tall"], out=tmp_path / "one.png")
    assert calls == [2]


def test_errors_name_what_is_wrong(sa1b_store, tmp_path) -> None:
    with pytest.raises(NothingToShowError, match=r"no committed samples \['nope', 'gone'\]"):
        show(sa1b_store, ["big", "nope", "gone"])
    with pytest.raises(UnknownFieldError, match=r"no fields \['imag'\].*'image'"):
        show(sa1b_store, fields=["imag"])
    empty = tmp_path / "empty.zarr"
    Store.create(empty, Schema("toy", (Field("x", (4, 4), "float32", ("a", "b")),)), Layout("raw"))
    with pytest.raises(NothingToShowError, match="has no committed samples to show"):
        show(empty)
    result = run_cli("show", str(empty))
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_missing_matplotlib_names_the_extra(sa1b_store, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(MissingExtraError, match=r"arraystore\[viz\]"):
        show(sa1b_store, out=tmp_path / "x.png")


def test_gopro_frames_and_voxel_strip(tmp_path) -> None:
    root = write_gopro_tree(tmp_path / "tree", {"train": {"GOPR0372_07_00": 5}}, IMAGE, SPIKE)
    out = tmp_path / "gopro.zarr"
    ingest(GoproSpikeSource(voxels="precompute", **GEOMETRY), [root], out, workers=1)
    result = show(out, ["train/GOPR0372_07_00/000004"])
    image = check_png(result, 1)
    assert result.width == PAD + 6 * (CELL + PAD)  # blur, sharp, a 3-cell strip, text
    strip = next(p for p in result.panels if p.column == 2)
    assert strip.width > 3 * CELL  # the five bins side by side
    assert image[strip.y:strip.y + strip.height, strip.x:strip.x + strip.width].std() > 10


def test_generic_view_of_other_kinds(tmp_path) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "npz"
    folder.mkdir()
    for n in range(3):
        np.savez(folder / f"pair_{n}.npz", image1=rng.integers(0, 255, (48, 64, 3), np.uint8),
                 mask1=(rng.random((48, 64)) > 0.5).astype(np.uint8),
                 score=np.float32(n), caption_tokens=np.int64(7 + n))
    out = tmp_path / "pairs.zarr"
    ingest(NpzDirectorySource(), [folder], out, workers=1)
    result = show(out)
    check_png(result, 3)
    titles = [p for p in result.panels if p.row == 0]
    assert len(titles) == 2  # image1 (RGB) and mask1 (colour map); scalars as text
    result = run_cli("show", str(out), "--fields", "image1", "mask1",
                                      "-o", str(tmp_path / "f.png"))
    assert result.exit_code == 0, result.output
    assert png(tmp_path / "f.png").shape[1] == PAD + 2 * (CELL + PAD)


def test_embedding_table_as_one_scatter(tmp_path) -> None:
    """An embedding store (imported from a generated .npy cache, no model): one row, a PCA
    scatter of the rows shown coloured by category, and what they are."""
    from arraystore.converters.coco_panoptic.vis_cache import VisCacheSource

    cache = tmp_path / "cache"
    cache.mkdir()
    rng = np.random.default_rng(0)
    lines = ["image_id\tsegment_id\tfeat_file"]
    for n in range(30):
        vector = rng.standard_normal(64)
        np.save(cache / f"{n:012d}_{n + 1}.npy", (vector / np.linalg.norm(vector)).astype(
            np.float16))
        lines.append(f"{n:012d}\t{n + 1}\t{n:012d}_{n + 1}.npy")
    (cache / "inst2feat.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "vis.zarr"
    ingest(VisCacheSource(), [cache], out, workers=1)
    result = show(out)
    image = check_png(result, 2)  # the scatter, then the crops (none for an imported cache)
    assert result.sample_ids == [f"{n}_{n + 1}" for n in range(30)]
    top, wide = PAD + ROW_HEADER + TITLE, 3 * (CELL + PAD) - PAD
    scatter = image[top:top + CELL, PAD:PAD + wide - LEGEND_WIDTH]
    assert (scatter.reshape(-1, 3) != 255).any(axis=1).mean() > 0.001  # points drawn
    legend = image[top:top + CELL, PAD + wide - LEGEND_WIDTH + 8:PAD + wide]
    assert (legend.reshape(-1, 3) != 255).any(axis=1).mean() > 0.001  # the legend beside it
    assert not [p for p in result.panels if p.row == 1]  # a text panel says why, no image
    assert check_png(show(out, count=10, out=tmp_path / "ten.png"), 2) is not None


def test_bin_imported_store_shows_as_sa1b(tmp_path) -> None:
    from conftest import write_bin_dataset

    store = tmp_path / "b.zarr"
    ingest(BinDirectorySource(), [write_bin_dataset(tmp_path / "bin", 2)], store, workers=1)
    check_png(show(store), 2)
