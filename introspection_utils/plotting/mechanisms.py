"""Figures of notebook 12: where the introspection-specific "yes" is made — attribution, patching and their
agreement, one row per concept (inputs: :class:`introspection_utils.experiments.mechanisms.MechanismMaps`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np

from introspection_utils.experiments.attribution import difference_in_differences
from introspection_utils.plotting.style import PALETTE

if TYPE_CHECKING:
    from introspection_utils.experiments.mechanisms import MechanismMaps

KIND_COLORS = {"attn": "#009E73", "mlp": "#D55E00"}  # Okabe–Ito green / vermillion, distinct from the conditions


def plot_mechanism_maps(maps: Sequence[MechanismMaps]) -> plt.Figure:
    """One row per concept: (1) the difference-in-differences of direct logit attribution per layer, attention and
    MLP; (2) the same per head, layer × head; (3) real patching's introspection-specific effect per layer
    (introspection − control mean), sufficiency and necessity; (4) attribution patching against real patching."""
    fig, axes = plt.subplots(len(maps), 4, figsize=(21, 4.6 * len(maps)), squeeze=False)
    for row, m in zip(axes, maps, strict=True):
        _did_layers(row[0], m)
        _did_heads(fig, row[1], m)
        _patching_layers(row[2], m)
        _agreement(row[3], m)
    first = maps[0]
    fig.suptitle(f"{first.model} · injected at layer {first.layer} · {first.n_controls} control question(s) · "
                 f"where is the introspection-specific yes made? (difference-in-differences = introspection "
                 f"effect − control effect)", fontsize=11)
    fig.tight_layout()
    return fig


def _did_layers(ax: plt.Axes, m: MechanismMaps) -> None:
    table = difference_in_differences(m.attribution[m.attribution["component"].isin(["attn", "mlp"])])
    width = 0.42
    for k, kind in enumerate(("attn", "mlp")):
        part = table[table["component"] == kind].sort_values("comp_layer")
        ax.bar(part["comp_layer"].astype(int) + (k - 0.5) * width, part["did"], width, color=KIND_COLORS[kind],
               label=f"{kind} output")
    injection = m.did_layers[m.did_layers["comp_layer"] == m.layer]
    ax.axvline(m.layer, color=PALETTE["baseline"], ls="--", lw=1, label=f"injection (layer {m.layer})")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel("DiD of direct logit attribution\n(yes − no share, raw logits)")
    ax.set_title(f"'{m.concept}', scale {m.scale:g}: attribution per layer\n(layer {m.layer} total incl. the "
                 f"vector: {float(injection['did'].sum()):+.2f})", fontsize=9)
    ax.legend(fontsize=7)


def _did_heads(fig: plt.Figure, ax: plt.Axes, m: MechanismMaps) -> None:
    heads = m.did_heads
    n_layers, n_heads = int(heads["comp_layer"].max()) + 1, int(heads["head"].max()) + 1
    grid = np.zeros((n_layers, n_heads))
    grid[heads["comp_layer"].astype(int), heads["head"].astype(int)] = heads["did"]
    span = float(np.abs(grid).max()) or 1.0
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-span, vmax=span)
    ax.axhline(m.layer + 0.5, color="black", ls="--", lw=1)  # said in the title: a legend would cover heads
    fig.colorbar(im, ax=ax, label="DiD (raw logits)")
    ax.set_xlabel("attention head")
    ax.set_ylabel("layer")
    ax.set_title(f"'{m.concept}': attribution per head (red: pushes towards yes\non introspection only; dashed "
                 f"line: injected after layer {m.layer})", fontsize=9)


def _patching_layers(ax: plt.Axes, m: MechanismMaps) -> None:
    table = m.specific_patching()
    for kind in ("attn", "mlp"):
        for direction, style in (("sufficiency", "-"), ("necessity", "--")):
            part = table[(table["kind"] == kind) & (table["direction"] == direction)].sort_values("comp_layer")
            ax.plot(part["comp_layer"].astype(int), part["specific"], style, marker="o", ms=3,
                    color=KIND_COLORS[kind], label=f"{kind}, {direction}")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("layer of the patched output")
    ax.set_ylabel("patching effect, introspection − control mean\n(yes − no logits)")
    ax.set_title(f"'{m.concept}': activation patching at the answer position\n(sufficiency: injected → "
                 f"uninjected; necessity: uninjected → injected)", fontsize=9)
    ax.legend(fontsize=7)


def _agreement(ax: plt.Axes, m: MechanismMaps) -> None:
    keys = ["question", "concept", "scale", "direction", "span", "site"]
    both = m.patched.merge(m.estimated[[*keys, "estimate"]], on=keys)
    for kind in ("attn", "mlp", "head"):
        part = both[both["kind"] == kind]
        if len(part):
            ax.scatter(part["effect"], part["estimate"], s=12, color=KIND_COLORS.get(kind, PALETTE["random"]),
                       label=kind, alpha=0.8)
    lo = float(min(both["effect"].min(), both["estimate"].min()))
    hi = float(max(both["effect"].max(), both["estimate"].max()))
    ax.plot([lo, hi], [lo, hi], color=PALETTE["baseline"], lw=0.8, ls=":", label="y = x")
    a = m.agreement
    ax.set_xlabel("activation patching effect (yes − no logits)")
    ax.set_ylabel("attribution patching estimate (logits)")
    ax.set_title(f"'{m.concept}': attribution vs real patching\nPearson r = {a['pearson']:.2f}, Spearman ρ = "
                 f"{a['spearman']:.2f}, n = {a['n']}", fontsize=9)
    ax.legend(fontsize=7)
