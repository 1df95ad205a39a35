"""Curves and maps of notebooks 01–06 (sweeps, the logit lens, attention maps, vector norms and similarities) in
the series' colours (:mod:`.style`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from introspection_utils.core.results import concept_rows
from introspection_utils.engine.vectors import cosine_similarity_matrix
from introspection_utils.plotting.style import (
    LENS_XLABEL,
    LENS_YLABEL,
    PALETTE,
    RANDOM_ALPHA,
    finish_axes,
    new_axes,
    only_value,
    plot_grid,
    scale_label,
)
from introspection_utils.stats import definitions

if TYPE_CHECKING:
    from introspection_utils.engine.vectors import VectorBank
    from introspection_utils.experiments.attention import AttentionMaps


def _draw_conditions(ax: plt.Axes, df: pd.DataFrame, x: str, *, show_controls: bool, show_random: bool,
                     show_baselines: bool, y: str = "logit_diff", baseline: str = "baseline_logit_diff") -> None:
    """Introspection, control questions (each + mean ± std), random vectors and baselines of one concept's rows
    ``df`` against ``x`` (the curves of :func:`definitions.curve_table`)."""
    concept = str(df["concept"].iloc[0])
    c = definitions.curve_table(df, concept, x=x, y=y, baseline=baseline)
    if show_random:
        for k, r in enumerate(definitions.random_curves(df, concept, x=x, y=y).values()):
            ax.plot(r.index, r["introspection"], color=PALETTE["random"], alpha=RANDOM_ALPHA, lw=1.6,
                    label="random vector: introspection" if k == 0 else None)
            if "control" in r:
                ax.plot(r.index, r["control"], color=PALETTE["random"], alpha=RANDOM_ALPHA, lw=1.6, ls="--",
                        label="random vector: control mean" if k == 0 else None)
    n_controls = int(c["n_controls"].max()) if c["n_controls"].notna().any() else 0
    if show_controls and n_controls:
        controls = definitions.question_table(df, concept, x=x, y=y)
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



def plot_scale_sweep(df: pd.DataFrame, concept: str, *, layer: int | None = None, ax: plt.Axes | None = None,
                     show_controls: bool = True, show_random: bool = True, mark: tuple[float, float] | None = None,
                     mark_label: str = "current trial") -> plt.Figure:
    """Yes−no logit difference vs scale for ``concept`` at ``layer`` (a :func:`sweeps.scale_sweep` table).

    Introspection solid; each control question thin; control mean with a ±1 std band; no-injection baselines as
    horizontal lines; random vectors translucent. ``mark=(scale, value)`` marks one point (the explorer's).
    """
    sub, layer = only_value(concept_rows(df, concept), "layer", layer, "layer")
    fig, ax = new_axes(ax)
    _draw_conditions(ax, sub, "scale", show_controls=show_controls, show_random=show_random, show_baselines=True)
    if mark is not None:
        ax.plot([mark[0]], [mark[1]], marker="*", ms=16, color="black", ls="none", label=mark_label, zorder=5)
    norm = float(sub.loc[sub["vector_kind"] == "concept", "vector_norm"].iloc[0])
    finish_axes(ax, f"{sub['model'].iloc[0]} · concept '{concept}' · layer {layer}\nscale sweep", scale_label(norm))
    return fig



def plot_layer_sweep(df: pd.DataFrame, concept: str, *, scale: float | None = None, ax: plt.Axes | None = None,
                     show_controls: bool = True, show_random: bool = True) -> plt.Figure:
    """Yes−no logit difference vs injection layer at one ``scale`` (a :func:`sweeps.layer_sweep` table)."""
    sub, scale = only_value(concept_rows(df, concept), "scale", scale, "scale")
    fig, ax = new_axes(ax)
    _draw_conditions(ax, sub, "layer", show_controls=show_controls, show_random=show_random, show_baselines=True)
    layers = sorted(sub["layer"].unique())
    finish_axes(ax, f"{sub['model'].iloc[0]} · concept '{concept}' · layers {layers[0]}–{layers[-1]}\n"
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
    fig, ax = new_axes(ax)
    _draw_conditions(ax, sub, "lens_layer", show_controls=False, show_random=show_random, show_baselines=False,
                     y="lens_diff", baseline="baseline_lens_diff")
    c = definitions.curve_table(sub, concept, x="lens_layer", y="lens_diff", baseline="baseline_lens_diff")
    for kind, ls in (("introspection", "--"), ("control", ":")):
        base = c[f"{kind}_baseline"].dropna()
        if len(base):
            label = "no injection: introspection" if kind == "introspection" else "no injection: control mean"
            ax.plot(base.index, base.values, color=PALETTE["baseline"], ls=ls, lw=1.3, label=label)
    ax.axvline(layer, color="black", ls="-.", lw=0.9, alpha=0.7, label=f"injection layer {layer}")
    finish_axes(ax, f"{sub['model'].iloc[0]} · concept '{concept}' · injected at layer {layer}\n"
                    f"logit lens at the answer position, scale {scale:g} (× raw concept vector)",
                LENS_XLABEL, ylabel=LENS_YLABEL)
    return fig



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



def plot_vector_norms(bank: VectorBank, *, ax: plt.Axes | None = None) -> plt.Figure:
    """L2 norm of each concept vector at every layer (the scale of a sweep multiplies these raw vectors)."""
    norms = bank.norms().numpy()
    fig, ax = new_axes(ax)
    for word, row in zip(bank.words, norms, strict=True):
        ax.plot(np.arange(len(row)), row, marker="o", ms=3, lw=1.5, label=word)
    finish_axes(ax, f"{bank.model} · concepts {', '.join(bank.words)} · all layers\nconcept-vector norms "
                    f"(word − mean of baseline words)", "layer (decoder-layer index)",
                ylabel="‖v‖ (L2 norm, residual-stream units)")
    return fig



def plot_cosine_matrix(bank: VectorBank, layer: int, *, ax: plt.Axes | None = None) -> plt.Figure:
    """Cosine similarity between the bank's concept vectors at ``layer`` (a heatmap, values written in)."""
    sim = cosine_similarity_matrix(bank, layer).numpy()
    n = len(bank.words)
    fig, ax = new_axes(ax, size=(1.0 + 0.55 * n + 2, 0.55 * n + 2))
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



def sweep_panels(df: pd.DataFrame, concepts: Sequence[str], *, kind: str = "scale",
                 **kwargs: Any) -> plt.Figure:
    """One scale-sweep (``kind="scale"``) or layer-sweep (``kind="layer"``) panel per concept, side by side."""
    plot = {"scale": plot_scale_sweep, "layer": plot_layer_sweep}[kind]
    return plot_grid(lambda concept, ax, **kw: plot(df, concept, ax=ax, **kw), list(concepts), **kwargs)



def lens_panels(lens: pd.DataFrame, concepts: Sequence[str], **kwargs: Any) -> plt.Figure:
    """One logit-lens panel per concept, side by side."""
    return plot_grid(lambda concept, ax, **kw: plot_logit_lens(lens, concept, ax=ax, **kw), list(concepts),
                     **kwargs)

