"""Calibration of the verdicts on synthetic sweeps whose truth is known — including the two confounds a real model
shows (Qwen2.5-Coder-1.5B's controls: Δ ≈ b + c·baseline with c < 0, the atlas table's ``b`` and ``c``): a shared
push and compression.

A synthetic concept is a set of per-question delta curves (:class:`definitions.QuestionCurves`) with both
polarities of
introspection wordings (``n_detect`` +1, ``n_inverted`` −1) and controls whose no-injection answers x_q spread
evenly over ``control_range`` (leaning "yes" on average, as Qwen's do); the wordings' baselines are drawn from
N(``wording_mean``, 1) (lower than the controls', as on Qwen). Every question q moves at scale s by

    Δ_q(s) = s·β  −  κ(s)·γ·x_q  +  s·σ·u_q  +  s·θ·[q is a wording or a self control]  +  s·δ·p_q  +  ε

β a shared push (N(0.6, 0.4) per unit scale when on), γ the compression (U(0.5, 0.9) when on; κ(s) = 1 − e^(−s/4)
saturates it: at γ = 1 and large s every answer goes to indifference), u_q the question's own sensitivity
(exchangeable across questions; Student-t with 2 d.o.f. for "relabelled control"), θ a question-specific bias that
pushes the self questions and the introspection wordings of both polarities towards "yes" more than the world
questions, p_q the polarity (+1 detect, −1 inverted: a planted introspection effect δ moves the detect wordings
towards "yes" and the inverted ones towards "no", both towards reporting detection), ε noise. Random vectors are
drawn the same way with their own β and half the compression (on Qwen random vectors compress less than concept
vectors — the case where the random-vector null alone does not protect S).

Scenarios (:data:`SCENARIOS`), each run as atlases of ``concepts_per_atlas`` concepts whose q-values are corrected
together, exactly as :func:`verdicts.verdicts` does, once with the verdict's test
(:func:`introspection_score.score_test`:
the null-learned I, beyond random vectors and beyond the controls) and once with the contrast S (the controls'-line
test of :func:`line_test.shift_test` on S). The real model's own noise is :mod:`.plasmode`'s; these synthetic tables
keep what they were built for: confounds whose truth is known by construction.

* ``shared yes-shift``: β only. ``question-specific bias``: β and θ = 0.3 on the concept vector.
  ``compression``: γ only. ``compression + shift``: β and γ.
* ``relabelled control``: β, γ and heavy-tailed question sensitivities, so some ordinary question moves a lot — as if
  a control had been relabelled "introspection".
* ``random vectors alike``: β, γ and δ > 0, but the random vectors get the same δ: the wordings respond to any
  perturbation, not to the concept (the random-vector null must catch it; ``detector`` counts how many land in the
  class that says so, "injection detector").
* ``planted δ=…``: β, γ and δ > 0 for the concept only: the power to find a real introspection effect beyond
  the controls' prediction.

All but the planted ones are false positives when called introspection-specific.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from introspection_utils.core.paths import project_root, replace_block
from introspection_utils.stats.definitions import QuestionCurves
from introspection_utils.stats.introspection_score import QuestionDesign, benjamini_hochberg, score_test
from introspection_utils.stats.line_test import max_over_scales, shift_test
from introspection_utils.stats.verdicts import ALPHA, EFFECT_THRESHOLD, classify

CALIBRATION_DOC = "docs/verdicts.md"  # the file whose calibration block this module writes
SCALES = (0.0, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class Design:
    """What is asked: ``n_detect`` + ``n_inverted`` introspection wordings, ``n_controls`` controls whose baselines
    spread evenly over ``control_range`` (logits), wordings' baselines from N(``wording_mean``, 1), ``n_random``
    random vectors per concept, at ``scales``; noise and question spread in logits (per unit scale for the spread)."""

    n_detect: int = 2
    n_inverted: int = 2
    n_controls: int = 10
    n_random: int = 2
    scales: tuple[float, ...] = SCALES
    question_sd: float = 0.05
    noise_sd: float = 0.3
    control_range: tuple[float, float] = (-2.0, 5.0)
    wording_mean: float = -1.0

    @property
    def n_wordings(self) -> int:
        return self.n_detect + self.n_inverted


@dataclass(frozen=True)
class Scenario:
    """One truth: shared push on/off, compression on/off, question-specific bias θ, heavy-tailed sensitivities, a
    planted introspection effect δ (per unit scale) and whether the random vectors share it."""

    shift: bool = True
    compression: bool = True
    bias: float = 0.0
    heavy_tails: bool = False
    delta: float = 0.0
    random_delta: bool = False


SCENARIOS = {
    "shared yes-shift": Scenario(compression=False),
    "question-specific bias": Scenario(compression=False, bias=0.3),
    "compression": Scenario(shift=False),
    "compression + shift": Scenario(),
    "relabelled control": Scenario(heavy_tails=True),
    "random vectors alike": Scenario(delta=0.25, random_delta=True),
    "planted δ=0.05": Scenario(delta=0.05),
    "planted δ=0.1": Scenario(delta=0.1),
    "planted δ=0.25": Scenario(delta=0.25),
}
FALSE_POSITIVE_SCENARIOS = tuple(name for name, s in SCENARIOS.items() if s.delta == 0 or s.random_delta)


def baselines(rng: np.random.Generator, design: Design) -> np.ndarray:
    """``[n_wordings + n_controls]``: the wordings' no-injection answers (drawn) then the controls' (evenly spread)."""
    wordings = rng.normal(design.wording_mean, 1.0, design.n_wordings)
    return np.concatenate([wordings, np.linspace(*design.control_range, design.n_controls)])


def synthetic_curves(rng: np.random.Generator, design: Design, scenario: Scenario, base: np.ndarray, *,
                     random: bool = False) -> QuestionCurves:
    """One synthetic vector's curves ``[n_wordings + n_controls, S]`` (see the module docstring); ``random``: a
    random vector (half the compression, no bias, δ only if the scenario says the random vectors share it)."""
    m, q = design.n_wordings, design.n_wordings + design.n_controls
    s = np.asarray(design.scales, float)
    polarity = np.r_[np.ones(design.n_detect), -np.ones(design.n_inverted), np.zeros(design.n_controls)]
    push = rng.normal(0.6, 0.4) if scenario.shift else 0.0
    squeeze = rng.uniform(0.5, 0.9) * (0.5 if random else 1.0) if scenario.compression else 0.0
    spread = rng.standard_t(2, q) if scenario.heavy_tails else rng.normal(0.0, 1.0, q)
    slopes = push + design.question_sd * spread
    if scenario.bias and not random:
        biased = np.arange(q) < m
        biased[m::2] = True  # every other control is about the model ("self"), as in data/questions.toml
        slopes = slopes + scenario.bias * biased
    if not random or scenario.random_delta:
        slopes = slopes + scenario.delta * polarity
    kappa = 1.0 - np.exp(-s / 4.0)
    curves = (slopes[:, None] * s[None, :] - squeeze * np.outer(base, kappa)
              + rng.normal(0.0, design.noise_sd, (q, len(s))) * (s != 0))
    return QuestionCurves.synthetic(s, curves, m, baseline=base, polarity=polarity[:m].astype(int))


def score_atlas(concepts: Sequence[QuestionCurves], randoms: Sequence[QuestionCurves], n_random: int,
                alpha: float = ALPHA) -> dict[str, np.ndarray]:
    """The verdict's test of one synthetic atlas (each concept's ``n_random`` random vectors left out together):
    ``p`` (the larger of beyond random vectors and beyond the controls), ``q`` and the classes."""
    first = concepts[0]
    inj = first.injected
    design = QuestionDesign(wordings=np.flatnonzero(first.is_intro), controls=np.flatnonzero(~first.is_intro),
                            polarity=first.polarity[first.is_intro].astype(int), baseline=first.baseline,
                         scales=first.x[inj])
    test = score_test(np.stack([c.delta[:, inj] for c in concepts]), np.stack([r.delta[:, inj] for r in randoms]),
                      design, groups=np.arange(len(randoms)) // n_random)
    p = np.maximum(test.p_random, test.p_controls)
    q, q_controls = benjamini_hochberg(p), benjamini_hochberg(test.p_controls)
    top = test.top_scale
    classes = [classify(c, qv, I=i, q_controls=qc, I_controls=ic, alpha=alpha, effect_threshold=EFFECT_THRESHOLD)
               for c, qv, i, qc, ic in zip(concepts, q, test.I, q_controls, test.controls_only * top, strict=True)]
    return {"p": p, "q": q, "classes": np.array(classes)}


def run_scenario(name: str, *, n_concepts: int = 1000, concepts_per_atlas: int = 50, design: Design = Design(),
                 alpha: float = ALPHA, seed: int = 0) -> dict[str, float]:
    """Run one scenario of :data:`SCENARIOS` over ``n_concepts`` synthetic concepts, testing each with the verdict's
    test and with S (the contrast): ``called`` / ``S_called`` = the fraction classed introspection-specific (after
    Benjamini–Hochberg within each atlas), ``p_below_alpha`` / ``S_p_below_alpha`` = the fraction with an
    uncorrected p ≤ α, ``detector`` = the fraction classed "injection detector"."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")
    spec = SCENARIOS[name]
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    counts = dict.fromkeys(("called", "p_below_alpha", "detector", "S_called", "S_p_below_alpha"), 0)
    done = 0
    while done < n_concepts:
        k = min(concepts_per_atlas, n_concepts - done)
        base = baselines(rng, design)  # one question set per atlas: the concepts and random vectors share it
        concepts = [synthetic_curves(rng, design, spec, base) for _ in range(k)]
        randoms = [synthetic_curves(rng, design, spec, base, random=True) for _ in range(k * design.n_random)]
        scored = score_atlas(concepts, randoms, design.n_random, alpha)
        counts["called"] += int((scored["classes"] == "introspection-specific").sum())
        counts["p_below_alpha"] += int((scored["p"] <= alpha).sum())
        counts["detector"] += int((scored["classes"] == "injection detector").sum())
        t_rand = np.array([max_over_scales(r, "S") for r in randoms])
        p = np.array([shift_test(c, randoms, rng=rng, statistic="S", random_statistics=t_rand)["p_value"]
                      for c in concepts])
        counts["S_called"] += int((benjamini_hochberg(p) <= alpha).sum())
        counts["S_p_below_alpha"] += int((p <= alpha).sum())
        done += k
    return {"scenario": name, "n_concepts": n_concepts, **{key: v / n_concepts for key, v in counts.items()}}


