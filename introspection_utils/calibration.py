"""Calibration of the verdicts on synthetic sweeps whose truth is known.

A synthetic concept is a set of per-question delta curves (:class:`verdicts.QuestionCurves`) drawn from a model of
what a sweep measures: every question q moves by ``s × (b + u_q) + ε`` at scale s — b a shared push towards "yes" (or
"no") that every question gets, u_q the question's own sensitivity (exchangeable across questions: the
introspection wordings are drawn from the same distribution as the controls), ε measurement noise — plus, for the
introspection wordings only, a planted introspection-specific effect ``s × δ``. Random vectors are drawn the same
way with their own shared push.

Scenarios (:data:`SCENARIOS`), each run as atlases of ``concepts_per_atlas`` concepts whose q-values are corrected
together, exactly as :func:`verdicts.verdicts` does:

* ``shared yes-shift``: δ = 0; the concept pushes every question alike (b from N(0.6, 0.4) per unit scale). Calling
  these "introspection-specific" is a false positive.
* ``relabelled control``: δ = 0 and heavy-tailed question sensitivities (Student-t, 2 d.o.f.), so some ordinary
  question moves a lot — as if a control had been relabelled "introspection". False positive.
* ``random vectors alike``: δ > 0, but the random vectors of the same norm get the same δ: the introspection
  question responds to any perturbation, not to the concept. False positive (the random-vector null must catch it).
* ``planted δ=…``: δ > 0 for the concept only: the power to find a real introspection-specific effect.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from introspection_utils.paths import project_root, replace_block
from introspection_utils.verdicts import ALPHA, QuestionCurves, benjamini_hochberg, classify, shift_test

SCALES = (0.0, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class Design:
    """What is asked: ``n_wordings`` introspection wordings, ``n_controls`` controls, ``n_random`` random vectors per
    concept, at ``scales``; noise and question spread in logits (per unit scale for the spread)."""

    n_wordings: int = 4
    n_controls: int = 10
    n_random: int = 2
    scales: tuple[float, ...] = SCALES
    question_sd: float = 0.15
    noise_sd: float = 0.3


SCENARIOS = {
    "shared yes-shift": dict(delta=0.0, heavy_tails=False, random_delta=False),
    "relabelled control": dict(delta=0.0, heavy_tails=True, random_delta=False),
    "random vectors alike": dict(delta=0.25, heavy_tails=False, random_delta=True),
    "planted δ=0.1": dict(delta=0.1, heavy_tails=False, random_delta=False),
    "planted δ=0.25": dict(delta=0.25, heavy_tails=False, random_delta=False),
}
FALSE_POSITIVE_SCENARIOS = ("shared yes-shift", "relabelled control", "random vectors alike")


def synthetic_curves(rng: np.random.Generator, design: Design, *, delta: float, heavy_tails: bool) -> QuestionCurves:
    """One synthetic vector's curves ``[n_wordings + n_controls, S]`` (see the module docstring)."""
    q = design.n_wordings + design.n_controls
    s = np.asarray(design.scales, float)
    shared = rng.normal(0.6, 0.4)
    spread = rng.standard_t(2, q) if heavy_tails else rng.normal(0.0, 1.0, q)
    slopes = shared + design.question_sd * spread
    slopes[: design.n_wordings] += delta
    curves = slopes[:, None] * s[None, :] + rng.normal(0.0, design.noise_sd, (q, len(s))) * (s != 0)
    return QuestionCurves.synthetic(s, curves, design.n_wordings)


def run_scenario(name: str, *, n_concepts: int = 1000, concepts_per_atlas: int = 50, design: Design = Design(),
                 alpha: float = ALPHA, seed: int = 0) -> dict[str, float]:
    """Run one scenario of :data:`SCENARIOS` over ``n_concepts`` synthetic concepts: ``called`` = the fraction
    classed introspection-specific (after Benjamini–Hochberg within each atlas), ``p_below_alpha`` = the fraction
    with an uncorrected p ≤ α, ``p_questions_below_alpha`` = the same for the question null alone."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")
    spec = SCENARIOS[name]
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    called = p_low = pq_low = 0
    done = 0
    while done < n_concepts:
        k = min(concepts_per_atlas, n_concepts - done)
        concepts = [synthetic_curves(rng, design, delta=spec["delta"], heavy_tails=spec["heavy_tails"])
                    for _ in range(k)]
        random_delta = spec["delta"] if spec["random_delta"] else 0.0
        randoms = [synthetic_curves(rng, design, delta=random_delta, heavy_tails=spec["heavy_tails"])
                   for _ in range(k * design.n_random)]
        tests = [shift_test(c, randoms, rng=rng) for c in concepts]
        p = np.array([t["p_value"] for t in tests])
        q = benjamini_hochberg(p)
        called += sum(classify(c, qv, alpha=alpha) == "introspection-specific" for c, qv in zip(concepts, q,
                                                                                                 strict=True))
        p_low += int((p <= alpha).sum())
        pq_low += sum(t["p_questions"] <= alpha for t in tests)
        done += k
    return {"scenario": name, "n_concepts": n_concepts, "called": called / n_concepts,
            "p_below_alpha": p_low / n_concepts, "p_questions_below_alpha": pq_low / n_concepts}


def calibrate(scenarios: Sequence[str] = tuple(SCENARIOS), *, n_concepts: int = 1000, design: Design = Design(),
              alpha: float = ALPHA, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Every scenario's rates as a table (one row each), with the design and α as columns."""
    rows = [run_scenario(name, n_concepts=n_concepts, design=design, alpha=alpha, seed=seed)
            for name in tqdm(scenarios, desc="calibration", disable=not progress)]
    out = pd.DataFrame(rows)
    out["truth"] = ["false positive" if s in FALSE_POSITIVE_SCENARIOS else "power" for s in out["scenario"]]
    for field in ("n_wordings", "n_controls", "n_random"):
        out[field] = getattr(design, field)
    out["alpha"] = alpha
    return out


def markdown(table: pd.DataFrame) -> str:
    """The calibration table as the README shows it (written by ``python -m introspection_utils.calibration``)."""
    d = table.iloc[0]
    lines = [f"Synthetic sweeps, {int(d['n_concepts'])} concepts per scenario in atlases of 50, "
             f"{int(d['n_wordings'])} wordings, {int(d['n_controls'])} controls, {int(d['n_random'])} random "
             f"vectors per concept, α = {d['alpha']:g} (`tests/test_verdicts.py` asserts these; "
             f"`python -m introspection_utils.calibration` rewrites this table):", "",
             "| scenario | truth | called introspection-specific (after BH) | p ≤ α, uncorrected | question null "
             "alone |",
             "|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.scenario} | {r.truth} | {r.called:.1%} | {r.p_below_alpha:.1%} | "
                     f"{r.p_questions_below_alpha:.1%} |")
    lines += ["", f"Uncorrected rates are single draws of {int(d['n_concepts'])} concepts: a true 5% shows as "
              f"5% ± 2.1% (3 standard errors)."]
    return "\n".join(lines)


if __name__ == "__main__":
    result = calibrate()
    print(result.to_string())
    print(replace_block(project_root() / "README.md", "calibration", markdown(result)))
