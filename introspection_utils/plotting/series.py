"""Figures for the notebook series: one palette for the conditions, labelled axes with units, a legend, a title that
names the model, the concept and the layer, and :func:`save_figure` writing PNGs under ``figures/<model>/``.

Conditions and their colours (the same in every figure of the series):

* ``introspection`` — the injected-thought question ("Do you detect an injected thought?"), concept vector;
* ``control``       — the paper's control questions (answer always "no"), each thin, their mean thick with ±1 std;
* ``baseline``      — the same questions with no injection (horizontal reference lines);
* ``random``        — norm-matched random vectors, translucent (introspection solid, control mean dashed).

The scale multiplies the *raw* concept vector (activation(word) − baseline mean), not a unit vector: scale 4 adds
4 × v, whose norm is 4 × ‖v‖. The x labels say so and give ‖v‖.

Inputs are the tidy tables of :mod:`introspection_utils.experiments.sweeps` and
:mod:`introspection_utils.experiments.logit_lens` and
:mod:`introspection_utils.experiments.attention`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from introspection_utils.core.paths import atomic_write, figures_dir, model_name, project_root, results_dir
from introspection_utils.core.results import concept_rows
from introspection_utils.engine.vectors import cosine_similarity_matrix
from introspection_utils.experiments.grading import detection_rates
from introspection_utils.experiments.localization import accuracy_lines
from introspection_utils.stats import terms

if TYPE_CHECKING:
    from introspection_utils.engine.vectors import VectorBank
    from introspection_utils.experiments.attention import AttentionMaps

__all__ = ["PALETTE", "LOCALIZATION_COLORS", "CLASS_COLORS", "project_root", "figures_dir", "results_dir",
           "save_figure", "stabilise", "FIGURE_FORMATS",
           "plot_scale_sweep", "plot_layer_sweep", "plot_logit_lens", "plot_attention_maps", "plot_vector_norms",
           "plot_cosine_matrix", "sweep_panels", "lens_panels", "plot_grid", "legend_labels", "scale_label",
           "plot_localization", "plot_atlas", "plot_detection_rates", "plot_refusal_layers",
           "plot_ablation_comparison", "ablation_panels"]

# Okabe–Ito colours (colour-blind safe), one per condition, for the whole series.
LENS_XLABEL = "read-out layer i (residual after layer i → final norm → unembedding)"
LENS_YLABEL = "yes − no logit difference at that layer (logits)"
PALETTE: dict[str, str] = {
    "introspection": "#0072B2",  # blue
    "control": "#E69F00",  # orange
    "baseline": "#555555",  # grey
    "random": "#CC79A7",  # purple
}
RANDOM_ALPHA = 0.35
YLABEL = "yes − no logit difference (logits)"


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
    (a fraction of a pixel): float noise in the results (thread counts, summation order; ~1e-5 logits) then no
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


# ---------------------------------------------------------------------------------------------------------- sweeps

def _only(df: pd.DataFrame, column: str, value: Any, what: str) -> tuple[pd.DataFrame, Any]:
    """Filter ``df`` on ``column == value``; ``value=None`` requires the column to hold a single value."""
    values = sorted(df[column].unique())
    if value is None:
        if len(values) != 1:
            raise ValueError(f"the table has several {what}s ({values}); pass {column}=")
        value = values[0]
    elif value not in values:
        raise ValueError(f"{what} {value!r} is not in the table ({values})")
    return df[df[column] == value], value


def _draw_conditions(ax: plt.Axes, df: pd.DataFrame, x: str, *, show_controls: bool, show_random: bool,
                     show_baselines: bool, y: str = "logit_diff", baseline: str = "baseline_logit_diff") -> None:
    """Introspection, control questions (each + mean ± std), random vectors and baselines of one concept's rows
    ``df`` against ``x`` (the curves of :func:`terms.curve_table`)."""
    concept = str(df["concept"].iloc[0])
    c = terms.curve_table(df, concept, x=x, y=y, baseline=baseline)
    if show_random:
        for k, r in enumerate(terms.random_curves(df, concept, x=x, y=y).values()):
            ax.plot(r.index, r["introspection"], color=PALETTE["random"], alpha=RANDOM_ALPHA, lw=1.6,
                    label="random vector: introspection" if k == 0 else None)
            if "control" in r:
                ax.plot(r.index, r["control"], color=PALETTE["random"], alpha=RANDOM_ALPHA, lw=1.6, ls="--",
                        label="random vector: control mean" if k == 0 else None)
    n_controls = int(c["n_controls"].max()) if c["n_controls"].notna().any() else 0
    if show_controls and n_controls:
        controls = terms.question_table(df, concept, x=x, y=y)
        for k, question in enumerate(controls.columns):
            ax.plot(controls.index, controls[question].values, color=PALETTE["control"], lw=0.7, alpha=0.45,
                    label="control questions (each)" if k == 0 else None)
    if n_controls:
        mean, std = c["control_mean"], c["control_std"]
        ax.fill_between(c.index, mean - std, mean + std, color=PALETTE["control"], alpha=0.18, lw=0,
                        label="control ±1 std")
        ax.plot(c.index, mean.values, color=PALETTE["control"], lw=2.2, marker="s", ms=4,
                label=f"control mean (n={n_controls})")
    wordings = int(c["n_wordings"].max())
    ax.plot(c.index, c["introspection"].values, color=PALETTE["introspection"], lw=2.4, marker="o", ms=5,
            label="introspection question" + (f" (mean of {wordings} wordings)" if wordings > 1 else ""))
    if n_controls and x != "lens_layer" and c["predicted"].notna().any():
        fitted = "b + c·baseline" if c["fit_ok"].all() else "b only: too few controls or too little spread"
        ax.plot(c.index, c["predicted"].values, color=PALETTE["introspection"], lw=1.6, ls=(0, (4, 2)), marker="x",
                ms=5, label=f"controls' prediction for it ({fitted}); the gap is I")
    if show_baselines:
        ax.axhline(c["introspection_baseline"].mean(), color=PALETTE["baseline"], ls="--", lw=1.2,
                   label="no injection: introspection")
        if n_controls:
            ax.axhline(c["control_baseline"].mean(), color=PALETTE["baseline"], ls=":", lw=1.4,
                       label="no injection: control mean")
    ax.axhline(0.0, color="black", lw=0.6, alpha=0.6)


def _finish(ax: plt.Axes, title: str, xlabel: str, ylabel: str = YLABEL, legend_loc: str = "outside") -> None:
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


def plot_scale_sweep(df: pd.DataFrame, concept: str, *, layer: int | None = None, ax: plt.Axes | None = None,
                     show_controls: bool = True, show_random: bool = True, mark: tuple[float, float] | None = None,
                     mark_label: str = "current trial") -> plt.Figure:
    """Yes−no logit difference vs scale for ``concept`` at ``layer`` (a :func:`sweeps.scale_sweep` table).

    Introspection solid; each control question thin; control mean with a ±1 std band; no-injection baselines as
    horizontal lines; random vectors translucent. ``mark=(scale, value)`` marks one point (the explorer's).
    """
    sub, layer = _only(concept_rows(df, concept), "layer", layer, "layer")
    fig, ax = _axes(ax)
    _draw_conditions(ax, sub, "scale", show_controls=show_controls, show_random=show_random, show_baselines=True)
    if mark is not None:
        ax.plot([mark[0]], [mark[1]], marker="*", ms=16, color="black", ls="none", label=mark_label, zorder=5)
    norm = float(sub.loc[sub["vector_kind"] == "concept", "vector_norm"].iloc[0])
    _finish(ax, f"{sub['model'].iloc[0]} · concept '{concept}' · layer {layer}\nscale sweep", scale_label(norm))
    return fig


def plot_layer_sweep(df: pd.DataFrame, concept: str, *, scale: float | None = None, ax: plt.Axes | None = None,
                     show_controls: bool = True, show_random: bool = True) -> plt.Figure:
    """Yes−no logit difference vs injection layer at one ``scale`` (a :func:`sweeps.layer_sweep` table)."""
    sub, scale = _only(concept_rows(df, concept), "scale", scale, "scale")
    fig, ax = _axes(ax)
    _draw_conditions(ax, sub, "layer", show_controls=show_controls, show_random=show_random, show_baselines=True)
    layers = sorted(sub["layer"].unique())
    _finish(ax, f"{sub['model'].iloc[0]} · concept '{concept}' · layers {layers[0]}–{layers[-1]}\n"
                f"layer sweep at scale {scale:g} (× each layer's raw concept vector)",
            "injection layer (decoder-layer index)")
    return fig


def plot_logit_lens(lens: pd.DataFrame, concept: str, *, ax: plt.Axes | None = None,
                    show_random: bool = True) -> plt.Figure:
    """Yes−no logit difference read at every layer (logit lens) for ``concept``, introspection vs control (mean ±1
    std), concept vs random vectors (translucent), with the no-injection lens of each question kind dashed.

    ``lens``: a :func:`logit_lens.lens_profile` table (one injection layer and scale per concept).
    """
    sub = concept_rows(lens, concept)
    layer, scale = int(sub["layer"].iloc[0]), float(sub["scale"].iloc[0])
    fig, ax = _axes(ax)
    _draw_conditions(ax, sub, "lens_layer", show_controls=False, show_random=show_random, show_baselines=False,
                     y="lens_diff", baseline="baseline_lens_diff")
    c = terms.curve_table(sub, concept, x="lens_layer", y="lens_diff", baseline="baseline_lens_diff")
    for kind, ls in (("introspection", "--"), ("control", ":")):
        base = c[f"{kind}_baseline"].dropna()
        if len(base):
            label = "no injection: introspection" if kind == "introspection" else "no injection: control mean"
            ax.plot(base.index, base.values, color=PALETTE["baseline"], ls=ls, lw=1.3, label=label)
    ax.axvline(layer, color="black", ls="-.", lw=0.9, alpha=0.7, label=f"injection layer {layer}")
    _finish(ax, f"{sub['model'].iloc[0]} · concept '{concept}' · injected at layer {layer}\n"
                f"logit lens at the answer position, scale {scale:g} (× raw concept vector)",
            LENS_XLABEL, ylabel=LENS_YLABEL)
    return fig


def _axes(ax: plt.Axes | None, size: tuple[float, float] = (7.5, 4.6)) -> tuple[plt.Figure, plt.Axes]:
    if ax is None:
        fig, ax = plt.subplots(figsize=size)
        return fig, ax
    return ax.figure, ax


# ------------------------------------------------------------------------------------------------------- attention

def plot_attention_maps(maps: AttentionMaps, *, vmax: float | None = None) -> plt.Figure:
    """Layer × head maps of attention from the (prefilled) answer token to the injected positions: one per
    condition, then the difference maps (:attr:`AttentionMaps.differences`). A dashed line marks the injection:
    it is added to layer L's output, so attention can change only from layer L + 1 (the difference maps are zero
    up to L)."""
    conditions, diffs = list(maps.maps.items()), list(maps.differences().items())
    ncols = max(len(conditions), len(diffs))
    fig, axes = plt.subplots(2, ncols, figsize=(4.2 * ncols, 8.2), squeeze=False)
    top = vmax if vmax is not None else max(float(np.nanmax(m)) for _, m in conditions)
    for ax, (name, m) in zip(axes[0], conditions, strict=False):
        im = ax.imshow(m, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=top)
        _attention_axes(ax, maps, name, color=PALETTE[maps.condition_kind(name)])
        fig.colorbar(im, ax=ax, label=f"attention weight ({maps.stat} over injected positions)")
    span = max((float(np.nanmax(np.abs(m))) for _, m in diffs), default=1.0) or 1.0
    for ax, (name, m) in zip(axes[1], diffs, strict=False):
        im = ax.imshow(m, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-span, vmax=span)
        _attention_axes(ax, maps, name, color="black")
        fig.colorbar(im, ax=ax, label="difference in attention weight")
    for ax in list(axes[0][len(conditions):]) + list(axes[1][len(diffs):]):
        ax.axis("off")
    fig.suptitle(f"{maps.model} · concept '{maps.concept}' · injected at layer {maps.layer}, scale {maps.scale:g} "
                 f"(× raw concept vector) · answer prefilled {maps.prefill!r}\nattention from the answer token to "
                 f"the injected positions, per layer and head", fontsize=10)
    fig.tight_layout()
    return fig


def _attention_axes(ax: plt.Axes, maps: AttentionMaps, name: str, color: str) -> None:
    ax.axhline(maps.layer + 0.5, color="white" if color != "black" else "black", ls="--", lw=1,
               label=f"injected after layer {maps.layer}")
    ax.set_title(name, fontsize=9, color=color)
    ax.set_xlabel("attention head")
    ax.set_ylabel("layer")
    ax.legend(fontsize=7, loc="upper right")


# --------------------------------------------------------------------------------------------------------- vectors

def plot_vector_norms(bank: VectorBank, *, ax: plt.Axes | None = None) -> plt.Figure:
    """L2 norm of each concept vector at every layer (the scale of a sweep multiplies these raw vectors)."""
    norms = bank.norms().numpy()
    fig, ax = _axes(ax)
    for word, row in zip(bank.words, norms, strict=True):
        ax.plot(np.arange(len(row)), row, marker="o", ms=3, lw=1.5, label=word)
    _finish(ax, f"{bank.model} · concepts {', '.join(bank.words)} · all layers\nconcept-vector norms "
                f"(word − mean of baseline words)", "layer (decoder-layer index)",
            ylabel="‖v‖ (L2 norm, residual-stream units)")
    return fig


def plot_cosine_matrix(bank: VectorBank, layer: int, *, ax: plt.Axes | None = None) -> plt.Figure:
    """Cosine similarity between the bank's concept vectors at ``layer`` (a heatmap, values written in)."""
    sim = cosine_similarity_matrix(bank, layer).numpy()
    n = len(bank.words)
    fig, ax = _axes(ax, size=(1.0 + 0.55 * n + 2, 0.55 * n + 2))
    im = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(n), bank.words, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), bank.words, fontsize=8)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(sim[i, j]) > 0.6 else "black")
    fig.colorbar(im, ax=ax, label="cosine similarity (−1 … 1)")
    ax.set_title(f"{bank.model} · concepts {n} · layer {layer}\ncosine similarity of concept vectors", fontsize=10)
    ax.set_xlabel("concept")
    ax.set_ylabel("concept")
    return fig


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
    return fig


