"""Separation metrics and the atlas: is a concept's "yes" introspection, or a generic shift towards "yes"?

Everything here works from the tidy sweep table of :mod:`introspection_utils.sweeps` (``sweeps.COLUMNS``): for one
concept at one layer, the introspection question's delta and each control question's delta (each relative to its
own no-injection baseline) across scales, for the concept vector and for k norm-matched random vectors.

Definitions (logit units are yes − no logit differences):

* **flip scale** of a question: the smallest measured scale > 0 at which the injection turns its answer to
  "yes": its logit difference (baseline + delta) is > 0 when its no-injection baseline says "no" (≤ 0); when the
  baseline already says "yes" (small models often do), the first scale where delta ≥ ``effect_threshold`` (a clear
  further move towards yes). NaN if neither happens within the scales measured. For the controls, the mean over
  control questions (of logit differences and of deltas) is used.
* **reference scale** s*: the introspection flip scale; if the introspection answer never flips, the scale of the
  largest |introspection delta| (where the injection does the most, up or down).
* **separation score** S = Δ_intro(s*) − mean_q Δ_control,q(s*): how much more the injection moves the
  introspection question than the control questions, at the scale where it first makes the model say yes.
* **scale gap** = control flip scale − introspection flip scale (inf: the controls never flip; NaN: the
  introspection never flips).
* **null**: the same score for each random vector (its own s*), the distribution a concept must beat;
  **excess** = S − mean of the random vectors' scores.
* **bootstrap CI** (percentile, ``level``): resample the control questions (the same draw for the concept and the
  random vectors) and the random vectors, with replacement, ``n_boot`` times from a seeded ``numpy`` Generator
  (seeded by ``seed``, the concept and the layer, so a concept's interval does not depend on the other concepts).

Classification, in this order, with I = Δ_intro(s*), C = mean control Δ(s*), thresholds as arguments:

1. ``"interference"``: I ≤ −``effect_threshold`` and C ≤ −``effect_threshold`` (both fall below baseline);
2. ``"no effect"``: at every scale |Δ_intro| < ``effect_threshold`` and |mean control Δ| < ``effect_threshold``;
3. ``"separated"``: S ≥ ``separation_threshold`` and the CI's lower bound of S > 0;
4. ``"bias shift"``: anything else (the injection moves the answers, the controls about as much).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from introspection_utils.sweeps import SweepResult, scale_sweep
from introspection_utils.vectors import default_layer

if TYPE_CHECKING:
    from introspection_utils.models import ModelHandle
    from introspection_utils.vectors import VectorBank

EFFECT_THRESHOLD = 1.0  # logits: a |delta| below this counts as "no change"
SEPARATION_THRESHOLD = 1.0  # logits: the introspection delta must exceed the control mean by this much
CONFIDENCE = 0.95
N_BOOT = 2000
CLASSES = ("separated", "bias shift", "no effect", "interference")
ATLAS_COLUMNS = ["model", "concept", "layer", "reference_scale", "introspection_delta", "control_delta",
                 "separation", "ci_low", "ci_high", "introspection_flip", "control_flip", "scale_gap",
                 "null_mean", "null_sd", "excess", "excess_ci_low", "excess_ci_high", "n_controls", "n_random",
                 "class"]


@dataclass(frozen=True)
class Curves:
    """One vector's curves at one layer: ``scales [S]`` (ascending), the introspection question's ``intro_delta``
    and ``intro_logit`` ``[S]``, and the control questions' ``control_delta`` / ``control_logit`` ``[Q, S]``."""

    scales: np.ndarray
    intro_delta: np.ndarray
    intro_logit: np.ndarray
    control_delta: np.ndarray
    control_logit: np.ndarray

    @classmethod
    def from_arrays(cls, scales: Sequence[float], intro_delta: Sequence[float],
                    control_delta: Sequence[Sequence[float]], *, intro_baseline: float = 0.0,
                    control_baselines: Sequence[float] | float = 0.0) -> Curves:
        """Build from deltas and no-injection baselines (logit = baseline + delta); for hand-made cases."""
        scales = np.asarray(scales, float)
        intro = np.asarray(intro_delta, float)
        controls = np.atleast_2d(np.asarray(control_delta, float))
        base = np.broadcast_to(np.asarray(control_baselines, float), (controls.shape[0],))[:, None]
        return cls(scales, intro, intro_baseline + intro, controls, base + controls)


