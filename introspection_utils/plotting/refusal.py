"""Figures of notebook 08: the candidate directions' causal scores, the ablation points, and sweeps or lenses with
and without the refusal ablation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from introspection_utils.core.paths import model_name
from introspection_utils.core.results import concept_rows
from introspection_utils.plotting.style import (
    LENS_XLABEL,
    LENS_YLABEL,
    PALETTE,
    finish_axes,
    new_axes,
    only_value,
    plot_grid,
    scale_label,
)
from introspection_utils.stats import definitions

SCORE_PANELS = (("bypass", "harmful prompts, direction ablated", "baseline_harmful"),
                ("induce", "harmless prompts, direction added at its layer", "baseline_harmless"),
                ("kl", "harmless prompts, direction ablated", None))


def plot_direction_scores(table: pd.DataFrame, position: int, layer: int, *, kl_threshold: float = 0.1
                          ) -> plt.Figure:
    """Bypass, induce and KL scores (rows of :func:`refusal.direction_scores`) against the candidate's layer, one
    line per post-instruction position; dashed black = the unablated baseline; grey band = the pruned last layers;
    star = the chosen candidate (``position``, ``layer``)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    positions = sorted(table["position"].unique())
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(positions)))
    pruned = table.loc[table["pruned"], "layer"]
    for ax, (column, what, baseline) in zip(axes, SCORE_PANELS, strict=True):
        for color, pos in zip(colors, positions, strict=True):
            rows = table[table["position"] == pos].sort_values("layer")
            ax.plot(rows["layer"], rows[column], marker="o", ms=3, color=color,
                    label=f"position {pos} ({rows['token'].iloc[0]!r})")
        if baseline is not None:
            ax.axhline(float(table[baseline].iloc[0]), color="black", ls="--", lw=1, label="no intervention")
        else:
            ax.axhline(kl_threshold, color=PALETTE["control"], ls=":", lw=1, label=f"KL threshold {kl_threshold:g}")
        if not pruned.empty:
            ax.axvspan(pruned.min() - 0.5, table["layer"].max() + 0.5, color=PALETTE["baseline"], alpha=0.15,
                       label="pruned (last 20% of layers)")
        chosen = table[(table["position"] == position) & (table["layer"] == layer)]
        ax.plot(chosen["layer"], chosen[column], marker="*", ms=16, ls="none", color=PALETTE["introspection"],
                label=f"chosen: position {position}, layer {layer}")
        ax.set_xlabel("layer of the candidate direction (decoder-layer output)")
        ax.set_ylabel("KL divergence (nats)" if column == "kl" else "refusal score (log-odds)")
        ax.set_title(f"{column}: {what}", fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{table['model'].iloc[0]} · refusal direction candidates (mean harmful − mean harmless), "
                 f"scored on {int(table['n_val'].iloc[0])} validation prompts per list")
    fig.tight_layout()
    return fig


def plot_ablation_points(df: pd.DataFrame) -> plt.Figure:
    """Mean yes−no logit difference of the introspection question and of the control questions for each concept
    (:func:`refusal.ablation_points`), without ablation and with the direction ablated after / before the
    injection."""
    points = [p for p in ("none", "after", "before") if p in set(df["ablation"])]
    concepts = list(dict.fromkeys(df["concept"]))
    mean = df.groupby(["concept", "ablation", "question_kind"])["logit_diff"].mean()
    fig, axes = plt.subplots(1, len(concepts), figsize=(5.2 * len(concepts), 4.2), squeeze=False)
    width = 0.38
    for ax, concept in zip(axes[0], concepts, strict=True):
        x = np.arange(len(points))
        for j, kind in enumerate(("introspection", "control")):
            values = [mean.get((concept, p, kind), np.nan) for p in points]
            ax.bar(x + (j - 0.5) * width, values, width=width, color=PALETTE[kind],
                   label="introspection question" if kind == "introspection" else "control mean")
        ax.axhline(0, color=PALETTE["baseline"], lw=0.8)
        ax.set_xticks(x, [{"none": "no ablation", "after": "ablated after\ninjection",
                           "before": "ablated before\ninjection"}[p] for p in points])
        ax.set_ylabel("logit(yes) − logit(no)")
        sel = df[df["concept"] == concept]
        ax.set_title(f"'{concept}' × {sel['scale'].iloc[0]:g} at layer {int(sel['layer'].iloc[0])}")
        ax.legend(fontsize=8)
    fig.suptitle(f"{df['model'].iloc[0]} · refusal direction ablated after vs before the injection")
    fig.tight_layout()
    return fig


def plot_refusal_layers(table: pd.DataFrame, best: int, model: Any, *, ax: plt.Axes | None = None) -> plt.Figure:
    """Held-out separation (Cohen's d) of the refusal direction at every layer, the eligible depth window shaded and
    the chosen layer marked. ``table``: :func:`refusal.refusal_directions`' table."""
    fig, ax = new_axes(ax)
    eligible = table[table["eligible"]]
    if len(eligible):
        ax.axvspan(eligible["layer"].min() - 0.5, eligible["layer"].max() + 0.5, color=PALETTE["baseline"],
                   alpha=0.12, lw=0, label="eligible layers (depth window)")
    ax.plot(table["layer"], table["heldout_d"], color="black", marker="o", ms=4, lw=1.6,
            label="held-out Cohen's d (harmful vs harmless projections)")
    d = float(table.loc[table["layer"] == best, "heldout_d"].iloc[0])
    ax.plot([best], [d], marker="*", ms=18, color="#D55E00", ls="none", zorder=5,
            label=f"chosen: layer {best} (d = {d:.2f})")
    finish_axes(ax, f"{model_name(model)} · refusal direction (mean harmful − mean harmless) · layers "
                    f"0–{int(table['layer'].max())}\nheld-out separation by layer; chosen = largest d among eligible "
                    f"layers",
                "layer (decoder-layer index)", ylabel="held-out Cohen's d (projection separation)")
    return fig



def _ablation_lines(df: pd.DataFrame, concept: str, x: str) -> dict[str, pd.Series]:
    """Introspection, control mean and the introspection no-injection baseline of a scale sweep (``x="scale"``) or
    of a logit-lens table (``x="lens_layer"``), concept vector only (:func:`definitions.curve_table`)."""
    y, base = ("logit_diff", "baseline_logit_diff") if x == "scale" else ("lens_diff", "baseline_lens_diff")
    c = definitions.curve_table(df, concept, x=x, y=y, baseline=base)
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
        a, layer = only_value(a, "layer", None, "layer")
        b, _ = only_value(b, "layer", layer, "layer")
    fig, ax = new_axes(ax)
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
        finish_axes(ax, f"{a['model'].iloc[0]} · concept '{concept}' · layer {layer}\nscale sweep with and without "
                        f"refusal-direction ablation", scale_label(norm))
    else:
        ax.axvline(layer, color="black", ls="-.", lw=0.9, alpha=0.7, label=f"injection layer {layer}")
        finish_axes(ax, f"{a['model'].iloc[0]} · concept '{concept}' · injected at layer {layer}, scale "
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