def sweep_panels(df: pd.DataFrame, concepts: Sequence[str], *, kind: str = "scale",
                 **kwargs: Any) -> plt.Figure:
    """One scale-sweep (``kind="scale"``) or layer-sweep (``kind="layer"``) panel per concept, side by side."""
    plot = {"scale": plot_scale_sweep, "layer": plot_layer_sweep}[kind]
    return plot_grid(lambda concept, ax, **kw: plot(df, concept, ax=ax, **kw), list(concepts), **kwargs)


def lens_panels(lens: pd.DataFrame, concepts: Sequence[str], **kwargs: Any) -> plt.Figure:
    """One logit-lens panel per concept, side by side."""
    return plot_grid(lambda concept, ax, **kw: plot_logit_lens(lens, concept, ax=ax, **kw), list(concepts),
                     **kwargs)


def legend_labels(fig: plt.Figure) -> list[str]:
    """Every legend entry of ``fig`` (for checks)."""
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]





# ---------------------------------------------------------------------------------------------- localization, atlas
# (10_localization, 11_atlas) Colours for the conditions that only these figures have, from the same Okabe–Ito set.
LOCALIZATION_COLORS: dict[str, str] = {
    "introspection": PALETTE["introspection"],
    "random": PALETTE["random"],
    "abstract": "#009E73",  # green
    "concrete": "#D55E00",  # vermillion
    "shuffled": "#56B4E9",  # sky blue
}
CLASS_COLORS: dict[str, str] = {
    "introspection-specific": PALETTE["introspection"],
    "shared yes-shift": PALETTE["control"],
    "shared suppression": "#D55E00",  # vermillion
    "opposite": "#009E73",  # bluish green
    "one-sided": "#56B4E9",  # sky blue
    "compression": "#CC79A7",  # reddish purple
    "no effect": PALETTE["baseline"],
}