def calibrate(scenarios: Sequence[str] = tuple(SCENARIOS), *, n_concepts: int = 1000, design: Design = Design(),
              alpha: float = ALPHA, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Every scenario's rates as a table (one row each), with the design and α as columns."""
    rows = [run_scenario(name, n_concepts=n_concepts, design=design, alpha=alpha, seed=seed)
            for name in tqdm(scenarios, desc="calibration", disable=not progress)]
    out = pd.DataFrame(rows)
    out["truth"] = ["false positive" if s in FALSE_POSITIVE_SCENARIOS else "power" for s in out["scenario"]]
    for field in ("n_detect", "n_inverted", "n_controls", "n_random"):
        out[field] = getattr(design, field)
    out["alpha"] = alpha
    return out


def binomial_margin(rate: float, n: int, *, sd: float = 3.0) -> float:
    """``sd`` binomial standard errors of a rate ``rate`` measured on ``n`` draws."""
    return sd * math.sqrt(rate * (1 - rate) / n)


def markdown(table: pd.DataFrame, design: Design = Design()) -> str:
    """The calibration table as ``docs/verdicts.md`` shows it (written by
    ``python -m introspection_utils.stats.synthetic_calibration``)."""
    d = table.iloc[0]
    n = int(d["n_concepts"])
    lines = [f"Synthetic sweeps, {n} concepts per scenario in atlases of 50, {int(d['n_detect'])} detect and "
             f"{int(d['n_inverted'])} inverted wordings, {int(d['n_controls'])} controls spanning "
             f"{design.control_range[0]:+g} to {design.control_range[1]:+g} logits without injection, "
             f"{int(d['n_random'])} random vectors per concept, α = {d['alpha']:g}. The verdict's test (the "
             f"null-learned I) decides; S, tested against the controls' line, is printed beside it "
             f"(`tests/test_verdicts.py` asserts these; `python -m introspection_utils.calibration` rewrites this "
             f"table):", "",
             "| scenario | truth | called introspection-specific (after BH) | p ≤ α, uncorrected | called injection "
             "detector | S: called (after BH) | S: p ≤ α, uncorrected |",
             "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.scenario} | {r.truth} | {r.called:.1%} | {r.p_below_alpha:.1%} | "
                     f"{r.detector:.1%} | {r.S_called:.1%} | {r.S_p_below_alpha:.1%} |")
    lines += ["", f"Uncorrected rates are single draws of {n} concepts: a true {ALPHA:.0%} shows as {ALPHA:.0%} ± "
              f"{binomial_margin(ALPHA, n):.1%} (3 standard errors)."]
    return "\n".join(lines)


if __name__ == "__main__":
    result = calibrate()
    print(result.to_string())
    print(replace_block(project_root() / CALIBRATION_DOC, "calibration", markdown(result)))
