"""Figures of the tasks a yes-bias cannot score (notebook 13): the forced-choice confusion matrices and accuracy,
the congruence gaps, strength-comparison accuracy by layer — each against its nulls, in the series' palette."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from introspection_utils.experiments.tasks import confusion_matrix, congruence_gaps
from introspection_utils.experiments.tasks.common import best_row
from introspection_utils.plotting.style import PALETTE, finish_axes

NULL_COLORS: dict[str, str] = {
    "isotropic": PALETTE["random"],
    "shuffled": "#56B4E9",  # sky blue
    "covariance": "#009E73",  # bluish green
    "other-word": "#D55E00",  # vermillion
}
ACCURACY = "accuracy (fraction of trials)"


def _color(condition: str, null_kind: str) -> str:
    if condition == "concept":
        return PALETTE["introspection"]
    if condition == "none":
        return PALETTE["baseline"]
    return NULL_COLORS.get(null_kind, PALETTE["random"])


def _label(condition: str, null_kind: str) -> str:
    return {"concept": "concept vector", "none": "no injection"}.get(condition, f"{null_kind} null (same norm)")


def plot_forced_choice(result: Any, summary: pd.DataFrame) -> plt.Figure:
    """Left: the confusion matrix (rows injected, columns chosen, fractions per row) of the concept vectors at their
    best scale (:func:`tasks.common.best_row`, as the reading and the "found" rule), titled with ``summary``'s
    numbers there; right: accuracy vs scale per condition with Wilson 95% intervals,
    chance dashed. ``result``: :func:`forced_choice.run_forced_choice`; ``summary``:
    :func:`forced_choice.forced_choice_summary`."""
    df, spec = result.df, result.meta["spec"]
    concepts = spec["concepts"]
    best = best_row(summary)
    rows = df[(df["condition"] == "concept") & (df["scale"] == best["scale"])]
    counts = confusion_matrix(rows["target"], rows["chosen"], concepts)
    frac = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.0), gridspec_kw={"width_ratios": [1, 1.2]})
    im = axes[0].imshow(frac, vmin=0, vmax=1, cmap="Blues")
    axes[0].set_xticks(range(len(concepts)), concepts, rotation=45, ha="right")
    axes[0].set_yticks(range(len(concepts)), concepts)
    for i in range(len(concepts)):
        for j in range(len(concepts)):
            axes[0].text(j, i, f"{counts[i, j]}", ha="center", va="center", fontsize=8,
                         color="white" if frac[i, j] > 0.6 else "black")
    fig.colorbar(im, ax=axes[0], label="fraction of the row's trials")
    axes[0].set_title(f"{result.meta['model']} · layer {spec['layer']} · scale {best['scale']:g}\n"
                      f"confusion: {best['accuracy']:.0%} correct\nMI {best['mi_bits']:.2f} bits "
                      f"(perm. p = {best['mi_p']:.3g})", fontsize=10)  # three lines: one ran past the colour bar
    axes[0].set_xlabel("chosen concept (label mapped back)")
    axes[0].set_ylabel("injected concept")
    ax = axes[1]
    for (condition, null_kind), g in summary.groupby(["condition", "null_kind"], sort=False):
        g = g.sort_values("scale")
        err = np.vstack([g["accuracy"] - g["ci_low"], g["ci_high"] - g["accuracy"]])
        if condition == "none":
            ax.axhspan(g["ci_low"].iloc[0], g["ci_high"].iloc[0], color=PALETTE["baseline"], alpha=0.12,
                       label=f"no injection ({g['accuracy'].iloc[0]:.0%}, 95% CI)")
            continue
        ax.errorbar(g["scale"], g["accuracy"], yerr=err, marker="o", capsize=3, color=_color(condition, null_kind),
                    lw=2.4 if condition == "concept" else 1.3, label=_label(condition, null_kind))
    ax.axhline(best["chance"], color="black", ls="--", lw=1, label=f"chance (1/{len(concepts)})")
    ax.set_ylim(-0.02, 1.02)
    listings = "Latin-square" if "n_orders_asked" in spec else "shuffled"  # tables from before the balanced design
    finish_axes(ax, f"forced choice among {len(concepts)} concepts ({spec['n_orders']} {listings} listings)",
                "scale (× raw concept vector of that layer)", ylabel=ACCURACY)
    fig.tight_layout()
    return fig


def plot_congruence(result: Any, summary: pd.DataFrame) -> plt.Figure:
    """Left: per concept, Δ yes − no when the question names the injected concept (congruent) and its most
    anti-aligned concept (incongruent), at the best scale (:func:`tasks.common.best_row`: the largest mean gap);
    right: the mean gap vs scale for the concept vectors and each null, with the sign-flip p-value of the concept
    vectors'."""
    df, spec = result.df, result.meta["spec"]
    best = best_row(summary)
    gaps = congruence_gaps(df)
    at = gaps[(gaps["condition"] == "concept") & (gaps["scale"] == best["scale"])].set_index("concept")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    x = np.arange(len(at))
    axes[0].bar(x - 0.2, at["congruent"], 0.4, color=PALETTE["introspection"], label="names the injected concept")
    axes[0].bar(x + 0.2, at["incongruent"], 0.4, color=PALETTE["control"],
                label="names its most anti-aligned concept")
    axes[0].set_xticks(x, [f"{c}\n(vs {spec['partners'][c]})" for c in at.index], fontsize=8)
    axes[0].axhline(0, color="black", lw=0.8)
    finish_axes(axes[0], f"{result.meta['model']} · layer {spec['layer']} · scale {best['scale']:g}\n"
                         f"'Do you detect an injected thought about X?'", "injected concept",
                ylabel="Δ yes − no vs no injection (logits)")
    for (condition, null_kind), g in summary.groupby(["condition", "null_kind"], sort=False):
        g = g.sort_values("scale")
        axes[1].plot(g["scale"], g["mean_gap"], marker="o", color=_color(condition, null_kind),
                     lw=2.4 if condition == "concept" else 1.3, label=_label(condition, null_kind))
    axes[1].axhline(0, color="black", ls="--", lw=1, label="no congruence effect")
    finish_axes(axes[1], f"congruence gap across {int(best['n_concepts'])} concepts (sign-flip p = "
                         f"{best['p_signflip']:.3g} at scale {best['scale']:g})",
                "scale (× raw concept vector of that layer)", ylabel="mean gap: congruent − incongruent Δ (logits)")
    fig.tight_layout()
    return fig