def plot_localization(result: Any) -> plt.Figure:
    """Localization accuracy vs scale (at the run's layer) and vs layer (at its scale), one line per condition
    (Wilson 95% intervals as bars), chance (1/N) dashed. ``result``: a :func:`localization.run_localization` result."""
    spec = result.meta["spec"]
    vs_scale, vs_layer = accuracy_lines(result)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    chance = 1.0 / spec["n_sentences"]
    for ax, table, x in ((axes[0], vs_scale, "scale"), (axes[1], vs_layer, "layer")):
        for k, (condition, group) in enumerate(table.groupby("condition", sort=False)):
            group = group.sort_values(x)
            xs = group[x].astype(float).to_numpy() + (k - 2) * (0.012 * (group[x].max() - group[x].min() or 1))
            err = np.vstack([group["accuracy"] - group["ci_low"], group["ci_high"] - group["accuracy"]])
            label = {"introspection": "introspection question, concept vector", "random": "random vector (same norm)",
                     "abstract": "'most abstract?' (same injection)", "concrete": "'most concrete?' (same injection)",
                     "shuffled": "shuffled sentence order"}.get(condition, condition)
            ax.errorbar(xs, group["accuracy"], yerr=err, marker="o", ms=5, capsize=3,
                        lw=2.4 if condition == "introspection" else 1.4,
                        color=LOCALIZATION_COLORS.get(condition, "black"), label=label)
        ax.axhline(chance, color=PALETTE["baseline"], ls="--", lw=1.2, label=f"chance (1/{spec['n_sentences']})")
        ax.set_ylim(-0.02, 1.02)
    n = int(result.df.groupby(["condition", "layer", "scale"]).size().max())
    _finish(axes[0], f"{result.meta['model']} · {spec['vectors']} vectors · layer {spec['layer']}\n"
                     f"localization accuracy vs scale ({spec['n_sentences']} sentences, n≤{n} per point)",
            "scale (× raw vector of that layer)", ylabel="accuracy (fraction of trials)")
    _finish(axes[1], f"{result.meta['model']} · {spec['vectors']} vectors · scale {spec['scale']:g}\n"
                     f"localization accuracy vs injection layer", "injection layer (decoder-layer index)",
            ylabel="accuracy (fraction of trials)")
    fig.tight_layout()
    return fig


