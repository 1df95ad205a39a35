"""Verdicts: the calibrated test that tells an introspection-specific answer from a generic push of the logits (a
shared "yes", or every answer drawn towards indifference), the classes, and one sentence per verdict.

The terms it is built on (Δ, polarity, the controls' line b + c·x, the introspection residual I, the contrast S, flip
scale, answer mass, peak and effect scales) are defined once in :mod:`introspection_utils.stats.introspection_residual`.

**The test** (one concept at one layer; :func:`shift_test`). Statistic T = max over injected scales of I(s) — scale
selection is part of the statistic, and each null takes the same maximum, so picking the best scale is paid for.

* *question null* (is the introspection question special among questions?). Each question has a role: detect
  wording (+1), inverted wording (−1) or control (0). Under the null hypothesis — no introspection beyond the controls'
  prediction — the residuals from the line fitted over the controls do not depend on which questions carry which
  role, so the roles are exchangeable: a relabelling assigns the observed multiset of roles to the questions anew
  (which m questions are wordings, and which of those are inverted; the other questions are refitted as the
  controls). All distinct relabellings are enumerated when there are at most :data:`MAX_EXACT` of them, else
  :data:`N_PERMUTATIONS` random permutations of the roles (seeded) are drawn; T is recomputed for each (refitting the
  line on that relabelling's controls). ``p_questions`` = the fraction with T at least the observed one (the observed
  labelling included, so p > 0). Why keep the sign pattern rather than relabel within polarity: a question's role
  sign is what I multiplies its residual by, and under the null it is as arbitrary as its being a wording at all;
  relabelling within polarity would need as many "yes"-reporting as "no"-reporting controls per relabelling and would
  leave out relabellings the null makes equally likely. Where the questions are not exchangeable — a bias that pushes
  self-questions and wordings more than world questions — the observed I cancels the bias between the two polarities,
  while a relabelled set mixes self and world questions, which widens the null: the test becomes conservative, not
  liberal (``calibration``'s "question-specific bias" scenario measures it). With one polarity only (old tables) such a
  bias does not cancel: the readings say so. With one wording and n controls p cannot go below 1 / (n + 1).
* *random-vector null* (does a direction of the same norm do it too?): T of every norm-matched random vector measured
  at the same layer and scales with the same questions (all concepts' random vectors pooled: each is matched to its
  own concept's norm). ``p_random`` is the one-sided prediction test of a new draw from that population,
  P(t_{R−1} ≥ (T − mean) / (sd · √(1 + 1/R))) — exact for normal T_random, and not limited to 1 / (R + 1) as a rank
  would be (with 50 concepts, Benjamini–Hochberg needs p ≈ 0.001 for a single discovery; a rank among 100 random
  vectors cannot give it). ``random_rank`` = (1 + #{T_random ≥ T}) / (1 + R), the assumption-free version, is
  reported beside it. Fewer than :data:`MIN_RANDOM` random vectors: no random-vector test (p_random NaN).
* ``p_value`` = max(p_questions, p_random): the concept must beat both nulls (an intersection–union test, so the
  level holds); 1 when there is no random-vector null or the controls' fit is degenerate (no verdict without them).
  Across concepts, Benjamini–Hochberg ``q_value`` controls the false-discovery rate. The same test on S
  (``statistic="S"``) is kept for the calibration, which shows why it no longer decides.

**Classes** (exclusive, decided in this order by :func:`classify`; t = ``effect_threshold`` logits, α = ``alpha``;
b, c and I read at the effect scale):

1. ``introspection-specific``: q_value ≤ α (the wordings move towards reporting detection beyond the controls'
   prediction, beyond both nulls).
2. ``no effect``: at every injected scale |b|, |I| and |c|·max|x_q| are all < t.
3. ``opposite``: I ≤ −t (the wordings move away from reporting detection, beyond what the controls predict).
4. ``one-sided``: I ≥ t, and the test did not find it specific.
5. ``shared yes-shift``: b ≥ t (every question pushed towards "yes", the wordings as the controls predict).
6. ``shared suppression``: b ≤ −t (all pushed towards "no", e.g. "bomb").
7. ``compression``: otherwise — the answers are drawn towards indifference (|c|·max|x_q| ≥ t), the wordings with them.

**Other contrasts that are not the verdict.** ``mechanisms``, ``patching`` and ``attribution`` decompose the
difference-in-differences "introspection effect − mean control effect" at one scale: that is S at one scale (weights
1/m on the wordings, −1/n on the controls; :func:`introspection_utils.stats.shifts.specific`), a linear target that
attribution can split into components exactly. I is linear too (``introspection_residual.statistic_weights``), so a
decomposition
of I is those same per-question effects weighted by I's weights instead; until those modules take the weights,
their maps locate where S is made, which includes any compression. ``readings.top_heads``'
``introspection_minus_control`` is an attention difference, not a logit one.

Calibration: :mod:`introspection_utils.stats.synthetic_calibration` runs the test on synthetic sweeps whose truth is
known; its
false-positive rates and power are asserted in ``tests/test_verdicts.py`` and stated in ``docs/verdicts.md``.
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

from introspection_utils.stats.introspection_residual import (
    MIN_ANSWER_MASS,
    QuestionCurves,
    flip_scale,
    mass_note,
    question_curves,
    select,
    statistic_weights,
)
from introspection_utils.stats.null_model import (
    MIN_NULLS,
    Design,
    atlas_mde,
    benjamini_hochberg,
    population_p,
    score_test,
)

EFFECT_THRESHOLD = 1.0  # logits: a |delta| below this counts as "no change"
ALPHA = 0.05
CONFIDENCE = 0.95
N_BOOT = 2000
MIN_RANDOM = MIN_NULLS  # random vectors needed for the random-vector null
MAX_EXACT = 20_000  # enumerate every relabeling up to this many
N_PERMUTATIONS = 10_000  # else sample this many
CLASSES = ("introspection-specific", "injection detector", "shared yes-shift", "shared suppression", "compression",
           "opposite", "one-sided", "no effect")


# ----------------------------------------------------------------------------------------------------- the test

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
    (:func:`resample_counts`) → each ``[B]``. I and S are :func:`introspection_residual.statistic_weights` with the
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


def movement(concept: QuestionCurves) -> dict[str, np.ndarray]:
    """What the injection does to the questions at each x ``[S]``, on the controls' line: ``b`` (shared push), ``c``
    (slope), ``r2``, ``compression`` (the line's push on the most extreme control, |c|·max|x_q|) and ``size`` (the
    larger of |b| and compression). The descriptive classes are read at the effect scale, where ``size`` is largest;
    the verdict's I (:mod:`.null_model`) is not a per-scale quantity and enters the classes on its own."""
    fit = concept.fit()
    compression = np.abs(fit["c"]) * float(np.abs(concept.baseline[~concept.is_intro]).max())
    size = np.maximum(np.abs(fit["b"]), compression)
    return {"b": fit["b"], "c": fit["c"], "r2": fit["r2"], "compression": compression, "size": size}


