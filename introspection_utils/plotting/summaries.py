"""Figures of a result's summary: localization accuracy against chance and its confounds (10, 13), the atlas's
ranked verdicts with their intervals, classes and q-values against the random-vector null (11), and the graded
answers' detection and false-positive rates with Wilson intervals (07)."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from introspection_utils.experiments.grading import detection_rates
from introspection_utils.experiments.localization import accuracy_lines
from introspection_utils.plotting.style import (
    CLASS_COLORS,
    LOCALIZATION_COLORS,
    PALETTE,
    finish_axes,
    new_axes,
)


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
    finish_axes(axes[0], f"{result.meta['model']} · {spec['vectors']} vectors · layer {spec['layer']}\n"
                         f"localization accuracy vs scale ({spec['n_sentences']} sentences, n≤{n} per point)",
                "scale (× raw vector of that layer)", ylabel="accuracy (fraction of trials)")
    finish_axes(axes[1], f"{result.meta['model']} · {spec['vectors']} vectors · scale {spec['scale']:g}\n"
                         f"localization accuracy vs injection layer", "injection layer (decoder-layer index)",
                ylabel="accuracy (fraction of trials)")
    fig.tight_layout()
    return fig



def plot_atlas(table: pd.DataFrame, null: pd.DataFrame | None = None) -> plt.Figure:
    """The atlas: every concept's I (the wordings' effect beyond what the random vectors predict from the controls,
    logits at the largest scale: :mod:`stats.introspection_score`) with its interval (the rank test inverted), ranked
    and
    coloured by its verdict class, the q-value beside each ("no test" without one), the contrast S as an open
    marker; and the concepts' I against the random vectors' (the null, each out of sample). ``table``:
    :func:`verdicts.verdicts`; ``null``: :func:`verdicts.random_null`."""
    ranked = table.sort_values("I", ascending=True, ignore_index=True)
    height = max(3.5, 0.32 * len(ranked) + 1.5)
    fig, (ax, ax_null) = plt.subplots(1, 2, figsize=(13, height), gridspec_kw={"width_ratios": [2.2, 1]})
    for cls, color in CLASS_COLORS.items():
        rows = ranked[ranked["class"] == cls]
        if len(rows):
            # a percentile bootstrap interval need not contain the point estimate (seen on a random tiny model):
            # the bar then stops at the point rather than making matplotlib refuse the figure
            err = np.clip(np.vstack([rows["I"] - rows["I_ci_low"], rows["I_ci_high"] - rows["I"]]), 0, None)
            ax.errorbar(rows["I"], rows.index, xerr=err, fmt="o", ms=6, capsize=3, color=color,
                        label=f"{cls} ({len(rows)})")
    ax.scatter(ranked["shift"], ranked.index, marker="D", s=18, facecolors="none", edgecolors="#555555", lw=0.8,
               label="S, the contrast (not the verdict)")
    for i, r in ranked.iterrows():
        label = "no test" if pd.isna(r["q_value"]) else f"q={r['q_value']:.2g}"
        ax.annotate(label, (np.nanmax([r["I_ci_high"], r["I"], r["shift"]]), i), xytext=(4, -3),
                    textcoords="offset points", fontsize=6, color="#333333")
    randoms = (null[(null["vector_kind"] == "random") & null["statistic"].notna()] if null is not None
               else pd.DataFrame(columns=["statistic"]))
    if len(randoms):
        lo, hi = np.quantile(randoms["statistic"], [0.025, 0.975])
        ax.axvspan(lo, hi, color=PALETTE["random"], alpha=0.15, label="random vectors' I, central 95%")
    ax.axvline(0, color="black", lw=0.7)
    ax.set_yticks(np.arange(len(ranked)), ranked["concept"], fontsize=8)
    layers = ", ".join(map(str, sorted(table["layer"].unique())))
    model = table["model"].iloc[0] if len(table) else ""
    finish_axes(ax, f"{model} · {len(table)} concepts · layer {layers}\nI beyond the random vectors' prediction, "
                    f"95% interval (rank test inverted); colour = verdict",
                "I = wordings' Δ beyond the nulls' prediction from the controls (logits at the largest scale, signed "
                "by polarity)", ylabel="concept")
    values = [table["I"].dropna().to_numpy(), randoms["statistic"].to_numpy(float)]
    bins = np.histogram_bin_edges(np.concatenate(values), bins=15)
    ax_null.hist(table["I"].dropna(), bins=bins, color=PALETTE["introspection"], alpha=0.7, label="concept vectors")
    if len(randoms):
        ax_null.hist(randoms["statistic"], bins=bins, color=PALETTE["random"], alpha=0.5,
                     label=f"random vectors ({len(randoms)})")
    ax_null.axvline(0, color="black", lw=0.7)
    finish_axes(ax_null, "the null: random vectors of the same norm", "I (logits at the largest scale)",
                ylabel="number of vectors")
    fig.tight_layout()
    return fig



def plot_detection_rates(graded: pd.DataFrame, *, ax: plt.Axes | None = None) -> plt.Figure:
    """Detection rate (injected answers) and false-positive rate (no-injection answers, scale 0) vs scale, from the
    judge and from the pre-grade, with Wilson 95% intervals. ``graded``: a :func:`grading.grade` table."""
    table = detection_rates(graded)
    fig, ax = new_axes(ax)
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
    finish_axes(ax, f"{graded['model'].iloc[0]} · concepts {concepts} · layer {int(graded['layer'].iloc[0])}\n"
                    f"free-text answers graded by {graded['judge'].iloc[0]} (Wilson 95% intervals)",
                "scale (× raw concept vector; 0 = no injection)", ylabel="rate (fraction of gradable answers)")
    return fig

