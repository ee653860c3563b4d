"""``arraystore show``: one PNG with a row per sample and a panel per view of it.

The store's kind picks the view (:mod:`arraystore.views`); only the samples shown are read, and
only the fields their view needs. Rendering is matplotlib's, headless (Agg). Images are placed
pixel for pixel (``figimage``) after being fitted into a square cell with OpenCV, and boxes are
drawn at that display size, so what a panel shows at a pixel is exactly what the layout returned
in :class:`ShowResult` says is there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from arraystore.errors import ArrayStoreError, MissingExtraError, UnknownFieldError
from arraystore.location import is_url
from arraystore.ownership import refuse_output_inside_store
from arraystore.reader import SampleReader
from arraystore.store import Store
from arraystore.views import Panel, view_for

CELL = 256  # pixels of a panel's image area (square)
PAD = 10
ROW_HEADER = 24  # the sample id above each row
TITLE = 30  # two lines of panel title
DPI = 100
LEGEND_ENTRIES = 12  # a scatter's legend names its most common labels, the rest as "others"
LEGEND_WIDTH = 130  # pixels at the right of a scatter panel kept for its legend


class NothingToShowError(ArrayStoreError, ValueError):
    """The store has no committed sample, or none of the ids asked for."""


@dataclass
class PanelBox:
    """Where a panel's image landed in the PNG: top-left pixel, size, and display pixels per
    image pixel."""

    row: int
    column: int
    x: int
    y: int
    width: int
    height: int
    scale: float


@dataclass
class ShowResult:
    """The PNG written: the samples drawn, its size in pixels, its rows and where each image
    panel landed."""

    path: Path
    sample_ids: list[str]
    width: int
    height: int
    rows: int
    panels: list[PanelBox] = field(default_factory=list)


def store_name(store: str | os.PathLike[str]) -> str:
    """The last component of a store's path or URL (``sa1b.zarr``)."""
    return os.fspath(store).rstrip("/").rsplit("/", 1)[-1]


def default_output(store: str | os.PathLike[str]) -> Path:
    """``<store>.show.png`` beside a local store; in the current folder for an object store."""
    if is_url(store):
        return Path(f"{store_name(store)}.show.png")
    return Path(f"{os.fspath(store).rstrip('/')}.show.png")


def show(store: str | os.PathLike[str], sample_ids: Sequence[str] = (), *,
         fields: Sequence[str] = (), count: int | None = None,
         out: str | os.PathLike[str] | None = None) -> ShowResult:
    """Render ``sample_ids`` (default: the first ``count`` committed samples, the view's
    default number) of ``store`` into one PNG at ``out`` (default ``<store>.show.png``);
    ``fields`` limits the panels to those."""
    path = Path(out) if out is not None else default_output(store)
    refuse_output_inside_store(path, "show")
    reader = SampleReader(store, fields=())
    if not len(reader):
        raise NothingToShowError(f"{store} has no committed samples to show")
    unknown = [name for name in fields if name not in reader.schema]
    if unknown:
        raise UnknownFieldError(f"{store} has no fields {unknown}; it has "
                                f"{reader.schema.names}")
    view = view_for(reader.kind)
    if not sample_ids:
        indices = list(range(min(count or view.default_count, len(reader))))
    else:
        try:
            indices = reader.sample_ids.index_of(list(sample_ids))
        except KeyError as exc:
            raise NothingToShowError(
                f"{store} has no committed samples {exc.args[0]}; its ids look like "
                f"{reader.sample_ids[:3]}") from None
    names = view.fields(reader.schema, fields)
    if view.per_sample:
        rows = [(reader.sample_ids[i], view.panels(reader.read(i, names), reader.schema, fields))
                for i in indices]
    else:
        meta = Store.open(reader.location, check_arrays=False).meta
        summary = view.summary([reader.read(i, names) for i in indices], reader.schema, meta)
        heading = f"{len(indices)} of the {len(reader)} samples of {store_name(store)}"
        rows = [(f"{heading}: {row.title}" if n == 0 else row.title, row.panels)
                for n, row in enumerate(summary)]
    result = render(rows, path)
    result.sample_ids = [reader.sample_ids[i] for i in indices]
    return result