def effect_index(concept: QuestionCurves) -> int:
    """Index of the effect scale: the injected x where :func:`movement`'s size is largest."""
    size = movement(concept)["size"]
    injected = np.flatnonzero(concept.injected)
    return int(injected[np.argmax(size[injected])])


def classify(concept: QuestionCurves, q_value: float, *, I: float = 0.0, q_controls: float = 1.0,  # noqa: E741
             I_controls: float = 0.0, alpha: float = ALPHA, effect_threshold: float = EFFECT_THRESHOLD) -> str:  # noqa: N803
    """The class of a concept (rules and order in the module docstring) — the one place the classes are decided.
    ``q_value``: beyond random vectors and the controls; ``q_controls``: beyond the controls; ``I`` and
    ``I_controls``: the score beyond the nulls' prediction and beyond the controls' part alone (logits at the largest
    scale; :func:`null_model.score_test`). NaN q-values (no test) never decide a class."""
    t = effect_threshold
    if q_value <= alpha:
        return "introspection-specific"
    if q_controls <= alpha and I_controls >= t:
        return "injection detector"
    move, inj = movement(concept), concept.injected
    if np.all(move["size"][inj] < t) and abs(I) < t:
        return "no effect"
    if I <= -t:
        return "opposite"
    if I >= t:
        return "one-sided"
    b = move["b"][effect_index(concept)]
    if b >= t:
        return "shared yes-shift"
    if b <= -t:
        return "shared suppression"
    return "compression"


