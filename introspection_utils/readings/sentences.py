"""The sentences a notebook prints under its figure, computed from its tables (never one that would read the same
whatever the numbers); the notebooks and :mod:`.saved` call them."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from introspection_utils.core.deprecation import renamed
from introspection_utils.engine.vectors import cosine_similarity_matrix
from introspection_utils.experiments.attention import CONTROL_INJ, INTRO_INJ, INTRO_NOINJ
from introspection_utils.stats import definitions, line_test, verdicts
from introspection_utils.stats.definitions import curve_table, mass_note
from introspection_utils.stats.shifts import (
    COMOVEMENT_R,
    MOST_POINTS,
    ablation_effect,
    below_baseline,
    curve_correlation,
    moves_together,
    shared_rise,
    specific,
    switch_back_scale,
)

if TYPE_CHECKING:
    from introspection_utils.experiments.attention import AttentionMaps


def curves(df: pd.DataFrame, concept: str, **kwargs) -> pd.DataFrame:
    """The introspection and control curves of one concept: :func:`definitions.curve_table`."""
    return curve_table(df, concept, **kwargs)


def _fmt(x: float) -> str:
    return f"{x:g}"


def _none_if_nan(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def sweep_flip_scale(df: pd.DataFrame, concept: str, *, layer: int | None = None,
               question_kind: str = "introspection") -> float | None:
    """The :func:`~definitions.flip_scale`
    of the introspection curve (or ``question_kind="control"``: the control
    mean) of ``concept``; ``None`` when it never flips or already leans "yes" without injection."""
    c = curves(df, concept, layer=layer)
    column, base = (("introspection", "introspection_baseline") if question_kind == "introspection" else
                    ("control_mean", "control_baseline"))
    return _none_if_nan(definitions.flip_scale(c.index, c[column], float(c[base].iloc[0])))


def _flip_words(flip: str, at: float, mass: float) -> str:
    """``"<flip> at scale s"``, or, where the answer mass is low, that it is yes over no and not a flip."""
    if np.isnan(mass) or mass >= definitions.MIN_ANSWER_MASS:
        return f"{flip} at scale {_fmt(at)}"
    return (f"{flip.replace('flips to yes', 'puts yes over no').replace('crosses zero to yes', 'puts yes over no')} "
            f"at scale {_fmt(at)}, but its answer mass there is {mass:.2f}: not a flip of the model's answer")


def _residual_words(row: pd.Series) -> str:
    """``line residual … (the wordings moved … where the controls' line predicts …)`` at one row of :func:`curves`
    (descriptive: the verdict's I is the null-learned score, :mod:`introspection_utils.stats.introspection_score`)."""
    moved = row["introspection"] - row["introspection_baseline"]
    predicted = row["predicted"] - row["introspection_baseline"]
    fit = (f"b = {row['push']:+.2f}, c = {row['slope']:+.2f}" if row["fit_ok"] else
           "the controls' fit is degenerate: too few controls or too little spread in their baselines")
    return (f"line residual {row['residual']:+.2f}: the introspection answer moved {moved:+.2f} where the controls' "
            f"line predicts {predicted:+.2f} at its own baseline ({fit})")


def choose_scale(df: pd.DataFrame, concept: str, *, layer: int | None = None) -> tuple[float, str]:
    """The scale to probe ``concept`` at — its peak scale (:func:`line_test.peak_scale`: where the residual beyond
    the controls' line is largest) — and a sentence saying what happens there: that residual against the line,
    whether each curve has flipped to "yes", and the answer mass."""
    c = curves(df, concept, layer=layer)
    scale = line_test.peak_scale(df, concept, layer=layer)
    row = c.loc[scale]
    flips = []
    for name, column, base in (("introspection answer", "introspection", "introspection_baseline"),
                               ("control mean", "control_mean", "control_baseline")):
        at = definitions.flip_scale(c.index, c[column], float(c[base].iloc[0]))
        if c[base].iloc[0] > 0:
            flips.append(f"the {name} already leans yes without injection ({c[base].iloc[0]:+.2f})")
        elif np.isnan(at):
            flips.append(f"the {name} never flips to yes")
        else:
            flips.append(_flip_words(f"the {name} flips to yes", at, c.loc[at, f"{column.split('_')[0]}_mass"]))
    return scale, (f"{concept}: the residual beyond the controls' line is largest at scale {_fmt(scale)} ("
                   f"{_residual_words(row)}; introspection {row['introspection']:+.2f}, control mean "
                   f"{row['control_mean']:+.2f}); {flips[0]}, {flips[1]}{mass_note(row['introspection_mass'])}"
                   f"; using scale {_fmt(scale)}.")


def describe_scale_sweep(df: pd.DataFrame, concept: str, *, layer: int | None = None) -> str:
    """Sentences on one concept's scale sweep: baselines and answer mass, where each curve flips to yes, the largest
    residual beyond the controls' line beside the contrast S, the concept vector against the random ones, and the
    verdict's test (:func:`verdicts.describe_test`)."""
    c = curves(df, concept, layer=layer)
    layer = int(definitions.select(df, concept)["layer"].iloc[0]) if layer is None else layer
    ib, cb = c["introspection_baseline"].iloc[0], c["control_baseline"].iloc[0]
    parts = [f"{concept} (layer {layer}): without injection, introspection {ib:+.2f} and control mean {cb:+.2f}."]

    def crossing(name: str, column: str, base: float) -> str:
        at = definitions.flip_scale(c.index, c[column], base)
        if base > 0:
            return f"the {name} already leans yes without injection"
        if np.isnan(at):
            series = c.loc[c.index > 0, column]
            return f"the {name} never crosses to yes (max {series.max():+.2f} at scale {_fmt(series.idxmax())})"
        return _flip_words(f"the {name} crosses zero to yes", at, c.loc[at, f"{column.split('_')[0]}_mass"])

    parts.append(f"{crossing('introspection curve', 'introspection', ib).capitalize()}; "
                 f"{crossing('control mean', 'control_mean', cb)}.")
    peak = line_test.peak_scale(df, concept, layer=layer)
    injected = c.loc[c.index != 0, "shift"]
    parts.append(f"Largest residual beyond the controls' line (the wordings' Δ beyond what the line predicts at their "
                 f"baselines) over injected scales: at scale {_fmt(peak)}, {_residual_words(c.loc[peak])}"
                 f"{mass_note(c.loc[peak, 'introspection_mass'])}; the contrast S (introspection Δ − "
                 f"control-mean Δ) peaks at S = {injected.max():+.2f} (scale {_fmt(injected.idxmax())}).")
    if c["random_introspection"].notna().any():
        top = float(c.index.max())
        mc = abs(c.loc[top, "introspection"] - ib)
        mr = abs(c.loc[top, "random_introspection"] - ib)
        rel = "more" if mc > mr else "less"
        parts.append(f"At scale {_fmt(top)} the concept vector moves the introspection answer by {mc:.2f}, a random "
                     f"vector of the same norm by {mr:.2f} (the concept vector moves it {rel}).")
    parts.append(verdicts.describe_test(df, concept, layer=layer))
    return " ".join(parts)


def describe_layer_sweep(df: pd.DataFrame, concept: str, *, scale: float | None = None) -> str:
    """Sentences on one concept's layer sweep: where each curve peaks, which layers give yes, and the layer with the
    largest residual beyond the controls' line (with S there)."""
    c = curves(df, concept, x="layer", scale=scale)
    scale = float(definitions.select(df, concept)["scale"].iloc[0]) if scale is None else scale
    best = c["residual"].idxmax()
    intro_yes = [int(i) for i in c.index[c["introspection"] > 0]]
    control_yes = [int(i) for i in c.index[c["control_mean"] > 0]]
    return (f"{concept} (scale {_fmt(scale)}): the introspection answer peaks at layer "
            f"{int(c['introspection'].idxmax())} "
            f"({c['introspection'].max():+.2f}), the control mean at layer {int(c['control_mean'].idxmax())} "
            f"({c['control_mean'].max():+.2f}). Layers where introspection leans yes: {intro_yes or 'none'}; "
            f"control mean: {control_yes or 'none'}. Largest residual beyond the controls' line at layer {int(best)}: "
            f"{_residual_words(c.loc[best])} (S there {c.loc[best, 'shift']:+.2f})"
            f"{mass_note(c.loc[best, 'introspection_mass'])}.")


def describe_lens(lens: pd.DataFrame, concept: str) -> str:
    """Sentences on one concept's logit lens: the final-layer shift of introspection and control (concept vs random)
    and the read-out layer where the contrast S (introspection Δ − control-mean Δ,
    :func:`definitions.curve_table`) is
    largest — where in depth the two questions part, a description, not the verdict."""
    sub = definitions.select(lens, concept)
    sub = sub.assign(shift=sub["lens_diff"] - sub["baseline_lens_diff"])
    last = int(sub["lens_layer"].max())
    inj = int(sub["layer"].iloc[0])
    shift = sub.groupby(["vector_kind", "question_kind", "lens_layer"])["shift"].mean()
    intro, control = shift.loc[("concept", "introspection")], shift.loc[("concept", "control")]
    gap = curve_table(lens, concept, x="lens_layer", y="lens_diff", baseline="baseline_lens_diff")[
        "shift"].loc[inj:]
    text = (f"{concept} (injected at layer {inj}, scale {_fmt(float(sub['scale'].iloc[0]))}): at the last layer the "
            f"injection shifts introspection by {intro.loc[last]:+.2f} and the control mean by "
            f"{control.loc[last]:+.2f}; the introspection−control gap is largest at read-out layer "
            f"{int(gap.idxmax())} ({gap.max():+.2f}).")
    if ("random", "introspection") in shift.index.droplevel(2):
        r_intro = shift.loc[("random", "introspection")]
        ratio = abs(intro.loc[last]) / max(abs(r_intro.loc[last]), 1e-9)
        text += (f" A random vector of the same norm shifts introspection by {r_intro.loc[last]:+.2f} at the last "
                 f"layer: the concept vector's effect is {ratio:.2g}× the random one's.")
    if "answer_mass" in sub.columns:
        mass = sub[(sub["vector_kind"] == "concept") & (sub["question_kind"] == "introspection")]["answer_mass"].mean()
        text += f" Answer mass P(yes)+P(no) of the injected introspection answer: {mass:.2f}{mass_note(mass)}."
    return text


# ----------------------------------------------------------------------------------------------------- attention

def attention_top_heads(maps: AttentionMaps, k: int = 10) -> pd.DataFrame:
    """The ``k`` (layer, head) pairs whose attention to the injected positions rises most from the uninjected to the
    injected introspection trial, with every condition's value and the introspection−control difference."""
    n_layers, n_heads = maps.maps[INTRO_INJ].shape
    layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
    effects = maps.injection_effects()
    table = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(),
                          "introspection_injected": maps.maps[INTRO_INJ].ravel(),
                          "introspection_no_injection": maps.maps[INTRO_NOINJ].ravel(),
                          "control_injected": maps.maps[CONTROL_INJ].ravel(),
                          "control_no_injection": maps.control_no_injection.ravel(),
                          "rise_vs_no_injection": effects["introspection"].ravel(),
                          "control_rise": effects["control"].ravel()})
    table["introspection_minus_control"] = specific(table["rise_vs_no_injection"], table["control_rise"])
    return table.sort_values("rise_vs_no_injection", ascending=False).head(k).reset_index(drop=True)