def flip_scale(scales: np.ndarray, logit_diff: np.ndarray, delta: np.ndarray, *,
               effect_threshold: float = EFFECT_THRESHOLD) -> float:
    """The smallest scale > 0 at which the answer flips to "yes" (``logit_diff`` > 0 from a "no" baseline; from a
    "yes" baseline, ``delta`` ≥ ``effect_threshold``); NaN if none. Arrays ``[S]``, baseline = logit − delta."""
    scales, logit_diff, delta = (np.asarray(a, float) for a in (scales, logit_diff, delta))
    baseline = float(np.mean(logit_diff - delta))
    moved = logit_diff > 0 if baseline <= 0 else delta >= effect_threshold
    hits = (scales > 0) & moved
    return float(scales[hits].min()) if hits.any() else float("nan")


def intro_flip(c: Curves, *, effect_threshold: float = EFFECT_THRESHOLD) -> float:
    """The introspection question's flip scale (see :func:`flip_scale`)."""
    return flip_scale(c.scales, c.intro_logit, c.intro_delta, effect_threshold=effect_threshold)


def control_flip(c: Curves, *, effect_threshold: float = EFFECT_THRESHOLD) -> float:
    """The flip scale of the mean over control questions."""
    return flip_scale(c.scales, c.control_logit.mean(axis=0), c.control_delta.mean(axis=0),
                      effect_threshold=effect_threshold)


def reference_index(c: Curves, *, effect_threshold: float = EFFECT_THRESHOLD) -> int:
    """Index of the reference scale s*: the introspection flip scale, else the largest |introspection delta|."""
    flip = intro_flip(c, effect_threshold=effect_threshold)
    if not np.isnan(flip):
        return int(np.flatnonzero(c.scales == flip)[0])
    positive = np.flatnonzero(c.scales > 0)
    candidates = positive if len(positive) else np.arange(len(c.scales))
    return int(candidates[np.argmax(np.abs(c.intro_delta[candidates]))])


def separation(c: Curves, controls: np.ndarray | None = None, *, effect_threshold: float = EFFECT_THRESHOLD
               ) -> float:
    """S = Δ_intro(s*) − mean over control questions of Δ_control(s*) (``controls``: the question indices to
    average, with repeats for a bootstrap draw; default all)."""
    i = reference_index(c, effect_threshold=effect_threshold)
    rows = c.control_delta[:, i] if controls is None else c.control_delta[np.asarray(controls), i]
    return float(c.intro_delta[i] - rows.mean())


def scale_gap(c: Curves, *, effect_threshold: float = EFFECT_THRESHOLD) -> float:
    """Control flip scale − introspection flip scale (inf if the controls never flip, NaN if the introspection
    never does)."""
    intro = intro_flip(c, effect_threshold=effect_threshold)
    control = control_flip(c, effect_threshold=effect_threshold)
    if np.isnan(intro):
        return float("nan")
    return float("inf") if np.isnan(control) else control - intro


def classify(c: Curves, ci_low: float, *, effect_threshold: float = EFFECT_THRESHOLD,
             separation_threshold: float = SEPARATION_THRESHOLD) -> str:
    """The class of ``c`` (see the module docstring for the rules and their order)."""
    i = reference_index(c, effect_threshold=effect_threshold)
    intro, control = c.intro_delta[i], c.control_delta[:, i].mean()
    mean_control = c.control_delta.mean(axis=0)
    if intro <= -effect_threshold and control <= -effect_threshold:
        return "interference"
    if np.all(np.abs(c.intro_delta) < effect_threshold) and np.all(np.abs(mean_control) < effect_threshold):
        return "no effect"
    if intro - control >= separation_threshold and ci_low > 0:
        return "separated"
    return "bias shift"