def plot_atlas(table: pd.DataFrame, null: pd.DataFrame | None = None) -> plt.Figure:
    """The atlas: every concept's largest introspection residual I (at its peak scale: the wordings' Δ beyond what
    the controls' line b + c·baseline predicts) with its bootstrap interval, ranked and coloured by its verdict
    class, the q-value beside each, the contrast S as an open marker; and the concepts' I against the random
    vectors' (the null). ``table``: :func:`verdicts.verdicts`; ``null``: :func:`verdicts.random_null`."""
    ranked = table.sort_values("I", ascending=True, ignore_index=True)
    height = max(3.5, 0.32 * len(ranked) + 1.5)
    fig, (ax, ax_null) = plt.subplots(1, 2, figsize=(13, height), gridspec_kw={"width_ratios": [2.2, 1]})
    for cls, color in CLASS_COLORS.items():
        rows = ranked[ranked["class"] == cls]
        if len(rows):
            err = np.vstack([rows["I"] - rows["I_ci_low"], rows["I_ci_high"] - rows["I"]])
            ax.errorbar(rows["I"], rows.index, xerr=err, fmt="o", ms=6, capsize=3, color=color,
                        label=f"{cls} ({len(rows)})")
    ax.scatter(ranked["shift"], ranked.index, marker="D", s=18, facecolors="none", edgecolors="#555555", lw=0.8,
               label="S, the contrast (not the verdict)")
    for i, r in ranked.iterrows():
        ax.annotate(f"q={r['q_value']:.2g}", (max(r["I_ci_high"], r["shift"]), i), xytext=(4, -3),
                    textcoords="offset points", fontsize=6, color="#333333")
    randoms = null[null["vector_kind"] == "random"] if null is not None else pd.DataFrame(columns=["statistic"])
    if len(randoms):
        lo, hi = np.quantile(randoms["statistic"], [0.025, 0.975])
        ax.axvspan(lo, hi, color=PALETTE["random"], alpha=0.15, label="random vectors' I, central 95%")
    ax.axvline(0, color="black", lw=0.7)
    ax.set_yticks(np.arange(len(ranked)), ranked["concept"], fontsize=8)
    layers = ", ".join(map(str, sorted(table["layer"].unique())))
    model = table["model"].iloc[0] if len(table) else ""
    _finish(ax, f"{model} · {len(table)} concepts · layer {layers}\nintrospection residual I at its peak scale, "
                f"95% bootstrap interval (wordings × controls); colour = verdict",
            "I = wordings' Δ − controls' prediction b + c·baseline (logits, signed by polarity)", ylabel="concept")
    values = [table["I"].to_numpy(), randoms["statistic"].to_numpy(float)]
    bins = np.histogram_bin_edges(np.concatenate(values), bins=15)
    ax_null.hist(table["I"], bins=bins, color=PALETTE["introspection"], alpha=0.7, label="concept vectors")
    if len(randoms):
        ax_null.hist(randoms["statistic"], bins=bins, color=PALETTE["random"], alpha=0.5,
                     label=f"random vectors ({len(randoms)})")
    ax_null.axvline(0, color="black", lw=0.7)
    _finish(ax_null, "the null: random vectors of the same norm", "largest I over scales (logits)",
            ylabel="number of vectors")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------- grading, refusal ablation