def head_pairs(table: pd.DataFrame, k: int) -> list[tuple[int, int]]:
    """The first ``k`` ``(layer, head)`` pairs of a head table such as :func:`attention_top_heads`, in its order —
    the form :func:`introspection_utils.experiments.patching.head_ablation` takes."""
    return [(int(r.layer), int(r.head)) for r in table.head(k).itertuples()]


def describe_attention(maps: AttentionMaps, k: int = 3) -> str:
    """Sentences on the attention maps: the heads that rise most with injection, and whether they rise as much on
    the control questions (the write-up found the pattern similar in both)."""
    effect = maps.injection_effects()["introspection"]
    below = float(np.abs(effect[: maps.layer + 1]).max())  # added to layer L's output: attention moves from L + 1
    return (f"{maps.concept} at scale {_fmt(maps.scale)}: " + describe_top_heads(attention_top_heads(maps, k))
            + f" Largest change at or below the injection layer {maps.layer}: {below:.1e} (the vector is added to "
              f"its output, so no attention there can see it).")


def describe_top_heads(top: pd.DataFrame) -> str:
    """Sentences on an :func:`attention_top_heads` table (also as saved by notebook 05): the heads that rise most,
    and how many rise at least half as much on the control questions (shared) — the write-up's "similar in both
    cases"."""
    k = len(top)
    heads = ", ".join(f"L{r.layer}H{r.head} (+{r.rise_vs_no_injection:.3f})" for r in top.itertuples())
    similar = int(shared_rise(top["rise_vs_no_injection"], top["control_rise"]).sum())
    return (f"the heads whose attention from the answer to the injected positions rises most with injection are "
            f"{heads}. On the control questions the same injection raises {similar} of these {k} heads by at least "
            f"half as much (shared), {k - similar} by less (specific to the introspection question).")


