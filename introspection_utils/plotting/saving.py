"""Saving figures: :func:`save_figure` writes the same bytes for the same results (no writer, date or float noise),
and :func:`save_notebook_figure` saves a notebook's figure only where its ``figures_dir`` says (the notebooks')."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from introspection_utils.core.paths import atomic_write, figures_dir

FIGURE_FORMATS = ("png", "svg", "pdf")

# No writer name, version or date in the files: the same figure is the same bytes whoever draws it, and when.
_NO_METADATA = {"png": {"Software": None}, "svg": {"Creator": None, "Date": None},
                "pdf": {"Creator": None, "Producer": None, "CreationDate": None}}

STABLE_STEPS = 2048  # plotted values and axis limits are snapped to 1/STABLE_STEPS of each axis's span



def _snap(values: Any, quantum: float) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    return np.round(values / quantum) * quantum



def _quantum(low: float, high: float, steps: int = STABLE_STEPS) -> float:
    span = abs(high - low)
    return 10.0 ** np.floor(np.log10(span / steps)) if np.isfinite(span) and span > 0 else 0.0



def stabilise(fig: plt.Figure, steps: int = STABLE_STEPS) -> plt.Figure:
    """Snap every plotted value and linear axis limit of ``fig`` to a decimal grid of about 1/``steps`` of its axis
    (a fraction of a pixel): float noise in the results (thread counts, summation order) then no
    longer moves anti-aliased edges, so a figure redrawn from the same experiment is the same file. Lines, markers,
    filled bands, bars and images are covered; log axes and text are left as they are."""
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.patches import Rectangle

    for ax in fig.axes:
        qx = _quantum(*ax.get_xlim(), steps) if ax.get_xscale() == "linear" else 0.0
        qy = _quantum(*ax.get_ylim(), steps) if ax.get_yscale() == "linear" else 0.0
        if qx:
            ax.set_xlim(*_snap(ax.get_xlim(), qx))
        if qy:
            ax.set_ylim(*_snap(ax.get_ylim(), qy))

        def xy(points: np.ndarray, qx: float = qx, qy: float = qy) -> np.ndarray:
            points = np.array(points, dtype=float, copy=True)
            if qx:
                points[..., 0] = _snap(points[..., 0], qx)
            if qy:
                points[..., 1] = _snap(points[..., 1], qy)
            return points

        for line in ax.lines:
            x, y = line.get_data()
            try:
                line.set_data(_snap(x, qx) if qx else x, _snap(y, qy) if qy else y)
            except (TypeError, ValueError):  # categorical data: left as drawn
                continue
        for coll in ax.collections:
            offsets = coll.get_offsets()
            if len(offsets) and coll.get_offset_transform() == ax.transData:
                coll.set_offsets(xy(offsets))
            if isinstance(coll, PolyCollection) and coll.get_transform() == ax.transData:
                coll.set_verts([xy(p.vertices) for p in coll.get_paths()])
            elif isinstance(coll, LineCollection) and coll.get_transform() == ax.transData:
                coll.set_segments([xy(seg) for seg in coll.get_segments()])
        for patch in ax.patches:
            if isinstance(patch, Rectangle) and patch.get_data_transform() == ax.transData:
                (x0, y0), w, h = xy(np.array([patch.get_xy()])).reshape(2), patch.get_width(), patch.get_height()
                patch.set_xy((x0, y0))
                patch.set_width(float(_snap(w, qx)) if qx else w)
                patch.set_height(float(_snap(h, qy)) if qy else h)
        for image in ax.images:
            data = image.get_array()
            low, high = image.get_clim()
            q = _quantum(low, high, 4 * steps) if low is not None and high is not None else 0.0
            if q and data is not None and np.issubdtype(np.asarray(data).dtype, np.floating):
                image.set_data(np.ma.array(_snap(np.ma.getdata(data), q), mask=np.ma.getmask(data)))
    return fig



def save_figure(fig: plt.Figure, model: Any, name: str, *, folder: str | Path | None = None,
                dpi: int = 110, format: str | None = None, stable: bool = True) -> Path:
    """Write ``fig`` as ``<figures dir>/<name>.<format>`` (see :func:`figures_dir`); returns the path.

    ``format``: "png" (default), "svg" or "pdf" (or the extension of ``name``); ``dpi`` sets the raster resolution
    (PNG, and images inside SVG/PDF). The file carries no writer, version or date, and with ``stable`` the drawn
    values are snapped to a sub-pixel grid first (:func:`stabilise`), so the same results give the same bytes."""
    if not name or any(c in name for c in "/\\"):
        raise ValueError(f"figure name {name!r} must be a plain file name (no folders)")
    stem, dot, ext = name.rpartition(".")
    if dot and ext.lower() in FIGURE_FORMATS:
        if format is not None and format != ext.lower():
            raise ValueError(f"figure name {name!r} says {ext!r} but format={format!r}")
        name, format = stem, ext.lower()
    format = format or "png"
    if format not in FIGURE_FORMATS:
        raise ValueError(f"format {format!r} is not one of {', '.join(FIGURE_FORMATS)}")
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not 20 <= dpi <= 1200:
        raise ValueError(f"dpi {dpi!r} must be a number from 20 to 1200")
    if stable:
        stabilise(fig)
    path = figures_dir(model, folder) / f"{name}.{format}"
    with plt.rc_context({"svg.hashsalt": "introspection-utils"}):
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format=format, dpi=dpi, bbox_inches="tight",
                                                          metadata=_NO_METADATA[format]))



def save_notebook_figure(fig: plt.Figure, model: Any, name: str, figures_dir: str | Path | None) -> None:
    """A notebook's figure: saved by :func:`save_figure` as ``<figures_dir>/<name>.png``, its path printed, when the
    notebook was given a ``figures_dir`` (the runner: ``make demo``, ``make findings``); with ``None`` (nbval, or a
    notebook run by hand) only shown, so no tracked file changes. Prints rather than returns, so a cell that ends
    with it shows the path once."""
    if figures_dir:
        print(save_figure(fig, model, name, folder=figures_dir))