def concept_rng(seed: int, concept: str, layer: int) -> np.random.Generator:
    """The Generator of one (concept, layer): its numbers do not depend on the other concepts in the table."""
    return np.random.default_rng([int(seed), zlib.crc32(concept.encode()), int(layer)])


ATLAS_COLUMNS = ["model", "concept", "layer", "n_wordings", "n_inverted", "n_controls", "n_random", "control_span",
                 "fit_ok", "I", "I_ci_low", "I_ci_high", "I_controls", "generic", "p_random", "p_controls", "p_value",
                 "q_value", "q_controls", "min_p", "covered", "noise", "mde", "population_p", "shift_scale", "shift",
                 "shift_ci_low", "shift_ci_high", "effect_scale", "introspection_delta", "introspection_ci_low",
                 "introspection_ci_high", "control_delta", "control_ci_low", "control_ci_high", "effect_b",
                 "effect_c", "effect_r2", "introspection_flip", "control_flip", "answer_mass", "baseline_answer_mass",
                 "low_mass", "class"]


def layer_test(concepts: Sequence[QuestionCurves], randoms: Sequence[QuestionCurves], *,
               groups: Sequence[str] | None = None, alpha: float = ALPHA, mde: bool = True) -> dict[str, object] | None:
    """:func:`null_model.score_test` of one layer's concepts against its random vectors (each vector's injected
    scales; ``groups``: each random vector's concept — one concept's random vectors are left out together), with the
    atlas's MDE and the population test; None with fewer than :data:`MIN_RANDOM` random vectors (no test)."""
    if len(randoms) < MIN_RANDOM:
        return None
    first = concepts[0]
    if any(c.questions != first.questions or not np.array_equal(c.x, first.x) for c in [*concepts, *randoms]):
        raise ValueError("the random vectors were measured at other scales or with other questions")
    inj = first.injected
    design = Design(wordings=np.flatnonzero(first.is_intro), controls=np.flatnonzero(~first.is_intro),
                    polarity=first.polarity[first.is_intro].astype(int), baseline=first.baseline.astype(float),
                    scales=first.x[inj].astype(float))
    concept_delta = np.stack([c.delta[:, inj] for c in concepts])
    null_delta = np.stack([r.delta[:, inj] for r in randoms])
    groups = None if groups is None else np.asarray(groups)
    test = score_test(concept_delta, null_delta, design, groups=groups)
    return {"test": test, "design": design, "mde": atlas_mde(concept_delta, null_delta, design, groups=groups,
                                                             alpha=alpha)
            if mde else float("nan"), "population_p": population_p(test.delta_hat, test.null_delta_hat)}


