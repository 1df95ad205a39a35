"""Plasmode: effects planted into a model's own sweep, so the verdict's power and false-positive rate are measured on
the model's real noise and geometry instead of synthetic tables.

A :class:`Panel` holds one layer of a committed scale sweep as arrays: every concept's and every random (null)
vector's Δ per question and injected scale, with the design (wordings, polarity, controls, baselines, which questions
are about the model). An :class:`Effect` is planted into those arrays:

* ``wording`` δ: every wording's Δ += δ·s·p_w (logits per unit scale, signed by polarity: towards reporting
  detection) — the effect sought. I = δ·max(s) is the same in logits at the largest scale.
* ``self push`` θ: every question about the model (the wordings and the self controls) += θ·s.
* ``yes-shift`` β: every question += β·s.
* ``compression`` γ: each injected answer y = x + Δ drawn towards indifference non-linearly,
  y ← (1 − κ)·y + κ·tanh(y) with κ = γ·(1 − e^(−s/4)) / (1 − e^(−max(s)/4)) (γ at the largest scale): large answers
  shrink, small ones hardly move, so the wordings (low baselines) and the controls (high ones) compress differently.
* ``stronger`` k: every Δ × k — a vector that pushes everything k times harder than the nulls it is tested against,
  its noise k times larger with it (a stress test: the model's concepts are not like this).
* ``stronger as concepts are`` (k, ρ): the controls' Δ × k, the wordings at the nulls' prediction for that push plus
  their own residual × ρ — k and ρ fitted to the model (:func:`fitted_scenarios`: the concepts' median push on the
  controls and median residual noise, each over the nulls').

Power (:func:`power_curve`): the wording effect planted into every real concept, the atlas tested as
:func:`verdicts.verdicts` would (Benjamini–Hochberg across concepts), the fraction called, over a grid of δ; the
**MDE** (:func:`mde`) is the smallest effect called with 80% power, interpolated on the grid. False-positive rates
(:func:`false_positive_rate`): each real null vector's group (its concept's random vectors) in turn held out and
tested as if it were a concept against the others — leave-one-out on the real nulls — with a confound planted into it
or not; the truth is "no introspection", so the rate of p ≤ α is the test's size there.

A method maps ``(concept_delta [V, Q, S], null_delta [R, Q, S], panel)`` to p-values ``[V]``: :func:`score_method`
(the verdict's statistic: the larger z of its two alternatives), :func:`uniform_effect_method` and
:func:`varying_effect_method` (each alternative alone: weights for one effect on every wording, or for an effect that
differs between wordings), :func:`residual_method` (the controls'-line I it replaced), :func:`answer_scale_method` and
:func:`larger_readout_method` (the test read on the answer's scale, or on the larger of that and logits:
:mod:`.readouts`) are compared on the same plantings, every effect planted in logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from introspection_utils.stats.definitions import QuestionCurves, question_curves
from introspection_utils.stats.introspection_score import (
    GRID,
    HETEROGENEITIES,
    POWER,
    QuestionDesign,
    fit_prediction,
    population_p,
    score_test,
)
from introspection_utils.stats.line_test import max_over_scales, shift_test
from introspection_utils.stats.readouts import READOUTS, readout_p
from introspection_utils.stats.verdicts import ALPHA, benjamini_hochberg

EFFECT_KINDS = ("wording", "self push", "yes-shift", "compression", "stronger", "stronger as concepts are")
ANSWER_KINDS = EFFECT_KINDS[:4]  # the kinds that move each answer on its own (a hook can plant them one at a time)


@dataclass(frozen=True)
class Panel:
    """One layer of a sweep as arrays: ``design`` (:class:`introspection_score.QuestionDesign`), ``concept_delta
    [V, Q, S]``, ``null_delta [R, Q, S]`` (injected scales only), ``groups [R]`` (each null's concept), ``concepts
    [V]``, ``about_self [Q]`` (bool: the question is about the model), ``questions [Q]``, ``layer``, ``model``,
    ``answer_format``."""

    design: QuestionDesign
    concept_delta: np.ndarray
    null_delta: np.ndarray
    groups: np.ndarray
    concepts: tuple[str, ...]
    about_self: np.ndarray
    questions: tuple[str, ...]
    layer: int
    model: str = ""
    answer_format: str = ""

    @property
    def top_scale(self) -> float:
        return float(self.design.scales.max())


def panel(df: pd.DataFrame, *, layer: int | None = None) -> Panel:
    """The :class:`Panel` of a scale-sweep table (``sweeps.COLUMNS``) at ``layer`` (default: its only layer)."""
    layers = sorted(df["layer"].unique())
    if layer is None:
        if len(layers) > 1:
            raise ValueError(f"the table holds several layers ({layers}); pass layer=")
        layer = int(layers[0])
    curves = question_curves(df[df["layer"] == layer])
    concepts = [(k[0], c) for k, c in curves.items() if k[2] == "concept"]
    nulls = [(k[0], c) for k, c in curves.items() if k[2] == "random"]
    if not concepts or not nulls:
        raise ValueError("the sweep needs concept and random (null) vectors")
    first = concepts[0][1]
    injected = first.injected
    if any(c.questions != first.questions or not np.array_equal(c.x, first.x) for _, c in concepts + nulls):
        raise ValueError("every vector must be measured with the same questions at the same scales")
    about = df.drop_duplicates("question").set_index("question")
    about_self = (np.array([about.loc[q, "question_about"] == "self" for q in first.questions])
                  if "question_about" in about else first.is_intro.copy())
    design = QuestionDesign(
        wordings=np.flatnonzero(first.is_intro), controls=np.flatnonzero(~first.is_intro),
        polarity=first.polarity[first.is_intro].astype(int), baseline=first.baseline.astype(float),
        scales=first.x[injected].astype(float))
    meta = df.iloc[0]
    return Panel(design=design, concept_delta=np.stack([c.delta[:, injected] for _, c in concepts]),
                 null_delta=np.stack([c.delta[:, injected] for _, c in nulls]),
                 groups=np.array([name for name, _ in nulls]), concepts=tuple(name for name, _ in concepts),
                 about_self=about_self, questions=first.questions, layer=int(layer),
                 model=str(meta.get("model", "")), answer_format=str(meta.get("answer_format", "")))


@dataclass(frozen=True)
class Effect:
    """What is planted: ``kind`` (one of :data:`EFFECT_KINDS`) and its ``size`` (δ, θ, β per unit scale; γ; k)."""

    kind: str
    size: float
    noise: float = 1.0  # "stronger as concepts are": the residual's scale relative to the nulls'

    def __post_init__(self) -> None:
        if self.kind not in EFFECT_KINDS:
            raise ValueError(f"unknown effect {self.kind!r}; choose one of {', '.join(EFFECT_KINDS)}")

    def answer(self, y: np.ndarray | float, *, scale: np.ndarray | float, polarity: np.ndarray | float,
               about_self: np.ndarray | bool, top_scale: float) -> np.ndarray | float:
        """The injected answer ``y`` = x + Δ (yes − no, logits) of a question with ``polarity`` (+1 detect, −1
        inverted, 0 a control), ``about_self`` (about the model) at injected ``scale``, with the effect planted
        (numpy broadcasting; ``top_scale``: the sweep's largest, where compression reaches γ). The one definition of
        the kinds in :data:`ANSWER_KINDS`: :meth:`apply` plants it into a sweep's arrays, a hook on a real model into
        each answer (:func:`introspection_utils.engine.planted.planted_answers`)."""
        if self.kind == "wording":
            return y + self.size * scale * polarity
        if self.kind == "self push":
            return y + self.size * scale * about_self
        if self.kind == "yes-shift":
            return y + self.size * scale
        if self.kind == "compression":
            kappa = self.size * (1 - np.exp(-np.asarray(scale) / 4)) / (1 - np.exp(-top_scale / 4))
            return (1 - kappa) * y + kappa * np.tanh(y)
        raise ValueError(f"{self.kind!r} is planted into a sweep's arrays only (:meth:`apply`); one answer at a time "
                         f"takes {', '.join(ANSWER_KINDS)}")

    def apply(self, delta: np.ndarray, p: Panel) -> np.ndarray:
        """``delta [V, Q, S]`` with the effect planted (a new array)."""
        d, s = p.design, p.design.scales
        out = np.array(delta, float, copy=True)
        if self.kind in ANSWER_KINDS:
            x = d.baseline[None, :, None]
            polarity = np.zeros(len(d.baseline))
            polarity[d.wordings] = d.polarity
            return self.answer(out + x, scale=s[None, None, :], polarity=polarity[None, :, None],
                               about_self=p.about_self[None, :, None], top_scale=float(s.max())) - x
        if self.kind == "stronger":
            out *= self.size
        else:  # stronger as concepts are: the controls and the prediction's part × size, the residual × noise
            prediction = fit_prediction(p.null_delta, d)
            residual = prediction.residual(out, d)  # [V, S, m]
            out[:, d.controls, :] *= self.size
            wordings = prediction.intercept[None] + prediction.controls_part(out, d) + self.noise * residual
            out[:, d.wordings, :] = np.transpose(wordings, (0, 2, 1))
        return out


Method = Callable[[np.ndarray, np.ndarray, Panel, np.ndarray], np.ndarray]


def score_method(concept_delta: np.ndarray, null_delta: np.ndarray, p: Panel, groups: np.ndarray,
                 **options: float) -> np.ndarray:
    """p-values of the verdict's test (:func:`introspection_score.score_test`, ``options`` passed on): beyond random
    vectors and beyond the controls (the larger of the two)."""
    test = score_test(concept_delta, null_delta, p.design, groups=groups, **options)
    return np.maximum(test.p_random, test.p_controls)


def answer_scale_method(concept_delta: np.ndarray, null_delta: np.ndarray, p: Panel, groups: np.ndarray
                        ) -> np.ndarray:
    """:func:`score_method` read on the answer's scale (:func:`readouts.answer_delta`) — compared, not the verdict's."""
    return np.maximum(*readout_p(concept_delta, null_delta, p.design, groups, ("answer scale",)))


def larger_readout_method(concept_delta: np.ndarray, null_delta: np.ndarray, p: Panel, groups: np.ndarray
                          ) -> np.ndarray:
    """:func:`score_method` with z the larger of its reading in logits and on the answer's scale
    (:func:`readouts.readout_p`) — compared, not the verdict's."""
    return np.maximum(*readout_p(concept_delta, null_delta, p.design, groups, tuple(READOUTS)))


def _curves(delta: np.ndarray, p: Panel) -> QuestionCurves:
    is_intro = np.zeros(len(p.questions), bool)
    is_intro[p.design.wordings] = True
    polarity = np.zeros(len(p.questions), int)
    polarity[p.design.wordings] = p.design.polarity
    return QuestionCurves(p.design.scales, delta, delta + p.design.baseline[:, None], p.design.baseline,
                          np.full(delta.shape, np.nan), is_intro, p.questions, polarity)


def residual_method(concept_delta: np.ndarray, null_delta: np.ndarray, p: Panel, groups: np.ndarray, *,
                    seed: int = 0) -> np.ndarray:
    """p-values of the controls'-line residual I with its question and norm-matched random-vector nulls (the
    statistic the verdict used before :mod:`.introspection_score`; ``line_test.shift_test``)."""
    randoms = [_curves(d, p) for d in null_delta]
    t_rand = np.array([max_over_scales(r) for r in randoms])
    rng = np.random.default_rng(seed)
    return np.array([shift_test(_curves(d, p), randoms, rng=rng, random_statistics=t_rand)["p_value"]
                     for d in concept_delta])


def uniform_effect_method(concept_delta: np.ndarray, null_delta: np.ndarray, p: Panel, groups: np.ndarray
                          ) -> np.ndarray:
    """:func:`score_method` with the one alternative of an effect the same on every wording (the smallest of
    :data:`introspection_score.HETEROGENEITIES`, 0)."""
    return score_method(concept_delta, null_delta, p, groups, heterogeneity=min(HETEROGENEITIES))


def varying_effect_method(concept_delta: np.ndarray, null_delta: np.ndarray, p: Panel, groups: np.ndarray
                          ) -> np.ndarray:
    """:func:`score_method` with the one alternative of an effect that differs between wordings (the largest of
    :data:`introspection_score.HETEROGENEITIES`: the verdict's weights before it took both)."""
    return score_method(concept_delta, null_delta, p, groups, heterogeneity=max(HETEROGENEITIES))


METHODS: dict[str, Method] = {"null-learned score": score_method,
                              "same effect on every wording alone": uniform_effect_method,
                              "varying effect alone (before)": varying_effect_method,
                              "controls' line I (before)": residual_method,
                              "answer scale": answer_scale_method,
                              "larger of logits and answer scale": larger_readout_method}


def called_fraction(p_values: np.ndarray, *, alpha: float = ALPHA) -> float:
    """The fraction of an atlas's concepts called after Benjamini–Hochberg at ``alpha``."""
    return float((benjamini_hochberg(p_values) <= alpha).mean())


def power_curve(p: Panel, sizes: Sequence[float], *, method: Method = score_method, alpha: float = ALPHA,
                kind: str = "wording") -> pd.DataFrame:
    """The wording effect δ (per unit scale) of every ``sizes`` planted into every real concept at once and the
    atlas tested: ``delta``, ``I`` (δ at the largest scale, logits), ``called`` (after BH), ``p_below_alpha``
    (uncorrected)."""
    rows = []
    for size in sizes:
        pv = method(Effect(kind, size).apply(p.concept_delta, p), p.null_delta, p, p.groups)
        rows.append({"delta": float(size), "I": float(size) * p.top_scale, "called": called_fraction(pv, alpha=alpha),
                     "p_below_alpha": float((pv <= alpha).mean())})
    return pd.DataFrame(rows)


N_RESAMPLES = 1000  # bootstrap resamples behind the population test's power
# δ for the population test: it pools every concept, so its MDE sits below the per-concept grid's first point
POPULATION_GRID = tuple(round(0.0025 * k, 4) for k in range(20)) + tuple(g for g in GRID if g >= 0.05)


def population_power(p: Panel, sizes: Sequence[float], *, alpha: float = ALPHA, n_resamples: int = N_RESAMPLES,
                     seed: int = 0, until: float | None = None) -> pd.DataFrame:
    """The population test's power (:func:`introspection_score.population_p`) with a wording effect δ of each of
    ``sizes`` planted into every concept: ``delta``, ``I`` (logits at the largest scale), ``rejected`` (the fraction
    of resamples with p ≤ ``alpha``). The score is computed once: a δ planted into every concept adds exactly δ to
    each concept's δ̂ and leaves the nulls' and every sd unchanged (each kind is centred in the weights, and the sd
    reads the controls only; test-held), so each size is tested on (δ̂ + δ) / sd. ``n_resamples`` seeded bootstrap
    atlases of the same size: the concepts, and the nulls' groups (a concept's random vectors together), drawn with
    replacement, the weights held at the sweep's. ``until``: stop after the first size whose rate reaches it (all an
    MDE needs)."""
    test = score_test(p.concept_delta, p.null_delta, p.design, groups=p.groups)
    rng = np.random.default_rng([int(seed), 30])
    names = np.unique(p.groups)
    members = [np.flatnonzero(p.groups == g) for g in names]
    draws = [(rng.integers(len(test.delta_hat), size=len(test.delta_hat)),
              np.concatenate([members[i] for i in rng.integers(len(names), size=len(names))]))
             for _ in range(n_resamples)]
    rows = []
    for size in sizes:
        shifted = test.shifted_z(size)
        hits = sum(population_p(shifted[c], test.null_z[r]) <= alpha for c, r in draws)
        rows.append({"delta": float(size), "I": float(size) * p.top_scale, "rejected": hits / n_resamples})
        if until is not None and hits / n_resamples >= until:
            break
    return pd.DataFrame(rows)


def mde(curve: pd.DataFrame, *, power: float = POWER, column: str = "called") -> float:
    """The smallest effect (in the curve's ``I`` units, logits at the largest scale) found with ``power``: linear
    interpolation between the first grid point that reaches it and the one before; NaN when none does."""
    c = curve.sort_values("I")
    values, effects = c[column].to_numpy(float), c["I"].to_numpy(float)
    hit = np.flatnonzero(values >= power)
    if not len(hit):
        return float("nan")
    i = int(hit[0])
    if i == 0 or values[i] == values[i - 1]:
        return float(effects[i])
    return float(effects[i - 1] + (power - values[i - 1]) / (values[i] - values[i - 1]) * (effects[i] - effects[i - 1]))


def false_positive_rate(p: Panel, effect: Effect | None = None, *, method: Method = score_method,
                        alpha: float = ALPHA, to_all_nulls: bool = False) -> float:
    """Leave-one-out on the real nulls: each null group held out and tested as concepts against the other nulls,
    with ``effect`` planted into it (``to_all_nulls``: into every null — the case where random vectors share an
    effect); the fraction of held-out null vectors with p ≤ ``alpha`` (uncorrected)."""
    nulls = effect.apply(p.null_delta, p) if effect is not None else p.null_delta
    hits = 0
    for g in np.unique(p.groups):
        out = p.groups == g
        held = nulls[out] if (effect is None or to_all_nulls) else effect.apply(p.null_delta[out], p)
        pv = method(held, nulls[~out] if to_all_nulls else p.null_delta[~out], p, p.groups[~out])
        hits += int((pv <= alpha).sum())
    return hits / len(p.null_delta)


def subsample(p: Panel, n_concepts: int, *, seed: int = 0) -> Panel:
    """A panel with ``n_concepts`` of the concepts and their random vectors (for fast tests)."""
    rng = np.random.default_rng(seed)
    keep = sorted(rng.choice(len(p.concepts), n_concepts, replace=False))
    names = [p.concepts[i] for i in keep]
    mask = np.isin(p.groups, names)
    return replace(p, concept_delta=p.concept_delta[keep], null_delta=p.null_delta[mask], groups=p.groups[mask],
                   concepts=tuple(names))


def fitted_scenarios(p: Panel) -> dict[str, Effect]:
    """The confounds fitted to the model's own sweep (each a false positive when called), sized by what its concepts
    do at the largest scale s: ``yes-shift`` β = the concepts' median shared push b of the controls' line / s (at
    least 0.05); ``self push`` θ = their median (self − world control Δ) / s (at least 0.05); ``compression`` γ =
    their median |slope c| (at least 0.5); ``stronger as concepts are`` k = the concepts' median push on the controls
    over the nulls', ρ = the spread of the concepts' score δ̂ over the nulls' (out of sample, median absolute
    deviations, at least 1: the noise the test's size depends on; an upper bound, since true differences between
    concepts widen it too); ``stronger`` the same k with the noise k times larger (the stress test)."""
    d = p.design
    controls = p.concept_delta[:, d.controls, -1]  # [V, n] at the largest scale
    x = d.baseline[d.controls]
    slope = ((controls - controls.mean(axis=1, keepdims=True)) @ (x - x.mean())) / float(((x - x.mean()) ** 2).sum())
    push = controls.mean(axis=1) - slope * x.mean()
    about = p.about_self[d.controls]
    self_gap = (controls[:, about].mean(axis=1) - controls[:, ~about].mean(axis=1)) if about.any() and (
        ~about).any() else np.zeros(len(controls))
    test = score_test(p.concept_delta, p.null_delta, d, groups=p.groups)
    k = float(np.median(test.push) / np.median(test.null_push))
    mad = lambda v: float(np.median(np.abs(v - np.median(v))))  # noqa: E731
    rho = max(1.0, mad(test.delta_hat) / mad(test.null_delta_hat))  # never quieter than the nulls
    s = p.top_scale
    return {"yes-shift": Effect("yes-shift", round(max(0.05, float(np.median(push)) / s), 3)),
            "self push": Effect("self push", round(max(0.05, float(np.median(self_gap)) / s), 3)),
            "compression": Effect("compression", round(max(0.5, float(np.median(np.abs(slope)))), 2)),
            "stronger as concepts are": Effect("stronger as concepts are", round(k, 2), round(rho, 2)),
            "stronger": Effect("stronger", round(k, 2))}


def report(p: Panel, *, methods: dict[str, Method] = METHODS, grid: Sequence[float] = GRID,
           alpha: float = ALPHA) -> pd.DataFrame:
    """Every method's power curve, MDE and false-positive rates on one panel: one row per (method, quantity) with
    ``model, answer_format, n_concepts, n_nulls, method, quantity, truth, effect, value`` — power rows (``called at
    I = …``, ``MDE``), and false-positive rates by leave-one-out on the real nulls (``no effect``, each of
    :func:`fitted_scenarios`, and ``random vectors alike``: the wording effect at the MDE in every null); for the
    verdict's statistic also the population test (:func:`population_power`): how often it rejects with nothing
    planted, and its MDE (the smallest I planted into every concept that it rejects in 80% of resamples)."""
    rows = []
    head = {"model": p.model, "answer_format": p.answer_format, "n_concepts": len(p.concepts),
            "n_nulls": len(p.null_delta)}
    scenarios = fitted_scenarios(p)
    for name, method in methods.items():
        curve = power_curve(p, grid, method=method, alpha=alpha)
        found = mde(curve)
        for r in curve.itertuples():
            rows.append({**head, "method": name, "quantity": f"called at I = {r.I:.2f}", "truth": "power",
                         "effect": f"δ = {r.delta:g}", "value": r.called})
        rows.append({**head, "method": name, "quantity": "MDE (I, logits, 80% called)", "truth": "power",
                     "effect": "", "value": found})
        rows.append({**head, "method": name, "quantity": "FPR: no effect", "truth": "false positive", "effect": "",
                     "value": false_positive_rate(p, method=method, alpha=alpha)})
        for label, effect in scenarios.items():
            size = f"{effect.size:g}" + (f", ρ = {effect.noise:g}" if effect.kind == "stronger as concepts are" else "")
            rows.append({**head, "method": name, "quantity": f"FPR: {label}", "truth": "false positive",
                         "effect": size, "value": false_positive_rate(p, effect, method=method, alpha=alpha)})
        alike = Effect("wording", 0.1)
        rows.append({**head, "method": name, "quantity": "FPR: random vectors alike", "truth": "false positive",
                     "effect": "δ = 0.1 in every vector", "value": false_positive_rate(
                         p, alike, method=method, alpha=alpha, to_all_nulls=True)})
    scored = [name for name, method in methods.items() if method is score_method]
    if not scored:  # the population test reads the verdict's statistic: without it, no population rows
        return pd.DataFrame(rows)
    population, name = population_power(p, POPULATION_GRID, alpha=alpha, until=POWER), scored[0]
    rows.append({**head, "method": name, "quantity": "population test: rejected, nothing planted",
                 "truth": "as measured", "effect": "", "value": float(population["rejected"].iloc[0])})
    rows.append({**head, "method": name, "quantity": f"population MDE (I, logits, {POWER:.0%} of resamples)",
                 "truth": "power", "effect": "", "value": mde(population, column="rejected")})
    return pd.DataFrame(rows)