def plot_strength(result: Any, summary: pd.DataFrame) -> plt.Figure:
    """Strength-comparison accuracy vs injection layer per condition (Wilson 95% intervals), 50% dashed, the
    no-injection answer bias in the legend."""
    spec = result.meta["spec"]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    groups = [(key, g) for key, g in summary.groupby(["condition", "null_kind"], sort=False) if key[0] != "none"]
    span = max(float(summary["layer"].dropna().max() - summary["layer"].dropna().min()), 1.0)
    for k, ((condition, null_kind), g) in enumerate(groups):
        g = g.sort_values("layer")
        err = np.vstack([g["accuracy"] - g["ci_low"], g["ci_high"] - g["accuracy"]])
        offset = (k - (len(groups) - 1) / 2) * 0.012 * span  # side by side where the points coincide
        ax.errorbar(g["layer"].astype(float) + offset, g["accuracy"], yerr=err, marker="o", capsize=3,
                    color=_color(condition, null_kind), lw=2.4 if condition == "concept" else 1.3,
                    label=_label(condition, null_kind))
    none = summary[summary["condition"] == "none"]
    bias = f"; no injection answers '1' {none['first_bias'].iloc[0]:.0%}" if len(none) else ""
    ax.axhline(0.5, color="black", ls="--", lw=1, label=f"chance (50%){bias}")
    ax.set_ylim(-0.02, 1.02)
    pairs = ", ".join(f"{w:g} vs {s:g}" for w, s in spec["pairs"])
    finish_axes(ax, f"{result.meta['model']} · which of two injections is stronger?\n(scales {pairs}, both orders)",
                "injection layer (decoder-layer index)", ylabel=ACCURACY)
    fig.tight_layout()
    return fig
