"""What ``arraystore show`` draws for a sample: a row of panels, chosen by the store's kind.

A view turns one sample's field values into :class:`Panel` s -- plain data (an RGB or 2-D
array, boxes to draw, or text); :mod:`arraystore.show` renders them. Views of dataset kinds live
beside their converters and register under the entry-point group ``arraystore.views`` with the
kind as the name (``sa1b = arraystore.converters.sa1b.view:Sa1bView``), so ``arraystore`` stays free
of dataset knowledge. Kinds without a view get :class:`GenericView`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from arraystore.plugins import VIEWS_GROUP, find_plugin
from arraystore.schema import Schema


@dataclass
class Panel:
    """One cell of a row: an image (``(H, W, 3)`` uint8 shown as RGB, or ``(H, W)`` shown with
    ``cmap`` over ``value_range``, data min/max by default), ``points`` (a scatter, coloured by
    ``point_labels``), or ``text``. ``boxes`` are xyxy rectangles in the image's pixels, drawn
    in ``box_colors`` (RGB uint8). ``span``: how many cells wide the panel is (a strip of
    bins)."""

    title: str
    image: np.ndarray | None = None
    text: str | None = None
    cmap: str = "viridis"
    value_range: tuple[float, float] | None = None
    boxes: np.ndarray | None = None
    box_colors: list[tuple[int, int, int]] = field(default_factory=list)
    span: int = 1
    points: np.ndarray | None = None  # (N, 2): a scatter instead of an image
    point_labels: np.ndarray | None = None  # (N,) ints colouring the points
    legend_title: str | None = None  # a scatter's legend of its labels, under this title


@dataclass
class SummaryRow:
    """One row of a summary view: its header and its panels."""

    title: str
    panels: list[Panel]


class View:
    """How samples of some kinds are shown. Subclasses set ``fields`` (what a row reads) and
    ``panels``; both see the fields the user asked for, if any (``--fields``).

    A view with ``per_sample = False`` draws all the samples shown together instead
    (:meth:`summary`, e.g. a scatter of embeddings), ``default_count`` of them by default.
    """

    kind: ClassVar[str] = ""
    per_sample: ClassVar[bool] = True
    default_count: ClassVar[int] = 4

    def fields(self, schema: Schema, asked: Sequence[str]) -> tuple[str, ...]:
        """The fields to read for one row."""
        return tuple(asked) or tuple(schema.names)

    def panels(self, sample: Mapping[str, Any], schema: Schema,
               asked: Sequence[str]) -> list[Panel]:
        """The panels of one sample's row."""
        return field_panels(sample, schema)

    def summary(self, samples: Sequence[Mapping[str, Any]], schema: Schema,
                meta: Mapping[str, Any]) -> list[SummaryRow]:
        """Rows of panels for many samples (views with ``per_sample = False``); ``meta`` is
        the store's ``arraystore`` attribute (settings, provenance)."""
        raise NotImplementedError


class GenericView(View):
    """Every per-sample field with 2 or 3 dimensions as an image, the rest as text."""


def field_panels(sample: Mapping[str, Any], schema: Schema) -> list[Panel]:
    """One panel per image-like field (2-D; 3-D: RGB when (H, W, 3) uint8, else its first
    slice), then one text panel with every scalar, string and vector."""
    panels, lines = [], []
    for name, value in sample.items():
        array = np.asarray(value)
        rgb = array.ndim == 3 and array.shape[-1] == 3 and array.dtype == np.uint8
        if array.ndim == 2 or rgb:
            panels.append(Panel(name, image=array))
        elif array.ndim == 3:
            panels.append(Panel(f"{name}[0] of {array.shape[0]}", image=array[0]))
        else:
            lines.append(f"{name}: {_short(value)}")
    if lines:
        panels.append(Panel("values", text="\n".join(lines)))
    return panels


def _short(value: Any) -> str:
    array = np.asarray(value)
    if array.ndim == 0:
        return str(value)
    if array.size <= 6:
        return np.array2string(array, precision=3, separator=", ")
    return f"{array.dtype} {array.shape}, range [{array.min():.3g}, {array.max():.3g}]"


def view_for(kind: str) -> View:
    """The view registered for ``kind``, or the generic one."""
    found = find_plugin(VIEWS_GROUP, kind)
    return found() if found is not None else GenericView()