# ----------------------------------------------------------------------------------------- semantic interference

def describe_below_baseline(df: pd.DataFrame, concept: str, *, x: str = "scale", **kwargs) -> str:
    """The write-up's "bomb" reading checked: is the introspection answer below its baseline under injection?"""
    b = below_baseline(df, concept, x=x, **kwargs)
    verdict = ("below its baseline at most points" if b["fraction"] > MOST_POINTS else
               "not below its baseline at most points")
    text = (f"{concept} ({x} sweep): the introspection answer is below its no-injection baseline at "
            f"{b['fraction']:.0%} of {b['n']} injected {x}s (mean delta {b['mean_delta']:+.2f}, lowest "
            f"{b['min_delta']:+.2f} at {x} {_fmt(b['argmin'])}) — {verdict}")
    if not np.isnan(b["random_fraction"]):
        text += (f"; random vectors of the same norm: {b['random_fraction']:.0%} below, mean delta "
                 f"{b['random_mean_delta']:+.2f}")
    return text + "."


def describe_comovement(df: pd.DataFrame, concept: str, *, x: str = "scale", **kwargs) -> str:
    """The write-up's "confusion" reading checked: do introspection and control move together?"""
    r = curve_correlation(df, concept, x=x, **kwargs)
    c = curves(df, concept, x=x, **kwargs)
    di = c["introspection"].iloc[-1] - c["introspection"].iloc[0]
    dc = c["control_mean"].iloc[-1] - c["control_mean"].iloc[0]
    together = "move together" if moves_together(r, di, dc) else "do not clearly move together"
    return (f"{concept} ({x} sweep): correlation of the introspection and control-mean curves r = {r:+.2f}; from the "
            f"first to the last {x} introspection changes by {di:+.2f} and the control mean by {dc:+.2f} — the two "
            f"{together} (threshold r > {COMOVEMENT_R:g} and same direction).")


