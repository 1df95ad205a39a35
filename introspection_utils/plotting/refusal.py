"""Figures of the refusal step (08): the causal scores of every candidate direction (Arditi et al. 2024's three
panels) and the ablation points (none / after / before the injection). Plots only: the numbers come from
:mod:`introspection_utils.experiments.refusal`."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from introspection_utils.plotting.series import PALETTE

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
