"""The figure of the SAE experiment (09). Plots only: the numbers come from
:mod:`introspection_utils.experiments.sae`."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from introspection_utils.experiments.sae import reconstruction_errors, top_gained, yes_feature_gain
from introspection_utils.plotting.style import PALETTE, RANDOM_ALPHA


def plot_sae_features(table: pd.DataFrame, yes: pd.DataFrame, concept: str, *, k: int = 10) -> plt.Figure:
    """Left: the top-``k`` features gained at the first SAE layer (injected-thought question, concept vector), mean
    activation without (grey) and with (blue) the injection. Right: mean change of each SAE layer's yes-features,
    introspection (blue) vs control (orange), concept vector solid and random vector translucent. The left title
    gives the SAE's reconstruction error on the residuals it read, without and with the injection."""
    first = int(table["sae_layer"].min())
    top = top_gained(table, concept, sae_layer=first, k=k)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    y = np.arange(len(top))[::-1]
    left.barh(y + 0.2, top["act_without"], height=0.4, color=PALETTE["baseline"], label="without injection")
    left.barh(y - 0.2, top["act_with"], height=0.4, color=PALETTE["introspection"], label="with injection")
    left.set_yticks(y, [f"#{f}" for f in top["feature"]])
    left.set_xlabel("SAE feature activation at the answer position (a.u.)")
    left.set_ylabel("feature (ranked by gain)")
    err = reconstruction_errors(table[table["concept"] == concept])
    err = err[(err["sae_layer"] == first) & (err["vector_kind"] == "concept")
              & (err["question_kind"] == "introspection")].iloc[0]
    left.set_title(f"Top {len(top)} features gained at layer {first}\nSAE reconstruction error ‖x − x̂‖²/‖x‖² on "
                   f"these residuals: {err.recon_error_without:.2f} → {err.recon_error_with:.2f} injected",
                   fontsize=10)
    left.legend(loc="lower right")
    gains = yes_feature_gain(table, yes, concept)
    layers = sorted(gains["sae_layer"].unique())
    width = 0.2
    for j, (vector_kind, question_kind) in enumerate([("concept", "introspection"), ("concept", "control"),
                                                      ("random", "introspection"), ("random", "control")]):
        g = gains[(gains["vector_kind"] == vector_kind) & (gains["question_kind"] == question_kind)]
        if g.empty:
            continue
        values = g.set_index("sae_layer").reindex(layers)["gain"]
        right.bar(np.arange(len(layers)) + (j - 1.5) * width, values, width=width, color=PALETTE[question_kind],
                  alpha=1.0 if vector_kind == "concept" else RANDOM_ALPHA,
                  label=f"{question_kind}, {vector_kind} vector")
    right.axhline(0, color=PALETTE["baseline"], lw=0.8)
    right.set_xticks(np.arange(len(layers)), [f"layer {sae_l}" for sae_l in layers])
    right.set_xlabel("SAE layer")
    right.set_ylabel("mean change of the yes-features (a.u.)")
    right.set_title(f"{int((yes['sae_layer'] == layers[0]).sum())} most yes-pointing features per SAE")
    right.legend(fontsize=8)
    model = table["model"].iloc[0]
    fig.suptitle(f"{model} · {concept} injected at layer {int(table['layer'].iloc[0])}, scale "
                 f"{float(table['scale'].iloc[0]):g}")
    fig.tight_layout()
    return fig