def verdicts(df: pd.DataFrame, *, alpha: float = ALPHA, effect_threshold: float = EFFECT_THRESHOLD,
             n_boot: int = N_BOOT, level: float = CONFIDENCE, seed: int = 0, mde: bool = True) -> pd.DataFrame:
    """One row per (concept, layer) of a scale-sweep table: the test (:func:`null_model.score_test`), its
    corrections, the controls' line at the effect scale, S, flips, answer mass and class (columns
    :data:`ATLAS_COLUMNS`), sorted by q-value then I.

    ``I`` (logits at the largest scale) with ``I_ci_low``/``I_ci_high`` (the rank test inverted: I minus the nulls'
    out-of-sample quantiles), ``I_controls`` (beyond the controls' part alone) and ``generic`` (the nulls' own
    response beyond the controls, same units); ``p_random`` (beyond random vectors, by rank), ``p_controls`` (beyond
    the controls), ``p_value`` (the larger), ``q_value`` and ``q_controls`` (Benjamini–Hochberg across the table's
    concepts), ``min_p`` (1 / (R + 1): the smallest p the layer's R random vectors allow), ``covered`` and ``noise``
    (the concept's residual noise within the nulls' range), ``mde`` (the atlas's smallest I called for 80% of its
    concepts, on its own noise: :func:`null_model.atlas_mde`; ``mde=False`` skips it), ``population_p`` (are the
    concepts as a group beyond their nulls); ``shift_scale`` with ``shift`` (S, the write-up's contrast) and its
    interval; ``effect_scale`` (where the controls' line moves most: the descriptive classes are read there) with
    the (signed) introspection and control Δ, their intervals, ``effect_b``, ``effect_c``, ``effect_r2``;
    ``control_span`` and ``fit_ok`` (the line's identification — descriptive only: the test does not need it);
    ``answer_mass`` (mean P(yes)+P(no) of the wordings at the largest scale, ``baseline_answer_mass`` without
    injection; ``low_mass`` below :data:`MIN_ANSWER_MASS`). Random vectors at a layer form that layer's null (pooled
    over concepts). With fewer than :data:`MIN_RANDOM` of them no test is run: the p- and q-values are NaN.
    """
    if effect_threshold <= 0:
        raise ValueError("effect_threshold must be > 0 (logits)")
    if not 0 < alpha < 1 or not 0 < level < 1:
        raise ValueError(f"alpha {alpha} and level {level} must be in (0, 1)")
    curves = question_curves(df)
    layers = sorted({k[1] for k in curves if k[2] == "concept"})
    if not layers:
        raise ValueError("the table has no concept-vector rows (vector_kind == 'concept')")
    rows = []
    for layer in layers:
        names = [k[0] for k in curves if k[2] == "concept" and k[1] == layer]
        concepts = [curves[(name, layer, "concept", None)] for name in names]
        null_keys = [k for k in curves if k[2] == "random" and k[1] == layer]
        randoms = [curves[k] for k in null_keys]
        tested = layer_test(concepts, randoms, groups=[k[0] for k in null_keys], alpha=alpha, mde=mde)
        nan = np.full(len(concepts), np.nan)
        if tested is not None:
            test = tested["test"]
            top = test.top_scale
            lo, hi = np.quantile(test.null_delta_hat, [(1 + level) / 2, (1 - level) / 2])
            I, I_lo, I_hi = test.I, (test.delta_hat - lo) * top, (test.delta_hat - hi) * top  # noqa: E741, N806
            I_controls, p_random, p_controls = test.controls_only * top, test.p_random, test.p_controls  # noqa: N806
            covered, noise, generic = test.covered, test.noise, test.generic * top
            min_p, layer_mde, pop = 1 / (len(randoms) + 1), tested["mde"], tested["population_p"]
        else:
            I, I_lo, I_hi, I_controls, p_random, p_controls, noise = nan, nan, nan, nan, nan, nan, nan  # noqa: E741, N806
            covered, generic, min_p, layer_mde, pop = np.zeros(len(concepts), bool), np.nan, np.nan, np.nan, np.nan
        for i, (concept, c) in enumerate(zip(names, concepts, strict=True)):
            rng = concept_rng(seed, concept, layer)
            s_peak = peak_index(c, "S")
            effect = effect_index(c)
            move = movement(c)
            ci = bootstrap_interval(c, effect, rng=rng, n_boot=n_boot, level=level)
            shift_ci = bootstrap_interval(c, s_peak, rng=rng, n_boot=n_boot, level=level)
            intro_logit = (c.polarity[c.is_intro, None] * c.logit[c.is_intro]).mean(axis=0)
            control_logit = c.logit[~c.is_intro].mean(axis=0)
            mass = float(np.nanmean(c.mass[c.is_intro, -1])) if np.isfinite(c.mass).any() else float("nan")
            sub = df[(df["concept"] == concept) & (df["layer"] == layer) & (df["vector_kind"] == "concept")
                     & (df["question_kind"] == "introspection")]
            base_mass = float(sub["baseline_answer_mass"].mean()) if "baseline_answer_mass" in sub else float("nan")
            rows.append({
                "model": df["model"].iloc[0] if "model" in df else "", "concept": concept, "layer": int(layer),
                "n_wordings": int(c.is_intro.sum()), "n_inverted": int((c.polarity < 0).sum()),
                "n_controls": int((~c.is_intro).sum()), "n_random": len(randoms), "control_span": c.control_span,
                "fit_ok": c.fit_ok, "I": float(I[i]), "I_ci_low": float(I_lo[i]), "I_ci_high": float(I_hi[i]),
                "I_controls": float(I_controls[i]), "generic": float(generic), "p_random": float(p_random[i]),
                "p_controls": float(p_controls[i]), "p_value": float(max(p_random[i], p_controls[i])),
                "min_p": float(min_p), "covered": bool(covered[i]), "noise": float(noise[i]),
                "mde": float(layer_mde), "population_p": float(pop),
                "shift_scale": float(c.x[s_peak]), "shift": float(c.shift()[s_peak]),
                "shift_ci_low": shift_ci["shift_ci_low"], "shift_ci_high": shift_ci["shift_ci_high"],
                "effect_scale": float(c.x[effect]), "introspection_delta": float(c.group_delta(True)[effect]),
                "introspection_ci_low": ci["introspection_ci_low"],
                "introspection_ci_high": ci["introspection_ci_high"],
                "control_delta": float(c.group_delta(False)[effect]),
                "control_ci_low": ci["control_ci_low"], "control_ci_high": ci["control_ci_high"],
                "effect_b": float(move["b"][effect]), "effect_c": float(move["c"][effect]),
                "effect_r2": float(move["r2"][effect]),
                "introspection_flip": flip_scale(c.x, intro_logit, float((c.polarity * c.baseline)[c.is_intro].mean())),
                "control_flip": flip_scale(c.x, control_logit, float(c.baseline[~c.is_intro].mean())),
                "answer_mass": mass, "baseline_answer_mass": base_mass,
                "low_mass": bool(mass < MIN_ANSWER_MASS) if not np.isnan(mass) else False,
            })
    out = pd.DataFrame(rows)
    tested_rows = out["p_value"].notna()
    out["q_value"], out["q_controls"] = np.nan, np.nan
    if tested_rows.any():
        out.loc[tested_rows, "q_value"] = benjamini_hochberg(out.loc[tested_rows, "p_value"])
        out.loc[tested_rows, "q_controls"] = benjamini_hochberg(out.loc[tested_rows, "p_controls"])
    out["class"] = [classify(curves[(r.concept, r.layer, "concept", None)], r.q_value, I=r.I, q_controls=r.q_controls,
                             I_controls=r.I_controls, alpha=alpha, effect_threshold=effect_threshold)
                    if not np.isnan(r.q_value) else
                    classify(curves[(r.concept, r.layer, "concept", None)], np.nan, alpha=alpha,
                             effect_threshold=effect_threshold) for r in out.itertuples()]
    return out[ATLAS_COLUMNS].sort_values(["q_value", "I", "concept"], ascending=[True, False, True],
                                          ignore_index=True, na_position="last")


