"""The controls'-line test the verdict used before issue #30, and the bootstrap of the line's quantities: kept for
the contrast S (the synthetic calibration shows why S does not decide), as the comparison column of
:mod:`.plasmode`'s table, and for the readings' descriptive intervals. It decides nothing: the verdict's test is
:func:`introspection_utils.stats.introspection_score.score_test`.

**The test** (one concept at one layer; :func:`shift_test`). T = max over injected scales of the line's residual I
(or of S) — scale selection is part of the statistic, each null takes the same maximum.

* *question null*: the roles (detect +1, inverted −1, control 0) assigned to the questions anew — every distinct
  relabelling when there are at most :data:`MAX_EXACT`, else :data:`N_PERMUTATIONS` random permutations — the line
  refitted on each relabelling's controls; ``p_questions`` = the fraction with T at least the observed one. A
  relabelled set loses the twins' cancellation, so this null is conservative on a real model.
* *random-vector null*: T of every norm-matched random vector at the layer; ``p_random`` is the one-sided
  prediction test of a new draw, P(t_{R−1} ≥ (T − mean) / (sd · √(1 + 1/R))), ``random_rank`` the rank version.
* ``p_value`` = max of the two (1 without random vectors or with a degenerate line).

**The bootstrap** (:func:`bootstrap_interval`): percentile intervals of the line's residual, S and the (signed)
introspection and control Δ at one scale, resampling the wordings (within each polarity) and the controls.
"""

from __future__ import annotations

import functools
import itertools
import math
import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import special

from introspection_utils.stats.definitions import (
    QuestionCurves,
    question_curves,
    select,
    statistic_weights,
)

CONFIDENCE = 0.95
N_BOOT = 2000
MIN_RANDOM = 3  # random vectors the random-vector null needs
MAX_EXACT = 20_000  # enumerate every relabeling up to this many
N_PERMUTATIONS = 10_000  # else sample this many


@functools.lru_cache(maxsize=16)
def _all_relabelings(q: int, m: int, n_neg: int) -> np.ndarray:
    """Every assignment of m wordings (n_neg of them inverted) to q questions: ``[C(q, m)·C(m, n_neg), q]`` int,
    read-only (pure combinatorics, so memoised)."""
    chosen = np.array(list(itertools.combinations(range(q), m)), int).reshape(-1, m)  # [C, m]
    signs = np.ones((math.comb(m, n_neg), m), int)  # [K, m]
    for row, negative in enumerate(itertools.combinations(range(m), n_neg)):
        signs[row, list(negative)] = -1
    rows = np.repeat(chosen, len(signs), axis=0)
    out = np.zeros((len(rows), q), int)
    np.put_along_axis(out, rows, np.tile(signs, (len(chosen), 1)), axis=1)
    out.flags.writeable = False
    return out