# ------------------------------------------------------------------------------------------------ single trials

def describe_readout(readout, labels: list[str]) -> str:
    """One line per trial of an :class:`measure.Readout`: yes−no, the no-injection baseline, the delta."""
    lines = []
    for label, diff, base in zip(labels, readout.logit_diff.tolist(), readout.baseline.tolist(), strict=True):
        answer = "yes" if diff > 0 else "no"
        lines.append(f"{label}: yes−no {diff:+.2f} (leans {answer}); without injection {base:+.2f}; "
                     f"delta {diff - base:+.2f}")
    return "\n".join(lines)


def describe_vectors(bank, layer: int) -> str:
    """Sentences on a concept-vector bank: how the norms grow with depth, and the most and least similar pairs at
    ``layer`` (cosine similarity)."""
    norms = bank.norms().numpy()
    mean = norms.mean(axis=0)
    text = (f"Mean concept-vector norm {mean[0]:.3g} at layer 0, {mean[layer]:.3g} at layer {layer}, "
            f"{mean[-1]:.3g} at layer {len(mean) - 1} (largest at layer {int(mean.argmax())}); at layer {layer} the "
            f"largest is {bank.words[int(norms[:, layer].argmax())]} ({norms[:, layer].max():.3g}), the smallest "
            f"{bank.words[int(norms[:, layer].argmin())]} ({norms[:, layer].min():.3g}).")
    if len(bank.words) > 1:
        sim = cosine_similarity_matrix(bank, layer).numpy()
        i, j = np.triu_indices(len(bank.words), k=1)
        hi, lo = int(sim[i, j].argmax()), int(sim[i, j].argmin())
        text += (f" Most similar pair at layer {layer}: {bank.words[i[hi]]}–{bank.words[j[hi]]} "
                 f"(cosine {sim[i[hi], j[hi]]:+.2f}); least similar: {bank.words[i[lo]]}–{bank.words[j[lo]]} "
                 f"({sim[i[lo], j[lo]]:+.2f}); mean off-diagonal {sim[i, j].mean():+.2f}.")
    return text


