"""Calibration of the verdicts on synthetic sweeps whose truth is known — including the two confounds a real model
shows (Qwen2.5-Coder-1.5B's controls: Δ ≈ b + c·baseline with c ≈ −0.5 to −0.8): a shared push and compression.

A synthetic concept is a set of per-question delta curves (:class:`introspection_residual.QuestionCurves`) with both
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
vectors: −0.59 vs −0.78 at scale 8 — the case where the random-vector null alone does not protect S).

Scenarios (:data:`SCENARIOS`), each run as atlases of ``concepts_per_atlas`` concepts whose q-values are corrected
together, exactly as :func:`verdicts.verdicts` does, once with the verdict's statistic I and once with the contrast S:

* ``shared yes-shift``: β only. ``question-specific bias``: β and θ = 0.3 on the concept vector.
  ``compression``: γ only. ``compression + shift``: β and γ.
* ``relabelled control``: β, γ and heavy-tailed question sensitivities, so some ordinary question moves a lot — as if
  a control had been relabelled "introspection".
* ``random vectors alike``: β, γ and δ > 0, but the random vectors get the same δ: the wordings respond to any
  perturbation, not to the concept (the random-vector null must catch it).
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
from introspection_utils.stats.introspection_residual import QuestionCurves
from introspection_utils.stats.verdicts import ALPHA, benjamini_hochberg, classify, max_over_scales, shift_test

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


def run_scenario(name: str, *, n_concepts: int = 1000, concepts_per_atlas: int = 50, design: Design = Design(),
                 alpha: float = ALPHA, seed: int = 0) -> dict[str, float]:
    """Run one scenario of :data:`SCENARIOS` over ``n_concepts`` synthetic concepts, testing each with I (the
    verdict) and with S (the contrast): ``called`` / ``S_called`` = the fraction classed introspection-specific
    (after Benjamini–Hochberg within each atlas), ``p_below_alpha`` / ``S_p_below_alpha`` = the fraction with an
    uncorrected p ≤ α, ``p_questions_below_alpha`` = the same for I's question null alone."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")
    spec = SCENARIOS[name]
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    counts = dict.fromkeys(("called", "p_below_alpha", "p_questions_below_alpha", "S_called", "S_p_below_alpha"), 0)
    done = 0
    while done < n_concepts:
        k = min(concepts_per_atlas, n_concepts - done)
        base = baselines(rng, design)  # one question set per atlas: the concepts and random vectors share it
        concepts = [synthetic_curves(rng, design, spec, base) for _ in range(k)]
        randoms = [synthetic_curves(rng, design, spec, base, random=True) for _ in range(k * design.n_random)]
        for statistic, prefix in (("I", ""), ("S", "S_")):
            t_rand = np.array([max_over_scales(r, statistic) for r in randoms])
            tests = [shift_test(c, randoms, rng=rng, statistic=statistic, random_statistics=t_rand) for c in concepts]
            p = np.array([t["p_value"] for t in tests])
            q = benjamini_hochberg(p)
            counts[prefix + "called"] += sum(qv <= alpha for qv in q)
            counts[prefix + "p_below_alpha"] += int((p <= alpha).sum())
            if statistic == "I":
                counts["p_questions_below_alpha"] += sum(t["p_questions"] <= alpha for t in tests)
                assert all(classify(c, qv, alpha=alpha) == "introspection-specific" for c, qv in
                           zip(concepts, q, strict=True) if qv <= alpha)
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
    ``python -m introspection_utils.calibration``)."""
    d = table.iloc[0]
    n = int(d["n_concepts"])
    lines = [f"Synthetic sweeps, {n} concepts per scenario in atlases of 50, {int(d['n_detect'])} detect and "
             f"{int(d['n_inverted'])} inverted wordings, {int(d['n_controls'])} controls spanning "
             f"{design.control_range[0]:+g} to {design.control_range[1]:+g} logits without injection, "
             f"{int(d['n_random'])} random vectors per concept, α = {d['alpha']:g}. I is the verdict; S, tested the "
             f"same way, is printed beside it (`tests/test_verdicts.py` asserts these; "
             f"`python -m introspection_utils.calibration` rewrites this table):", "",
             "| scenario | truth | I: called introspection-specific (after BH) | I: p ≤ α, uncorrected | I: question "
             "null alone | S: called (after BH) | S: p ≤ α, uncorrected |",
             "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.scenario} | {r.truth} | {r.called:.1%} | {r.p_below_alpha:.1%} | "
                     f"{r.p_questions_below_alpha:.1%} | {r.S_called:.1%} | {r.S_p_below_alpha:.1%} |")
    lines += ["", f"Uncorrected rates are single draws of {n} concepts: a true {ALPHA:.0%} shows as {ALPHA:.0%} ± "
              f"{binomial_margin(ALPHA, n):.1%} (3 standard errors)."]
    return "\n".join(lines)


if __name__ == "__main__":
    result = calibrate()
    print(result.to_string())
    print(replace_block(project_root() / CALIBRATION_DOC, "calibration", markdown(result)))