def class_counts(table: pd.DataFrame) -> pd.Series:
    """How many concepts fall in each class (every class listed, zeros included)."""
    return table["class"].value_counts().reindex(list(CLASSES), fill_value=0)


def random_null(df: pd.DataFrame) -> pd.DataFrame:
    """The verdict's I of every vector of a scale-sweep table: ``concept, layer, vector_kind, vector_seed,
    statistic`` (I, logits at the largest scale: a concept's from the prediction fitted on every random vector, a
    random vector's out of sample — the null the concepts are ranked against; NaN at a layer with fewer than
    :data:`MIN_RANDOM` random vectors) and ``shift`` (max over injected scales of S, the contrast, for comparison)."""
    curves = question_curves(df)
    score: dict[tuple, float] = {}
    for layer in sorted({k[1] for k in curves}):
        concept_keys = [k for k in curves if k[1] == layer and k[2] == "concept"]
        null_keys = [k for k in curves if k[1] == layer and k[2] == "random"]
        if not concept_keys:
            continue
        tested = layer_test([curves[k] for k in concept_keys], [curves[k] for k in null_keys],
                            groups=[k[0] for k in null_keys], mde=False)
        if tested is None:
            continue
        test = tested["test"]
        score |= dict(zip(concept_keys, test.I, strict=True))
        score |= dict(zip(null_keys, test.null_delta_hat * test.top_scale, strict=True))
    rows = [{"concept": c, "layer": layer, "vector_kind": k, "vector_seed": s,
             "statistic": float(score.get((c, layer, k, s), np.nan)), "shift": float(q.shift()[q.injected].max())}
            for (c, layer, k, s), q in curves.items()]
    out = pd.DataFrame(rows)
    out["vector_seed"] = out["vector_seed"].astype("Int64")
    return out