# (07_generation_and_grading, 08_refusal_ablation) Judge solid, pre-grade open markers dashed; detection in the
# introspection colour, false positives (no-injection answers) in the baseline colour. Ablation: the same colours,
# solid without it and dashed with the refusal direction projected out.

def plot_detection_rates(graded: pd.DataFrame, *, ax: plt.Axes | None = None) -> plt.Figure:
    """Detection rate (injected answers) and false-positive rate (no-injection answers, scale 0) vs scale, from the
    judge and from the pre-grade, with Wilson 95% intervals. ``graded``: a :func:`grading.grade` table."""
    table = detection_rates(graded)
    fig, ax = _axes(ax)
    span = float(graded["scale"].max() - graded["scale"].min()) or 1.0
    labels = {("detection", "judge"): "detection, judge (coherent AND correct identification)",
              ("false positive", "judge"): "false positive, judge (claims a thought, no injection)",
              ("detection", "pre-grade"): "detection, pre-grade (affirms + names concept, not first)",
              ("false positive", "pre-grade"): "false positive, pre-grade (affirms, no injection)"}
    for (measure, source), group in table.groupby(["measure", "source"], sort=False):
        judge = source == "judge"
        group = group.sort_values("scale").dropna(subset=["rate"])
        if group.empty:  # every verdict unparseable: said in the legend, not drawn
            ax.plot([], [], ls="none", label=f"{labels[(measure, source)]}: no parseable verdict")
            continue
        xs = group["scale"].to_numpy(float) + (0 if judge else 0.012 * span)
        err = np.vstack([group["rate"] - group["lo"], group["hi"] - group["rate"]])
        color = PALETTE["introspection"] if measure == "detection" else PALETTE["baseline"]
        ax.errorbar(xs, group["rate"], yerr=err, marker="o" if judge else "s", ms=6, capsize=3, color=color,
                    ls="-" if judge else "--", lw=2.2 if judge else 1.2, mfc=color if judge else "white",
                    label=f"{labels[(measure, source)]}, n≤{int(group['n'].max())}")
    ax.set_ylim(-0.03, 1.03)
    concepts = ", ".join(str(c) for c in dict.fromkeys(graded["concept"]))
    _finish(ax, f"{graded['model'].iloc[0]} · concepts {concepts} · layer {int(graded['layer'].iloc[0])}\n"
                f"free-text answers graded by {graded['judge'].iloc[0]} (Wilson 95% intervals)",
            "scale (× raw concept vector; 0 = no injection)", ylabel="rate (fraction of gradable answers)")
    return fig


