"""Descriptive statistics of the curves that the readings quote, each defined once, with the rules' thresholds as
named constants: below-baseline, co-movement, the logit lens's layer-by-layer similarity, the
switch-back scale, a direction's ablation effect, and the introspection − control contrast at one point (S's form
for a single scale, site or head: what patching calls ``specific`` and attribution ``did``).

Pure table code on the curves of :func:`introspection_utils.stats.definitions.curve_table`; the sentences
that word
these numbers are in :mod:`introspection_utils.readings.sentences`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from introspection_utils.stats.definitions import curve_table, select

COMOVEMENT_R = 0.7  # introspection and control curves "move together": correlation above this, same direction
SHARED_FRACTION = 0.5  # a control rise at least this fraction of the introspection rise counts as shared
MOST_POINTS = 0.5  # "below its baseline at most points": below at more than this fraction of the injected points


def specific(introspection, control):
    """The introspection − control contrast at one point (a scale, a site, a head): the introspection value minus
    the controls' mean — S's form (weights 1/m on the wordings, −1/n on the controls;
    :func:`definitions.statistic_weights`
    with ``"S"``) when both are Δ's or effects. Works elementwise on numbers, arrays and Series."""
    return introspection - control


def question_contrast(df: pd.DataFrame, value: str, by: Sequence[str], *, sort: bool = True) -> pd.DataFrame:
    """Per group ``by``: the mean of ``value`` over the introspection rows (``question_kind == "introspection"``),
    over the other (control) rows, and :func:`specific` of the two. Columns ``introspection``, ``control``,
    ``specific``, indexed by ``by``."""
    by = list(by)
    intro = df[df["question_kind"] == "introspection"].groupby(by, dropna=False, sort=sort)[value].mean()
    control = df[df["question_kind"] != "introspection"].groupby(by, dropna=False, sort=sort)[value].mean()
    table = pd.DataFrame({"introspection": intro, "control": control})
    table["specific"] = specific(table["introspection"], table["control"])
    return table


def moves_together(r: float, introspection_change: float, control_change: float) -> bool:
    """The "confusion" rule: the two curves move together when they correlate above :data:`COMOVEMENT_R` and change
    in the same direction from the first to the last point."""
    return bool(r > COMOVEMENT_R and np.sign(introspection_change) == np.sign(control_change))


def shared_rise(introspection_rise, control_rise):
    """Whether a control rise is at least :data:`SHARED_FRACTION` of the introspection rise (elementwise)."""
    return control_rise >= SHARED_FRACTION * introspection_rise


def below_baseline(df: pd.DataFrame, concept: str, *, x: str = "scale", layer: int | None = None,
                   scale: float | None = None) -> dict:
    """How far the injected introspection answer sits below its no-injection baseline across ``x`` (injected points
    only): ``fraction`` of points below, ``mean_delta``, ``min_delta`` and where, and the same for the random
    vectors (``random_fraction``, ``random_mean_delta``)."""
    c = curve_table(df, concept, x=x, layer=layer, scale=scale)
    if x == "scale":
        c = c[c.index > 0]
    delta = c["introspection"] - c["introspection_baseline"]
    r = c["random_introspection"] - c["introspection_baseline"]
    return {"fraction": float((delta < 0).mean()), "mean_delta": float(delta.mean()),
            "min_delta": float(delta.min()), "argmin": float(delta.idxmin()),
            "random_fraction": float((r < 0).mean()) if r.notna().any() else float("nan"),
            "random_mean_delta": float(r.mean()) if r.notna().any() else float("nan"), "n": int(len(delta))}


def curve_correlation(df: pd.DataFrame, concept: str, *, x: str = "scale", **kwargs) -> float:
    """Pearson correlation between the introspection curve and the control-mean curve across ``x`` (concept
    vector): near 1 = the two move together (the write-up's "confusion" reading)."""
    c = curve_table(df, concept, x=x, **kwargs)
    if len(c) < 3:
        raise ValueError(f"a correlation needs at least 3 {x}s, got {len(c)}")
    return float(np.corrcoef(c["introspection"], c["control_mean"])[0, 1])


def lens_similarity(lens: pd.DataFrame, concept: str) -> float:
    """Pearson correlation between the introspection and control-mean lens shifts (injected − uninjected) across
    read-out layers from the injection layer on: near 1 = the two questions move alike layer by layer."""
    sub = select(lens, concept)
    sub = sub[(sub["vector_kind"] == "concept") & (sub["lens_layer"] >= sub["layer"])]
    shift = (sub["lens_diff"] - sub["baseline_lens_diff"]).groupby([sub["question_kind"], sub["lens_layer"]]).mean()
    return float(np.corrcoef(shift.loc["introspection"], shift.loc["control"])[0, 1])


def switch_back_scale(curve: pd.Series, baseline: float) -> float | None:
    """Where the introspection answer switches back at high scale: after the curve's maximum over injected scales
    (> 0), the first larger scale at which it drops below zero ("no") — when the maximum leaned "yes" (> 0) — or
    else below its no-injection ``baseline`` (when the maximum rose above the baseline without reaching "yes").
    ``None`` when the curve never rose above that threshold, or never drops back below it after its maximum.

    ``curve``: the introspection logit difference indexed by scale (e.g. ``curve_table(df, c)["introspection"]``)."""
    injected = curve[curve.index > 0].sort_index()
    if injected.empty:
        return None
    peak, top = injected.idxmax(), float(injected.max())
    threshold = 0.0 if top > 0 else float(baseline)
    if not top > threshold:
        return None
    after = injected[(injected.index > peak) & (injected < threshold)]
    return float(after.index[0]) if len(after) else None


def ablation_effect(plain: pd.DataFrame, ablated: pd.DataFrame, concept: str, *, from_scale: float = 0.0,
                    layer: int | None = None) -> dict:
    """What ablating a direction does to one concept's scale sweep, averaged over scales ≥ ``from_scale`` (and
    > 0): ``introspection`` and ``control`` (mean of ablated − plain logit differences), ``baseline`` (the change of
    the introspection no-injection baseline), ``introspection_delta`` (the change measured from each run's own
    baseline), ``n`` (scales averaged), and the switch-back scale of each run (``switch_plain``,
    ``switch_ablated``; ``None`` = none)."""
    p, a = curve_table(plain, concept, layer=layer), curve_table(ablated, concept, layer=layer)
    if list(p.index) != list(a.index):
        raise ValueError(f"the two sweeps have different scales ({list(p.index)} vs {list(a.index)})")
    keep = (p.index >= from_scale) & (p.index > 0)
    if not keep.any():
        raise ValueError(f"no injected scale >= {from_scale:g} in the sweeps ({list(p.index)})")
    di = float((a["introspection"] - p["introspection"])[keep].mean())
    db = float(a["introspection_baseline"].iloc[0] - p["introspection_baseline"].iloc[0])
    return {"introspection": di, "control": float((a["control_mean"] - p["control_mean"])[keep].mean()),
            "baseline": db, "introspection_delta": di - db, "n": int(keep.sum()),
            "switch_plain": switch_back_scale(p["introspection"], p["introspection_baseline"].iloc[0]),
            "switch_ablated": switch_back_scale(a["introspection"], a["introspection_baseline"].iloc[0])}