def null_medians(null: pd.DataFrame) -> dict[str, float]:
    """From a :func:`random_null` table: the medians of I and of max-over-scales S of the concept vectors and of the
    random vectors (``concept_I``, ``random_I``, ``concept_S``, ``random_S``), and how many concepts exceed every
    random vector on each (``beat_I``, ``beat_S``): the numbers that show whether a statistic sits near 0 where only
    introspection should move it."""
    concept, random = null[null["vector_kind"] == "concept"], null[null["vector_kind"] == "random"]
    out = {"n_concepts": float(len(concept)), "n_random": float(len(random))}
    for name, column in (("I", "statistic"), ("S", "shift")):
        out[f"concept_{name}"] = float(concept[column].median()) if len(concept) else float("nan")
        out[f"random_{name}"] = float(random[column].median()) if len(random) else float("nan")
        out[f"beat_{name}"] = float((concept[column] > random[column].max()).sum()) if len(random) else float("nan")
    return out


def _polarity_words(r: dict) -> tuple[str, str]:
    """``(the wordings in words, a caveat when they all have one polarity)``."""
    n, inverted = int(r["n_wordings"]), int(r.get("n_inverted", 0) or 0)
    if inverted == 0:
        return (f"{n} detect wording(s)", "; with no inverted wording, a push on every introspection wording "
                "towards yes is not cancelled by a twin")
    return f"{n - inverted} detect and {inverted} inverted wordings", ""


def _mde_words(r: dict) -> str:
    """What the atlas could have found: its MDE (or that none is reachable, and why)."""
    mde = r.get("mde", np.nan)
    if mde is None or pd.isna(mde):
        return (f"no effect size is called for 80% of the concepts with {int(r['n_random'])} random vectors "
                f"(the smallest p they allow is {r['min_p']:.2g})" if not pd.isna(r.get("min_p", np.nan)) else
                "MDE not computed")
    return f"MDE I = {mde:.2f} (the smallest I called for 80% of concepts on this atlas's own noise)"


def decided_by(r: dict, *, alpha: float = ALPHA, effect_threshold: float = EFFECT_THRESHOLD) -> str:
    """The values a row's class was decided by, in words (the rule of :func:`classify` that fired, with its
    numbers)."""
    t, cls = effect_threshold, r["class"]
    if cls == "introspection-specific":
        return (f"q = {r['q_value']:.2g} ≤ {alpha:g}: I = {r['I']:+.2f} beyond random vectors (p = "
                f"{r['p_random']:.2g}) and the controls (p = {r['p_controls']:.2g})")
    if cls == "injection detector":
        return (f"beyond the controls (I over the controls' part = {r['I_controls']:+.2f} ≥ {t:g}, q = "
                f"{r['q_controls']:.2g}) but not beyond random vectors (q = {r['q_value']:.2g}; their own response "
                f"{r['generic']:+.2f})")
    if cls in ("opposite", "one-sided"):
        return f"I = {r['I']:+.2f} {'≤ −' if cls == 'opposite' else '≥ '}{t:g}"
    at = f"at scale {r['effect_scale']:g}"
    if cls == "no effect":
        return f"|b| = {abs(r['effect_b']):.2f}, |I| = {abs(r['I']):.2f} < {t:g} {at} where the line moves most"
    if cls in ("shared yes-shift", "shared suppression"):
        return f"b = {r['effect_b']:+.2f} {'≥ ' if cls == 'shared yes-shift' else '≤ −'}{t:g} {at}"
    return f"|b| = {abs(r['effect_b']):.2f} < {t:g}, c = {r['effect_c']:+.2f} {at}"