def time_call(fn, *args, **kwargs) -> tuple[object, float]:
    """``(fn(*args, **kwargs), seconds)`` — for the notebooks' cache-reuse timing."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ refusal ablation

def choose_switch_scale(df: pd.DataFrame, concept: str, *, layer: int | None = None) -> tuple[float, str]:
    """The scale at which to read the logit lens where the introspection answer switches back (see
    :func:`switch_back_scale`), and a sentence saying how it was chosen. Stated fallback when it never switches
    back: the scale after the maximum with the lowest introspection value (the largest drop), or the largest scale
    when the maximum is at the largest scale."""
    c = curves(df, concept, layer=layer)
    intro, base = c["introspection"], float(c["introspection_baseline"].iloc[0])
    injected = intro[intro.index > 0]
    peak, top = float(injected.idxmax()), float(injected.max())
    switch = switch_back_scale(intro, base)
    head = f"{concept}: the introspection curve peaks at scale {_fmt(peak)} ({top:+.2f}; no injection {base:+.2f})"
    if switch is not None:
        target = "zero (the answer switches back to no)" if top > 0 else f"its no-injection baseline ({base:+.2f})"
        return switch, f"{head} and drops below {target} at scale {_fmt(switch)} ({intro.loc[switch]:+.2f}); " \
                       f"using scale {_fmt(switch)}."
    after = injected[injected.index > peak]
    if top <= 0 and top <= base:
        why = "it never rises above zero or its no-injection baseline, so nothing switches back"
    else:
        why = (f"it never drops back below {'zero' if top > 0 else 'its baseline'} after the peak"
               if len(after) else "the peak is at the largest scale")
    fallback = float(after.idxmin()) if len(after) else float(injected.index.max())
    rule = ("the scale after the peak with the lowest introspection value" if len(after) else "the largest scale")
    return fallback, f"{head}; {why}; fallback: {rule}, {_fmt(fallback)} ({intro.loc[fallback]:+.2f})."


def describe_refusal_ablation(plain: pd.DataFrame, ablated: pd.DataFrame, concept: str, *, from_scale: float = 0.0,
                      layer: int | None = None) -> str:
    """Sentences on :func:`ablation_effect`: how ablating the refusal direction moves the introspection curve and
    the control mean at high scales, and whether the answer still switches back to no."""
    e = ablation_effect(plain, ablated, concept, from_scale=from_scale, layer=layer)
    verb = "raises" if e["introspection"] > 0 else "lowers"
    text = (f"{concept}: ablating the refusal direction {verb} the introspection curve at scales ≥ {_fmt(from_scale)} "
            f"by {abs(e['introspection']):.2f} logits on average ({e['n']} scale(s)); the control mean moves by "
            f"{e['control']:+.2f}. Without injection the ablation moves the introspection answer by "
            f"{e['baseline']:+.2f}, so measured from each run's own baseline the change is "
            f"{e['introspection_delta']:+.2f}.")
    def switch_text(df: pd.DataFrame, at: float | None) -> str:
        if at is not None:
            return f"switches back at scale {_fmt(at)}"
        c = curves(df, concept, layer=layer)
        top, base = c.loc[c.index > 0, "introspection"].max(), c["introspection_baseline"].iloc[0]
        if top <= 0 and top <= base:
            return "never rises above zero or its baseline (nothing to switch back from)"
        return "does not drop back after its peak"

    return text + (f" Without ablation the introspection answer {switch_text(plain, e['switch_plain'])}; with "
                   f"ablation it {switch_text(ablated, e['switch_ablated'])}.")


def describe_lens_ablation(plain: pd.DataFrame, ablated: pd.DataFrame, concept: str) -> str:
    """Sentences comparing two logit-lens tables (:func:`logit_lens.lens_profile`, without and with ablation) of one
    concept: the last-layer read-outs and the read-out layer where the ablation changes the introspection answer
    most."""
    def lines(lens):
        sub = definitions.select(lens, concept)
        sub = sub[sub["vector_kind"] == "concept"]
        mean = sub.groupby(["question_kind", "lens_layer"])["lens_diff"].mean()
        return mean.loc["introspection"], mean.loc["control"], sub

    def baseline(sub):
        rows = sub[sub["question_kind"] == "introspection"]
        return rows.groupby("lens_layer")["baseline_lens_diff"].mean()

    pi, pc, sub = lines(plain)
    ai, ac, sub_ablated = lines(ablated)
    last, inj = int(pi.index.max()), int(sub["layer"].iloc[0])
    change = (ai - pi).loc[inj:]  # from the injection layer on, where the injected and plain lenses differ
    base_change = (baseline(sub_ablated) - baseline(sub)).loc[inj:]
    k = int(change.abs().idxmax())
    return (f"{concept} (injected at layer {inj}, scale {_fmt(float(sub['scale'].iloc[0]))}): at the last layer the "
            f"introspection lens reads {pi.loc[last]:+.2f} without ablation and {ai.loc[last]:+.2f} with it; the "
            f"control mean {pc.loc[last]:+.2f} → {ac.loc[last]:+.2f}. From the injection layer on, the ablation "
            f"changes the injected introspection read-out most at layer {k} ({change.loc[k]:+.2f}); at that layer it "
            f"changes the same question without injection by {base_change.loc[k]:+.2f}.")


def describe_refusal_layers(table: pd.DataFrame, best: int) -> str:
    """Sentences on the refusal direction's layer table: the layer used, its held-out d, the best eligible layer
    and the overall maximum."""
    rows = table.set_index("layer")
    eligible = table[table["eligible"]]
    chosen = int(eligible.loc[eligible["heldout_d"].idxmax(), "layer"])
    top = int(table.loc[table["heldout_d"].idxmax(), "layer"])
    d, norm = rows.loc[best, "heldout_d"], rows.loc[best, "norm"]
    if best == chosen:
        text = (f"Refusal direction: among the eligible layers {int(eligible['layer'].min())}–"
                f"{int(eligible['layer'].max())} the largest held-out separation is at layer {best} (Cohen's d = "
                f"{d:.2f}, direction norm {norm:.3g}); ")
    else:
        text = (f"Refusal direction: layer {best} was given (Cohen's d = {d:.2f}, norm {norm:.3g}); the criterion "
                f"would choose layer {chosen} (d = {rows.loc[chosen, 'heldout_d']:.2f}); ")
    if top == chosen:
        return text + "it is also the largest over all layers."
    return text + f"over all layers the largest is at layer {top} (d = {rows.loc[top, 'heldout_d']:.2f})."


# the old names, one release
__getattr__ = renamed(__name__, globals(), {"flip_scale": "sweep_flip_scale", "top_heads": "attention_top_heads",
                                            "describe_ablation": "describe_refusal_ablation"})