def relabelings(roles: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """``([P, Q] int, exact)``: the observed roles (``roles [Q]``: +1 / −1 wordings, 0 controls) assigned to the
    questions anew — every distinct assignment (which questions are wordings, and which of those are inverted) when
    there are at most :data:`MAX_EXACT`, else :data:`N_PERMUTATIONS` random permutations of the roles (see the module
    docstring for why the sign pattern travels with the relabelling)."""
    roles = np.asarray(roles, int)
    q = len(roles)
    signs = roles[roles != 0]
    m, n_neg = len(signs), int((signs < 0).sum())
    if math.comb(q, m) * math.comb(m, n_neg) <= MAX_EXACT:
        return _all_relabelings(q, m, n_neg), True
    order = np.argsort(rng.random((N_PERMUTATIONS, q)), axis=1)
    return roles[order], False


@functools.lru_cache(maxsize=64)
def _exact_weights(baseline: bytes, roles: bytes, statistic: str) -> np.ndarray:
    """:func:`statistic_weights` of every exact relabelling of ``roles`` at ``baseline`` (float64 and int64 bytes):
    the same for every vector measured with the same questions, so memoised (read-only)."""
    x, r = np.frombuffer(baseline, float), np.frombuffer(roles, np.int64)
    signs = r[r != 0]
    out = statistic_weights(x, _all_relabelings(len(r), len(signs), int((signs < 0).sum())), statistic)
    out.flags.writeable = False
    return out


def max_statistic(curves: QuestionCurves, roles: np.ndarray, statistic: str = "I", *, exact: bool = False
                  ) -> np.ndarray:
    """T = max over injected x of I (or S) for each labelling: ``roles [P, Q]`` → ``[P]``. ``exact``: ``roles`` are
    :func:`relabelings`' full enumeration for ``curves.polarity`` (their weights are then reused across vectors)."""
    if exact:
        weights = _exact_weights(np.ascontiguousarray(curves.baseline, float).tobytes(),
                                 np.ascontiguousarray(curves.polarity, np.int64).tobytes(), statistic)
        return (weights @ curves.delta)[:, curves.injected].max(axis=1)
    return curves.statistic(statistic, roles)[:, curves.injected].max(axis=1)


def max_over_scales(curves: QuestionCurves, statistic: str = "I") -> float:
    """T of one vector: the largest I (or S) over its injected x."""
    return float(curves.statistic(statistic)[curves.injected].max())


def shift_test(concept: QuestionCurves, randoms: Sequence[QuestionCurves] = (), *, rng: np.random.Generator | int = 0,
               statistic: str = "I", random_statistics: np.ndarray | None = None) -> dict[str, float]:
    """The calibrated test of one concept (see the module docstring): ``statistic`` T (max over injected scales of I,
    or of S with ``statistic="S"``), ``peak_scale`` s*, ``p_questions``, ``p_random`` and ``random_rank`` (NaN with
    fewer than :data:`MIN_RANDOM` random vectors: then ``p_value`` is 1 — no verdict without the random-vector null),
    ``p_value`` (also 1 when I's fit is degenerate: ``fit_ok`` 0.0), ``n_relabelings``, ``exact`` (1.0 when every
    relabeling was enumerated). ``random_statistics [R]``: the randoms' T (:func:`max_over_scales`) when already
    computed (an atlas tests every concept against the same random vectors)."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    injected = concept.injected
    if not injected.any():
        raise ValueError("the test needs at least one injected scale (x ≠ 0)")
    values = concept.statistic(statistic)
    peak = int(np.flatnonzero(injected)[np.argmax(values[injected])])
    t_obs = float(values[peak])
    roles, exact = relabelings(concept.polarity, rng)
    t_perm = max_statistic(concept, roles, statistic, exact=exact)
    tol = 1e-9 * max(1.0, abs(t_obs))
    hits = int((t_perm >= t_obs - tol).sum())
    p_questions = hits / len(roles) if exact else (1 + hits) / (1 + len(roles))
    p_random = rank = float("nan")
    if len(randoms) >= MIN_RANDOM:
        if (any(r.questions != concept.questions or r.x.shape != concept.x.shape for r in randoms)
                or not (np.stack([r.x for r in randoms]) == concept.x).all()):
            raise ValueError("the random vectors were measured at other scales or with other questions")
        t_rand = (np.asarray(random_statistics, float) if random_statistics is not None else
                  np.array([max_over_scales(r, statistic) for r in randoms]))
        n = len(t_rand)
        rank = float((1 + (t_rand >= t_obs - tol).sum()) / (1 + n))
        spread = t_rand.std(ddof=1) * math.sqrt(1 + 1 / n)
        p_random = float(special.stdtr(n - 1, -(t_obs - t_rand.mean()) / spread)) if spread > 0 else float(
            t_obs <= t_rand.mean())
    ok = statistic == "S" or concept.fit_ok
    p_value = max(p_questions, p_random) if not math.isnan(p_random) and ok else 1.0
    return {"statistic": t_obs, "peak_scale": float(concept.x[peak]), "p_questions": float(p_questions),
            "p_random": p_random, "random_rank": rank, "p_value": float(p_value), "n_relabelings": float(len(roles)),
            "exact": float(exact), "fit_ok": float(ok)}


def _one_concept(df: pd.DataFrame, concept: str, layer: int | None) -> tuple[QuestionCurves, list[QuestionCurves]]:
    sub = select(df, concept, layer=layer)
    if sub["layer"].nunique() > 1:
        raise ValueError(f"the table holds several layers ({sorted(sub['layer'].unique())}); pass layer=")
    at = int(sub["layer"].iloc[0])
    curves = question_curves(df[df["layer"] == at])
    return curves[(concept, at, "concept", None)], [q for k, q in curves.items() if k[2] == "random"]


def peak_index(curves: QuestionCurves, statistic: str = "I") -> int:
    """Index of the injected x with the largest I (or S): the point the test's maximum picks."""
    values, injected = curves.statistic(statistic), curves.injected
    return int(np.flatnonzero(injected)[np.argmax(values[injected])])


def peak_scale(df: pd.DataFrame, concept: str, *, layer: int | None = None, statistic: str = "I") -> float:
    """The peak scale s* of ``concept`` in a scale sweep: the injected scale with the largest introspection
    residual I (the scale :func:`shift_test` picks; every notebook probes there)."""
    concept_curves, _ = _one_concept(df, concept, layer)
    return float(concept_curves.x[peak_index(concept_curves, statistic)])


def concept_test(df: pd.DataFrame, concept: str, *, layer: int | None = None, seed: int = 0) -> dict[str, float]:
    """:func:`shift_test` of one concept of a scale sweep, against the random vectors measured at its layer."""
    concept_curves, randoms = _one_concept(df, concept, layer)
    at = int(select(df, concept, layer=layer)["layer"].iloc[0])
    return shift_test(concept_curves, randoms, rng=concept_rng(seed, concept, at))


def _quantiles(values: np.ndarray, level: float) -> tuple[float, float]:
    a = (1 - level) / 2
    lo, hi = np.quantile(values, [a, 1 - a])
    return float(lo), float(hi)


def resample_counts(concept: QuestionCurves, *, rng: np.random.Generator, n_boot: int = N_BOOT) -> np.ndarray:
    """``[n_boot, Q]``: how many times each question is drawn in each bootstrap resample — the controls, then the
    wordings within each polarity (so the balance stays), each with replacement and as many as there are."""
    pol = concept.polarity
    controls = np.flatnonzero(~concept.is_intro)
    drawn = [controls[rng.integers(0, len(controls), (n_boot, len(controls)))]]
    drawn += [w[rng.integers(0, len(w), (n_boot, len(w)))]
              for w in (np.flatnonzero(pol == 1), np.flatnonzero(pol == -1)) if len(w)]
    counts = np.zeros((n_boot, len(pol)))
    np.add.at(counts, (np.arange(n_boot)[:, None], np.concatenate(drawn, axis=1)), 1.0)
    return counts


def resampled(concept: QuestionCurves, index: int, counts: np.ndarray) -> dict[str, np.ndarray]:
    """I, S, the signed introspection Δ and the control Δ at x index ``index`` of each resample ``counts [B, Q]``
    (:func:`resample_counts`) → each ``[B]``. I and S are :func:`definitions.statistic_weights` with the
    resample's
    multiplicities (I refits the controls' line on each resample): all-ones counts give the table's I and S."""
    d, pol = concept.delta[:, index], concept.polarity
    roles = np.broadcast_to(pol, counts.shape)
    wording, control = counts * concept.is_intro, counts * ~concept.is_intro
    return {"I": statistic_weights(concept.baseline, roles, "I", counts) @ d,
            "S": statistic_weights(concept.baseline, roles, "S", counts) @ d,
            "introspection": (wording * pol) @ d / wording.sum(axis=1), "control": control @ d / control.sum(axis=1)}


def bootstrap_interval(concept: QuestionCurves, index: int, *, rng: np.random.Generator, n_boot: int = N_BOOT,
                       level: float = CONFIDENCE) -> dict[str, float]:
    """Percentile intervals at x index ``index`` of S, I, the (signed) introspection Δ and the control Δ, resampling
    the wordings (within each polarity, so the balance stays) and the controls, with replacement
    (:func:`resample_counts`, :func:`resampled`); I refits the controls' line on each resample (a resample whose
    baselines do not vary keeps b alone)."""
    stats = resampled(concept, index, resample_counts(concept, rng=rng, n_boot=n_boot))
    (s_lo, s_hi), (r_lo, r_hi) = _quantiles(stats["S"], level), _quantiles(stats["I"], level)
    (i_lo, i_hi), (c_lo, c_hi) = _quantiles(stats["introspection"], level), _quantiles(stats["control"], level)
    return {"shift_ci_low": s_lo, "shift_ci_high": s_hi, "I_ci_low": r_lo, "I_ci_high": r_hi,
            "introspection_ci_low": i_lo, "introspection_ci_high": i_hi, "control_ci_low": c_lo,
            "control_ci_high": c_hi}


def concept_rng(seed: int, concept: str, layer: int) -> np.random.Generator:
    """The Generator of one (concept, layer): its numbers do not depend on the other concepts in the table."""
    return np.random.default_rng([int(seed), zlib.crc32(concept.encode()), int(layer)])