def plot_refusal_layers(table: pd.DataFrame, best: int, model: Any, *, ax: plt.Axes | None = None) -> plt.Figure:
    """Held-out separation (Cohen's d) of the refusal direction at every layer, the eligible depth window shaded and
    the chosen layer marked. ``table``: :func:`refusal.refusal_directions`' table."""
    fig, ax = _axes(ax)
    eligible = table[table["eligible"]]
    if len(eligible):
        ax.axvspan(eligible["layer"].min() - 0.5, eligible["layer"].max() + 0.5, color=PALETTE["baseline"],
                   alpha=0.12, lw=0, label="eligible layers (depth window)")
    ax.plot(table["layer"], table["heldout_d"], color="black", marker="o", ms=4, lw=1.6,
            label="held-out Cohen's d (harmful vs harmless projections)")
    d = float(table.loc[table["layer"] == best, "heldout_d"].iloc[0])
    ax.plot([best], [d], marker="*", ms=18, color="#D55E00", ls="none", zorder=5,
            label=f"chosen: layer {best} (d = {d:.2f})")
    _finish(ax, f"{model_name(model)} · refusal direction (mean harmful − mean harmless) · layers "
                f"0–{int(table['layer'].max())}\nheld-out separation by layer; chosen = largest d among eligible "
                f"layers",
            "layer (decoder-layer index)", ylabel="held-out Cohen's d (projection separation)")
    return fig


