"""The series' look: one palette for the conditions (Okabe–Ito, the same in every figure), the axis labels with units
and the layout helpers every figure of ``plotting/`` uses (title, labels, grid, legends off the data, panels)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from introspection_utils.core import deprecation

LENS_XLABEL = "read-out layer i (residual after layer i → final norm → unembedding)"
LENS_YLABEL = "yes − no logit difference at that layer (logits)"
# Okabe–Ito colours (colour-blind safe), one per condition, for the whole series.
PALETTE: dict[str, str] = {
    "introspection": "#0072B2",  # blue
    "control": "#E69F00",  # orange
    "baseline": "#555555",  # grey
    "random": "#CC79A7",  # purple
}
RANDOM_ALPHA = 0.35
YLABEL = "yes − no logit difference (logits)"

# (10_localization, 11_atlas) Colours for the conditions that only these figures have, from the same Okabe–Ito set.
LOCALIZATION_COLORS: dict[str, str] = {
    "introspection": PALETTE["introspection"],
    "random": PALETTE["random"],
    "abstract": "#009E73",  # green
    "concrete": "#D55E00",  # vermillion
    "shuffled": "#56B4E9",  # sky blue
}

# (11_atlas) One colour per verdict class. Orange (the controls) and reddish purple (random vectors) keep their
# meaning, so no class takes them; the two shared shifts sit at opposite ends (warm vermillion, cool sky blue).
CLASS_COLORS: dict[str, str] = {
    "introspection-specific": PALETTE["introspection"],  # blue: the introspection question's own shift
    "shared yes-shift": "#D55E00",  # vermillion
    "shared suppression": "#56B4E9",  # sky blue
    "opposite": "#009E73",  # bluish green
    "one-sided": "#000000",  # black
    "compression": "#8C6D00",  # dark gold (Okabe–Ito's yellow, darkened to read on white)
    "no effect": PALETTE["baseline"],
}

def only_value(df: pd.DataFrame, column: str, value: Any, what: str) -> tuple[pd.DataFrame, Any]:
    """Filter ``df`` on ``column == value``; ``value=None`` requires the column to hold a single value."""
    values = sorted(df[column].unique())
    if value is None:
        if len(values) != 1:
            raise ValueError(f"the table has several {what}s ({values}); pass {column}=")
        value = values[0]
    elif value not in values:
        raise ValueError(f"{what} {value!r} is not in the table ({values})")
    return df[df[column] == value], value



def finish_axes(ax: plt.Axes, title: str, xlabel: str, ylabel: str = YLABEL, legend_loc: str = "outside") -> None:
    """Title, labels, grid and the legend: by default outside the axes on the right, so it never covers data."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.25)
    if legend_loc == "outside":
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    else:
        ax.legend(fontsize=7, loc=legend_loc, framealpha=0.85)



def scale_label(norm: float | None) -> str:
    """The x label of a scale axis: the scale multiplies the raw concept vector (whose norm is given)."""
    suffix = f", ‖v‖ = {norm:.3g}" if norm is not None else ""
    return f"scale (× raw concept vector v{suffix})"



def new_axes(ax: plt.Axes | None, size: tuple[float, float] = (7.5, 4.6)) -> tuple[plt.Figure, plt.Axes]:
    if ax is None:
        fig, ax = plt.subplots(figsize=size)
        return fig, ax
    return ax.figure, ax



def plot_grid(plot: Any, items: Sequence[Any], *, ncols: int = 2, size: tuple[float, float] = (7.2, 4.4),
              **kwargs: Any) -> plt.Figure:
    """Several panels of one plot function side by side: ``plot(item, ax=ax, **kwargs)`` for each item."""
    nrows = -(-len(items) // ncols)
    fig, axes = plt.subplots(nrows, min(ncols, len(items)), figsize=(size[0] * min(ncols, len(items)),
                                                                     size[1] * nrows), squeeze=False)
    for ax, item in zip(axes.flat, items, strict=False):
        plot(item, ax=ax, **kwargs)
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    fig.tight_layout()
    shared_legend(fig, list(axes.flat)[:len(items)])
    return fig


def shared_legend(fig: plt.Figure, axes: Sequence[plt.Axes]) -> None:
    """Panels whose legends say the same thing get one legend under the figure instead of one beside each panel
    (which squeezed each panel to a third of its width); panels whose legends differ keep their own."""
    entries = [ax.get_legend_handles_labels() for ax in axes if ax.get_legend() is not None]
    if len(entries) < 2 or len(entries) != len(axes) or any(labels != entries[0][1] for _, labels in entries):
        return
    for ax in axes:
        ax.get_legend().remove()
    fig.tight_layout()  # the panels take back the width their legends had
    handles, labels = entries[0]
    ncol = 3 if max(map(len, labels)) < 40 else 2
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, fontsize=8, frameon=False)



def legend_labels(fig: plt.Figure) -> list[str]:
    """Every legend entry of ``fig`` (for checks)."""
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    return [t.get_text() for legend in legends for t in legend.get_texts()]


# save_figure, save_notebook_figure and stabilise moved to plotting/saving.py; the old path answers one release
__getattr__ = deprecation.moved(__name__, "introspection_utils.plotting.saving")