def describe_verdict(row: pd.Series | dict, *, alpha: float = ALPHA, brief: bool = False) -> str:
    """A verdict in words — the one place a row of :func:`verdicts` is put into words (the notebook, the atlas's
    :func:`~introspection_utils.experiments.atlas.summary` and the findings' claims table all call it).

    ``brief``: the class and, in brackets, the values it was decided by (:func:`decided_by`), I with its interval,
    q (or "no test"), the MDE and the answer mass — a table cell or a summary line. By default one sentence on the
    concept: the same, the test's p-values, the controls' line at the effect scale, S beside it, the introspection
    and control Δ and the answer mass. A table saved before this statistic existed says so."""
    r = dict(row)
    if "I_controls" not in r or "mde" not in r:  # an atlas table saved before the null-learned score
        return f"{r.get('class', '?')} (table saved before the null-learned I: recompute it with verdicts.verdicts)"
    tested = not pd.isna(r.get("q_value", np.nan))
    interval = (f"I = {r['I']:+.2f} [{r['I_ci_low']:+.2f}, {r['I_ci_high']:+.2f}]" if tested else
                f"no test: {int(r['n_random'])} random vectors (the test needs ≥ {MIN_RANDOM})")
    mass = mass_note(r["answer_mass"]) or f"; answer mass {r['answer_mass']:.2f}"
    q = f", q = {r['q_value']:.2g}" if tested else ""
    found = "" if r["class"] == "introspection-specific" or not tested else f"; {_mde_words(r)}"
    cover = ("" if r.get("covered", True) or not tested else
             f"; its residual is noisier than every random vector's (noise ratio {r['noise']:.2f}): the rank p-values "
             f"assume it is not")
    if brief:
        return f"{r['class']} ({decided_by(r, alpha=alpha)}; {interval}{q}{found}{cover}{mass})"
    wordings, caveat = _polarity_words(r)
    test = (f"p_random = {r['p_random']:.3g} and p_controls = {r['p_controls']:.3g} by rank against "
            f"{int(r['n_random'])} random vectors (the smallest p possible {r['min_p']:.2g}), q = "
            f"{r['q_value']:.3g} at α = {alpha:g}, over {wordings} and {r['n_controls']} controls{caveat}"
            if tested else interval)
    head = (f"{r['concept']} (layer {r['layer']}): {r['class']} — {decided_by(r, alpha=alpha)}. "
            + (f"The wordings' effect beyond the nulls' prediction {interval} logits at the largest scale "
               f"(beyond the controls' part alone {r['I_controls']:+.2f}; the random vectors' own "
               f"{r['generic']:+.2f}); {test}{found}{cover}" if tested else test))
    line = (f". At scale {r['effect_scale']:g} the controls' line has b = {r['effect_b']:+.2f}, c = "
            f"{r['effect_c']:+.2f} (R² = {r['effect_r2']:.2f}, controls spanning {r['control_span']:.1f} logits"
            f"{'' if r['fit_ok'] else ': degenerate, the slope is not identified'}); the introspection Δ is "
            f"{r['introspection_delta']:+.2f} [{r['introspection_ci_low']:+.2f}, {r['introspection_ci_high']:+.2f}] "
            f"and the control Δ {r['control_delta']:+.2f} [{r['control_ci_low']:+.2f}, "
            f"{r['control_ci_high']:+.2f}]; the contrast S is largest at scale {r['shift_scale']:g}: "
            f"{r['shift']:+.2f} [{r['shift_ci_low']:+.2f}, {r['shift_ci_high']:+.2f}]")
    return head + line + mass + "."