def _ablation_lines(df: pd.DataFrame, concept: str, x: str) -> dict[str, pd.Series]:
    """Introspection, control mean and the introspection no-injection baseline of a scale sweep (``x="scale"``) or
    of a logit-lens table (``x="lens_layer"``), concept vector only (:func:`terms.curve_table`)."""
    y, base = ("logit_diff", "baseline_logit_diff") if x == "scale" else ("lens_diff", "baseline_lens_diff")
    c = terms.curve_table(df, concept, x=x, y=y, baseline=base)
    return {"introspection": c["introspection"], "control": c["control_mean"], "baseline": c["introspection_baseline"]}


def plot_ablation_comparison(plain: pd.DataFrame, ablated: pd.DataFrame, concept: str, *, x: str = "scale",
                             mark: float | None = None, ax: plt.Axes | None = None) -> plt.Figure:
    """Introspection and control mean without (solid) and with (dashed) the refusal direction ablated, with the
    introspection no-injection baseline (grey) of each. ``x="scale"``: two :func:`sweeps.scale_sweep` tables (one
    layer); ``x="lens_layer"``: two :func:`logit_lens.lens_profile` tables (one scale per concept). ``mark``: a scale
    to mark with a vertical line (e.g. where the answer switches back to no)."""
    if x not in ("scale", "lens_layer"):
        raise ValueError(f"x {x!r}: use 'scale' (sweep tables) or 'lens_layer' (logit-lens tables)")
    a, b = concept_rows(plain, concept), concept_rows(ablated, concept)
    if x == "scale":
        a, layer = _only(a, "layer", None, "layer")
        b, _ = _only(b, "layer", layer, "layer")
    fig, ax = _axes(ax)
    for df, ls, suffix in ((a, "-", ""), (b, "--", ", refusal direction ablated")):
        lines = _ablation_lines(df, concept, x)
        ax.plot(lines["control"].index, lines["control"].values, color=PALETTE["control"], lw=2.0, ls=ls,
                marker="s", ms=4, label=f"control mean{suffix}")
        ax.plot(lines["introspection"].index, lines["introspection"].values, color=PALETTE["introspection"], lw=2.4,
                ls=ls, marker="o", ms=5, label=f"introspection question{suffix}")
        ax.plot(lines["baseline"].index, lines["baseline"].values, color=PALETTE["baseline"], lw=1.2, ls=ls,
                label=f"no injection: introspection{suffix}")
    ax.axhline(0.0, color="black", lw=0.6, alpha=0.6)
    layer = int(a["layer"].iloc[0])
    if mark is not None:
        ax.axvline(mark, color="#D55E00", ls=":", lw=1.4, label=f"switch-back scale {mark:g}")
    if x == "scale":
        norm = float(a.loc[a["vector_kind"] == "concept", "vector_norm"].iloc[0])
        _finish(ax, f"{a['model'].iloc[0]} · concept '{concept}' · layer {layer}\nscale sweep with and without "
                    f"refusal-direction ablation", scale_label(norm))
    else:
        ax.axvline(layer, color="black", ls="-.", lw=0.9, alpha=0.7, label=f"injection layer {layer}")
        _finish(ax, f"{a['model'].iloc[0]} · concept '{concept}' · injected at layer {layer}, scale "
                    f"{float(a['scale'].iloc[0]):g}\nlogit lens with and without refusal-direction ablation",
                LENS_XLABEL, ylabel=LENS_YLABEL)
    return fig


def ablation_panels(plain: pd.DataFrame, ablated: pd.DataFrame, concepts: Sequence[str], *, x: str = "scale",
                    marks: dict[str, float] | None = None, **kwargs: Any) -> plt.Figure:
    """One :func:`plot_ablation_comparison` panel per concept, side by side (``marks``: a scale per concept)."""
    marks = marks or {}
    return plot_grid(lambda concept, ax, **kw: plot_ablation_comparison(
        plain, ablated, concept, x=x, mark=marks.get(concept) if x == "scale" else None, ax=ax, **kw),
        list(concepts), **kwargs)
