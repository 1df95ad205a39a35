"""The model organisms' figure (14): truth against verdict — how many held-out concepts each organism's atlas put in
each verdict class — beside its detection and false-positive rates and its forced-choice accuracy against chance."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from introspection_utils.experiments.organisms.evaluation import confusion
from introspection_utils.plotting.style import PALETTE, finish_axes

RATE_COLUMNS = {"detection": ("concept vectors: detected", PALETTE["introspection"]),
                "fpr_random": ("random vectors: detected", PALETTE["random"]),
                "fpr_none": ("no injection: detected", PALETTE["baseline"])}


def plot_organisms(table: pd.DataFrame, *, model: str = "") -> plt.Figure:
    """Left: truth (rows, one per organism and the base model) × verdict class (columns), the count of held-out
    concepts in each cell. Right: per organism, the fraction of (vector, wording) cells answered "detected" with
    the concept vectors, random vectors and no injection, and forced-choice accuracy (◆) with its chance (–)."""
    matrix = confusion(table)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13.5, 0.9 * len(table) + 2.6),
                                      gridspec_kw={"width_ratios": [1.5, 1]})
    left.imshow(matrix.to_numpy(), cmap="Blues", aspect="auto", vmin=0, vmax=max(1, int(matrix.to_numpy().max())))
    for (i, j), value in np.ndenumerate(matrix.to_numpy()):
        left.text(j, i, str(int(value)), ha="center", va="center", fontsize=9,
                  color="white" if value > matrix.to_numpy().max() / 2 else "black")
    # slanted: the class names are as wide as a column ("introspection-specific" beside "injection detector")
    left.set_xticks(range(matrix.shape[1]), matrix.columns, fontsize=7, rotation=35, ha="right",
                    rotation_mode="anchor")
    left.set_yticks(range(matrix.shape[0]), matrix.index, fontsize=7)
    left.set_xlabel("verdict class of the atlas (held-out concepts)")
    left.set_title(f"{model}: truth by construction vs verdict (counts of held-out concepts)", fontsize=10)
    y = np.arange(len(table))
    height = 0.8 / len(RATE_COLUMNS)
    for k, (column, (label, color)) in enumerate(RATE_COLUMNS.items()):
        right.barh(y + (k - 1) * height, table[column], height, color=color, label=label)
    if "fc_accuracy" in table:
        right.scatter(table["fc_accuracy"], y, marker="D", color="black", zorder=3, label="forced choice: accuracy")
        right.scatter(table["fc_chance"], y, marker="|", s=200, color="black", zorder=3,
                      label="forced choice: chance")
    right.set_yticks(y, table["organism"], fontsize=8)
    right.set_xlim(0, 1)
    right.invert_yaxis()
    finish_axes(right, "detection and false positives (wordings of both polarities)",
            "fraction of cells (detected: yes − no signed by the wording's polarity > 0)", "")
    fig.tight_layout()
    return fig