def render(rows: Sequence[tuple[str, Sequence[Panel]]], path: Path) -> ShowResult:
    """Draw ``rows`` of panels into a PNG at ``path`` (written whole, then renamed in place)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingExtraError(f"arraystore show needs matplotlib ({exc}); install the 'viz' "
                                f"extra: pip install 'arraystore[viz]'") from exc
    columns = max(sum(p.span for p in panels) for _, panels in rows)
    width = PAD + columns * (CELL + PAD)
    row_height = ROW_HEADER + TITLE + CELL + PAD
    height = PAD + len(rows) * row_height
    result = ShowResult(path, [title for title, _ in rows], width, height, len(rows))
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")

    def text(x: int, y: int, value: str, **style: Any) -> None:  # pixels from the top left
        fig.text(x / width, 1 - y / height, value, va="top", ha="left", **style)

    for r, (sample_id, panels) in enumerate(rows):
        top = PAD + r * row_height
        text(PAD, top + 2, sample_id, fontsize=11, fontweight="bold")
        cell = 0
        for c, panel in enumerate(panels):
            x, y = PAD + cell * (CELL + PAD), top + ROW_HEADER + TITLE
            cell += panel.span
            title = panel.title
            if panel.points is not None:
                scatter(fig, panel, (x, y, width, height))
            elif panel.image is not None:
                rgb, scale, shown_range = display_image(panel)
                if shown_range is not None:
                    title += f"  [{shown_range[0]:.3g}, {shown_range[1]:.3g}]"
                fig.figimage(rgb, xo=x, yo=height - y - rgb.shape[0], origin="upper")
                result.panels.append(PanelBox(r, c, x, y, rgb.shape[1], rgb.shape[0], scale))
            else:
                text(x, y + 2, panel.text or "", fontsize=8, family="monospace")
            text(x, top + ROW_HEADER, title, fontsize=8, wrap=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    fig.savefig(partial, dpi=DPI, format="png")
    plt.close(fig)
    partial.replace(path)
    return result


def scatter(fig: Any, panel: Panel, at: tuple[int, int, int, int]) -> None:
    """``panel.points`` as a scatter in the panel's square, coloured by ``point_labels``."""
    x, y, width, height = at
    wide = panel.span * (CELL + PAD) - PAD - (LEGEND_WIDTH if panel.legend_title else 0)
    ax = fig.add_axes((x / width, 1 - (y + CELL) / height, wide / width, CELL / height))
    labels = (panel.point_labels if panel.point_labels is not None
              else np.zeros(len(panel.points), np.int64))
    values, counts = np.unique(labels, return_counts=True)
    named = values[np.argsort(-counts, kind="stable")][:LEGEND_ENTRIES]  # the most common
    import matplotlib

    colours = matplotlib.colormaps["tab20"]
    for number, value in enumerate(named):
        chosen = labels == value
        ax.scatter(panel.points[chosen, 0], panel.points[chosen, 1], s=14, linewidths=0,
                   color=colours(number % 20), label=f"{value} ({int(chosen.sum())})")
    rest = ~np.isin(labels, named)
    if rest.any():
        ax.scatter(panel.points[rest, 0], panel.points[rest, 1], s=14, linewidths=0,
                   color="lightgrey", label=f"{len(values) - len(named)} others")
    if panel.legend_title:
        ax.legend(title=panel.legend_title, fontsize=6, title_fontsize=7, loc="center left",
                  bbox_to_anchor=(1.02, 0.5), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])


def display_image(panel: Panel) -> tuple[np.ndarray, float, tuple[float, float] | None]:
    """The panel's image as RGB uint8 fitted into a CELL x CELL square (INTER_AREA when
    shrinking, nearest when enlarging small maps), its boxes drawn at that size; the scale, and
    the value range a colour map was applied over."""
    image = np.asarray(panel.image)
    shown_range = None
    if image.ndim == 2:
        low, high = panel.value_range or (float(image.min()), float(image.max()))
        shown_range = (low, high)
        normed = (image.astype(np.float64) - low) / ((high - low) or 1.0)
        import matplotlib

        rgb = (matplotlib.colormaps[panel.cmap](np.clip(normed, 0, 1))[..., :3] * 255
               ).astype(np.uint8)
    else:
        rgb = np.ascontiguousarray(image, dtype=np.uint8)
    h, w = rgb.shape[:2]
    scale = min((panel.span * (CELL + PAD) - PAD) / w, CELL / h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST)
    for box, color in zip(panel.boxes if panel.boxes is not None else [], panel.box_colors,
                          strict=False):
        x0, y0, x1, y1 = (round(float(v) * scale) for v in box)
        cv2.rectangle(rgb, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), tuple(map(int, color)),
                      thickness=2)
    return rgb, scale, shown_range