def bootstrap(concept: Curves, randoms: Sequence[Curves] = (), *, n_boot: int = N_BOOT,
              rng: np.random.Generator | int = 0, level: float = CONFIDENCE,
              effect_threshold: float = EFFECT_THRESHOLD) -> dict[str, float]:
    """Percentile intervals of the separation S and of the excess S − mean(random vectors' S).

    Each of ``n_boot`` draws resamples the control questions (one draw shared by the concept and every random
    vector, which were asked the same questions) and the random vectors, with replacement. Returns ``ci_low``,
    ``ci_high``, ``excess_ci_low``, ``excess_ci_high`` (the excess ones NaN without random vectors).
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    n_q = concept.control_delta.shape[0]
    for r in randoms:
        if r.control_delta.shape[0] != n_q:
            raise ValueError("the random vectors were asked a different number of control questions")
    q = rng.integers(0, n_q, size=(n_boot, n_q))  # [B, Q] control-question draws
    i = reference_index(concept, effect_threshold=effect_threshold)
    s = concept.intro_delta[i] - concept.control_delta[q, i].mean(axis=1)  # [B]
    alpha = (1 - level) / 2
    out = {"ci_low": float(np.quantile(s, alpha)), "ci_high": float(np.quantile(s, 1 - alpha)),
           "excess_ci_low": float("nan"), "excess_ci_high": float("nan")}
    if randoms:
        idx = [reference_index(r, effect_threshold=effect_threshold) for r in randoms]
        intro = np.array([r.intro_delta[j] for r, j in zip(randoms, idx, strict=True)])  # [R]
        ctrl = np.stack([r.control_delta[:, j] for r, j in zip(randoms, idx, strict=True)])  # [R, Q]
        null = intro[None, :] - ctrl[:, q].mean(axis=2).T  # [B, R]: each random vector's S under draw b
        pick = rng.integers(0, len(randoms), size=(n_boot, len(randoms)))  # [B, R] random-vector draws
        excess = s - np.take_along_axis(null, pick, axis=1).mean(axis=1)
        out["excess_ci_low"] = float(np.quantile(excess, alpha))
        out["excess_ci_high"] = float(np.quantile(excess, 1 - alpha))
    return out


def concept_rng(seed: int, concept: str, layer: int) -> np.random.Generator:
    """The bootstrap Generator of one (concept, layer): depends on nothing else in the table."""
    return np.random.default_rng([int(seed), zlib.crc32(concept.encode()), int(layer)])


def curves_from_df(df: pd.DataFrame) -> dict[tuple[str, int, str, int | None], Curves]:
    """Split a sweep table into :class:`Curves`, keyed by ``(concept, layer, vector_kind, vector_seed)``.

    Scale-0 rows are dropped (they are the baselines themselves); control questions are in a fixed (sorted) order
    so the concept and its random vectors line up. A vector without the introspection question or without control
    questions is an error.
    """
    missing = {"concept", "vector_kind", "vector_seed", "layer", "scale", "question_kind", "question", "logit_diff",
               "delta"} - set(df.columns)
    if missing:
        raise ValueError(f"the table lacks columns {sorted(missing)}; pass a sweeps table (sweeps.COLUMNS)")
    out = {}
    keys = ["concept", "layer", "vector_kind", "vector_seed"]
    for key, group in df[df["scale"] != 0].groupby(keys, dropna=False, sort=True):
        concept, layer, kind, seed = key
        seed = None if pd.isna(seed) else int(seed)
        intro = group[group["question_kind"] == "introspection"].groupby("scale")[["delta", "logit_diff"]].mean()
        controls = group[group["question_kind"] == "control"]
        if intro.empty or controls.empty:
            raise ValueError(f"{concept!r} layer {layer} ({kind}): needs the introspection question and at least "
                             f"one control question")
        d = controls.pivot_table(index="question", columns="scale", values="delta").sort_index()
        lg = controls.pivot_table(index="question", columns="scale", values="logit_diff").sort_index()
        scales = intro.index.to_numpy(float)
        if list(d.columns) != list(scales) or d.isna().any().any():
            raise ValueError(f"{concept!r} layer {layer} ({kind}): the questions were measured at different scales")
        out[(concept, int(layer), kind, seed)] = Curves(scales, intro["delta"].to_numpy(float),
                                                        intro["logit_diff"].to_numpy(float), d.to_numpy(float),
                                                        lg.to_numpy(float))
    return out


def vector_scores(df: pd.DataFrame, *, effect_threshold: float = EFFECT_THRESHOLD) -> pd.DataFrame:
    """One row per vector (concept and random): ``concept, layer, vector_kind, vector_seed, reference_scale,
    introspection_delta, control_delta, separation, introspection_flip, control_flip, scale_gap``."""
    rows = []
    t = effect_threshold
    for (concept, layer, kind, seed), c in curves_from_df(df).items():
        i = reference_index(c, effect_threshold=t)
        rows.append({"concept": concept, "layer": layer, "vector_kind": kind, "vector_seed": seed,
                     "reference_scale": float(c.scales[i]), "introspection_delta": float(c.intro_delta[i]),
                     "control_delta": float(c.control_delta[:, i].mean()),
                     "separation": separation(c, effect_threshold=t),
                     "introspection_flip": intro_flip(c, effect_threshold=t),
                     "control_flip": control_flip(c, effect_threshold=t),
                     "scale_gap": scale_gap(c, effect_threshold=t)})
    out = pd.DataFrame(rows)
    if len(out):
        out["vector_seed"] = out["vector_seed"].astype("Int64")
    return out


def atlas(df: pd.DataFrame, *, effect_threshold: float = EFFECT_THRESHOLD,
          separation_threshold: float = SEPARATION_THRESHOLD, n_boot: int = N_BOOT, level: float = CONFIDENCE,
          seed: int = 0) -> pd.DataFrame:
    """The atlas: one row per (concept, layer) of a sweep table, sorted by separation (highest first).

    Columns :data:`ATLAS_COLUMNS`: the reference scale, the introspection and mean control deltas there, the
    separation with its bootstrap CI, both flip scales and their gap, the random vectors' scores (null mean and
    sd) and the excess over them with its CI, and the class (see the module docstring).
    """
    if effect_threshold <= 0 or separation_threshold <= 0:
        raise ValueError("the thresholds must be > 0 (logits)")
    if not 0 < level < 1:
        raise ValueError(f"level {level} must be in (0, 1)")
    curves = curves_from_df(df)
    model = str(df["model"].iloc[0]) if "model" in df.columns and len(df) else ""
    rows = []
    for (concept, layer, kind, _), c in curves.items():
        if kind != "concept":
            continue
        randoms = [r for (cc, ll, kk, _), r in curves.items() if cc == concept and ll == layer and kk == "random"]
        t = effect_threshold
        ci = bootstrap(c, randoms, n_boot=n_boot, rng=concept_rng(seed, concept, layer), level=level,
                       effect_threshold=t)
        i = reference_index(c, effect_threshold=t)
        null = np.array([separation(r, effect_threshold=t) for r in randoms])
        s = separation(c, effect_threshold=t)
        rows.append({
            "model": model, "concept": concept, "layer": layer, "reference_scale": float(c.scales[i]),
            "introspection_delta": float(c.intro_delta[i]), "control_delta": float(c.control_delta[:, i].mean()),
            "separation": s, "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
            "introspection_flip": intro_flip(c, effect_threshold=t),
            "control_flip": control_flip(c, effect_threshold=t), "scale_gap": scale_gap(c, effect_threshold=t),
            "null_mean": float(null.mean()) if len(null) else float("nan"),
            "null_sd": float(null.std(ddof=1)) if len(null) > 1 else float("nan"),
            "excess": s - float(null.mean()) if len(null) else float("nan"),
            "excess_ci_low": ci["excess_ci_low"], "excess_ci_high": ci["excess_ci_high"],
            "n_controls": int(c.control_delta.shape[0]), "n_random": len(randoms),
            "class": classify(c, ci["ci_low"], effect_threshold=effect_threshold,
                              separation_threshold=separation_threshold),
        })
    if not rows:
        raise ValueError("the table has no concept-vector rows (vector_kind == 'concept')")
    out = pd.DataFrame(rows, columns=ATLAS_COLUMNS)
    return out.sort_values(["separation", "concept"], ascending=[False, True], ignore_index=True)


def class_counts(table: pd.DataFrame) -> pd.Series:
    """How many concepts fall in each class (every class listed, zeros included)."""
    return table["class"].value_counts().reindex(list(CLASSES), fill_value=0)


def summary(table: pd.DataFrame, df: pd.DataFrame, *, effect_threshold: float = EFFECT_THRESHOLD) -> str:
    """Sentences computed from the atlas and its sweep: class counts, the best concept, and the random null
    (``effect_threshold`` as given to :func:`atlas`)."""
    counts = class_counts(table)
    null = vector_scores(df, effect_threshold=effect_threshold)
    null = null[null["vector_kind"] == "random"]["separation"]
    parts = [f"{len(table)} concepts: " + ", ".join(f"{n} {c}" for c, n in counts.items()) + "."]
    top = table.iloc[0]
    parts.append(f"The most separated is '{top['concept']}' (S = {top['separation']:.2f} logits, "
                 f"{CONFIDENCE:.0%} CI {top['ci_low']:.2f} to {top['ci_high']:.2f}, class {top['class']}).")
    if len(null):
        beat = int((table["separation"] > null.max()).sum())
        sd = null.std(ddof=1) if len(null) > 1 else 0.0
        parts.append(f"The {len(null)} random vectors score {null.mean():.2f} ± {sd:.2f} (max {null.max():.2f}); "
                     f"{beat} of {len(table)} concepts score above every random vector.")
    return " ".join(parts)


def run_atlas(handle: ModelHandle, concepts: Sequence[str], scales: Sequence[float], *, layer: int | None = None,
              n_controls: int = 4, n_random: int = 2, seed: int = 0, n_boot: int = N_BOOT,
              effect_threshold: float = EFFECT_THRESHOLD, separation_threshold: float = SEPARATION_THRESHOLD,
              results_dir: str | Path | None = None, bank: VectorBank | None = None, progress: bool = True
              ) -> tuple[pd.DataFrame, SweepResult]:
    """Measure the scale sweep of every concept at one layer (default: 2/3 of the depth, the series' default) and
    classify them.

    Returns ``(atlas table, sweep)``; with ``results_dir`` the sweep is saved as ``atlas_sweep.csv`` (resumable)
    and the table as ``atlas.csv``.
    """
    layer = default_layer(handle, layer)
    if n_controls < 1:
        raise ValueError(f"n_controls must be >= 1 (the separation needs control questions), got {n_controls}")
    sweep = scale_sweep(handle, concepts, scales, layer=layer, n_controls=n_controls, n_random=n_random, seed=seed,
                        results_dir=results_dir, name="atlas_sweep", bank=bank, progress=progress)
    table = atlas(sweep.df, effect_threshold=effect_threshold, separation_threshold=separation_threshold,
                  n_boot=n_boot, seed=seed)
    if results_dir is not None:
        path = Path(results_dir) / "atlas.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(path, index=False)
    return table, sweep
