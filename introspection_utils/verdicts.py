"""Verdicts: every term a reading, a figure or the atlas quotes, defined once — and the calibrated test that tells an
introspection-specific "yes" from a generic push of the logits towards "yes".

Inputs are the tidy sweep tables of :mod:`introspection_utils.sweeps` (``sweeps.COLUMNS``). All quantities are in
logits of the yes − no difference at the answer position.

**Terms** (the words of the write-up, one definition each):

* **delta** Δ_q(v, s): question q's yes − no difference with ``s × v`` injected, minus the same question's own
  no-injection value (its *baseline*).
* **introspection curve** / **control curve**: the mean over the introspection wordings / over the control
  questions, at each scale (or layer) — of yes − no (``curve_table``) or of Δ (``QuestionCurves``).
* **introspection-specific shift** S(s) = mean Δ over the introspection wordings − mean Δ over the controls: how
  much more the injection moves the introspection question(s) than questions that are not about injected thoughts.
  0 when every question moves alike (a pure yes-bias).
* **flip scale** of a curve: the smallest injected scale at which its yes − no difference is > 0 ("yes") while its
  no-injection value is ≤ 0 ("no"). NaN when it never flips — and when the no-injection answer already leans "yes":
  there is nothing to flip.
* **answer mass**: P(yes) + P(no) at the answer position. Where it is below :data:`MIN_ANSWER_MASS` the model is
  mostly about to say something else ("I", "As an AI", …), so a positive yes − no difference is an ordering of two
  unlikely tokens, not an answer: readings then say "yes over no" instead of calling a flip.
* **peak scale** s*: the injected scale with the largest S — the scale the test statistic picks (below).
* **effect scale**: the injected scale where the larger of |introspection Δ| and |control Δ| is largest — where the
  injection does the most; the descriptive classes are read there.

**The test** (one concept at one layer; :func:`shift_test`). Statistic T = max over injected scales of S(s) — scale
selection is part of the statistic, and each null takes the same maximum, so picking the best scale is paid for.

* *question null* (is the introspection question special among questions?): relabel which questions count as
  introspection — all C(m + n, m) relabelings of the m wordings and n controls when there are at most
  :data:`MAX_EXACT` of them, else :data:`N_PERMUTATIONS` random ones (seeded) — and recompute T. ``p_questions``
  = the fraction of relabelings with T at least the observed one (the observed labelling included, so p > 0).
  With one wording and n controls it cannot go below 1 / (n + 1): ask several wordings.
* *random-vector null* (does a direction of the same norm do it too?): T of every norm-matched random vector measured
  at the same layer and scales with the same questions (all concepts' random vectors pooled: each is matched to its
  own concept's norm). ``p_random`` is the one-sided prediction test of a new draw from that population,
  P(t_{R−1} ≥ (T − mean) / (sd · √(1 + 1/R))) — exact for normal T_random, and not limited to 1 / (R + 1) as a rank
  would be (with 50 concepts, Benjamini–Hochberg needs p ≈ 0.001 for a single discovery; a rank among 100 random
  vectors cannot give it). ``random_rank`` = (1 + #{T_random ≥ T}) / (1 + R), the assumption-free version, is
  reported beside it. Fewer than :data:`MIN_RANDOM` random vectors: no random-vector test (p_random NaN).
* ``p_value`` = max(p_questions, p_random): the concept must beat both nulls (an intersection–union test, so the
  level holds). Across concepts, Benjamini–Hochberg ``q_value`` controls the false-discovery rate.

**Classes** (exclusive, decided in this order; t = ``effect_threshold`` logits, α = ``alpha``):

1. ``introspection-specific``: q_value ≤ α (the introspection question moves more than the controls, beyond both
   nulls).
2. ``no effect``: at every injected scale |introspection Δ| < t and |control Δ| < t.
3. at the effect scale, with I and C the introspection and control Δ:
   ``shared suppression`` I ≤ −t and C ≤ −t (both pushed towards "no", e.g. "bomb");
   ``shared yes-shift`` I ≥ t and C ≥ t (both pushed towards "yes": the yes-bias);
   ``opposite`` one ≥ t and the other ≤ −t (e.g. introspection falls while the controls rise);
   ``one-sided`` only one of them moves by ≥ t, and the test did not find it specific.

Calibration: :mod:`introspection_utils.calibration` runs the test on synthetic sweeps whose truth is known; its
false-positive rates and power are asserted in ``tests/test_verdicts.py`` and stated in the README.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from introspection_utils.sweeps import concept_rows

MIN_ANSWER_MASS = 0.5  # below it, "yes over no" is not the model's answer
EFFECT_THRESHOLD = 1.0  # logits: a |delta| below this counts as "no change"
ALPHA = 0.05
CONFIDENCE = 0.95
N_BOOT = 2000
MIN_RANDOM = 3  # random vectors needed for the random-vector null
MAX_EXACT = 20_000  # enumerate every relabeling up to this many
N_PERMUTATIONS = 10_000  # else sample this many
CLASSES = ("introspection-specific", "shared yes-shift", "shared suppression", "opposite", "one-sided", "no effect")
REQUIRED = ["concept", "vector_kind", "vector_seed", "layer", "scale", "question_kind", "question", "logit_diff",
            "baseline_logit_diff", "delta"]


# ------------------------------------------------------------------------------------------------ the curves

def _check_columns(df: pd.DataFrame) -> None:
    missing = set(REQUIRED) - set(df.columns)
    if missing:
        raise ValueError(f"the table lacks columns {sorted(missing)}; pass a sweeps table (sweeps.COLUMNS)")
    if df.empty:
        raise ValueError("the sweep table is empty")


def select(df: pd.DataFrame, concept: str, *, layer: int | None = None, scale: float | None = None
           ) -> pd.DataFrame:
    """The rows of ``concept`` (and of ``layer`` / ``scale`` if given), with one clear error naming what the table
    holds when a value is not in it."""
    sub = concept_rows(df, concept)
    for column, value in (("layer", layer), ("scale", scale)):
        if value is not None:
            if value not in set(sub[column]):
                raise ValueError(f"{column} {value!r} is not in the table ({sorted(sub[column].unique())})")
            sub = sub[sub[column] == value]
    return sub


def _mean_or_nan(rows: pd.DataFrame, x: str, column: str) -> pd.Series:
    if column not in rows.columns:
        return pd.Series(np.nan, index=pd.Index(sorted(rows[x].unique()), name=x), dtype=float)
    return rows.groupby(x)[column].mean()


def curve_table(df: pd.DataFrame, concept: str, *, x: str = "scale", layer: int | None = None,
                scale: float | None = None, y: str = "logit_diff", baseline: str = "baseline_logit_diff"
                ) -> pd.DataFrame:
    """The introspection and control curves of one concept, per value of ``x`` ("scale" or "layer" for sweep
    tables — pass the other one when the table holds several values of it; "lens_layer" for logit-lens tables with
    ``y="lens_diff"``, ``baseline="baseline_lens_diff"``).

    Columns: ``introspection`` (mean ``y`` over the wordings), ``control_mean``, ``control_std`` and ``n_controls``
    (over control questions), ``n_wordings``; ``random_introspection`` / ``random_control`` (mean over random
    vectors; NaN without them); the no-injection values ``introspection_baseline`` and ``control_baseline``;
    ``shift`` (the introspection-specific shift S); ``introspection_mass`` and ``control_mass`` (mean answer mass;
    NaN for tables saved before it was measured).
    """
    sub = select(df, concept, layer=layer, scale=scale)
    if x in ("scale", "layer"):
        other = "layer" if x == "scale" else "scale"
        if sub[other].nunique() > 1:
            raise ValueError(f"the table holds several {other}s ({sorted(sub[other].unique())}); pass {other}=")
    out = pd.DataFrame(index=pd.Index(sorted(sub[x].unique()), name=x))
    for kind, prefix in (("concept", ""), ("random", "random_")):
        rows = sub[sub["vector_kind"] == kind]
        intro = rows[rows["question_kind"] == "introspection"].groupby([x, "question"])[y].mean()
        control = rows[rows["question_kind"] == "control"].groupby([x, "question"])[y].mean()
        out[prefix + "introspection"] = intro.groupby(level=0).mean()
        out[prefix + ("control_mean" if kind == "concept" else "control")] = control.groupby(level=0).mean()
        if kind == "concept":
            out["control_std"] = control.groupby(level=0).std(ddof=0)
            out["n_controls"] = control.groupby(level=0).size()
            out["n_wordings"] = intro.groupby(level=0).size()
    concept_rows_ = sub[sub["vector_kind"] == "concept"]
    for kind in ("introspection", "control"):
        rows = concept_rows_[concept_rows_["question_kind"] == kind]
        out[f"{kind}_baseline"] = rows.groupby(x)[baseline].mean() if len(rows) else np.nan
        out[f"{kind}_mass"] = _mean_or_nan(rows, x, "answer_mass") if len(rows) else np.nan
    out["shift"] = ((out["introspection"] - out["introspection_baseline"])
                    - (out["control_mean"] - out["control_baseline"]))
    return out


def random_curves(df: pd.DataFrame, concept: str, *, x: str = "scale", y: str = "logit_diff"
                  ) -> dict[int, pd.DataFrame]:
    """Each random vector's curves (``introspection``, ``control``: means over wordings / controls), by seed."""
    sub = select(df, concept)
    out = {}
    for seed, rows in sub[sub["vector_kind"] == "random"].groupby("vector_seed"):
        per_question = rows.groupby(["question_kind", x, "question"])[y].mean()
        out[int(seed)] = pd.DataFrame({kind: per_question.loc[kind].groupby(level=0).mean()
                                       for kind in ("introspection", "control") if kind in per_question.index})
    return out


def question_table(df: pd.DataFrame, concept: str, *, x: str = "scale", y: str = "logit_diff",
                   question_kind: str = "control") -> pd.DataFrame:
    """One column per question of ``question_kind`` (concept vector), indexed by ``x``: the per-question curves
    that :func:`curve_table` averages (``y``: "logit_diff" or "delta")."""
    sub = select(df, concept)
    rows = sub[(sub["vector_kind"] == "concept") & (sub["question_kind"] == question_kind)]
    return rows.pivot_table(index=x, columns="question", values=y)


def flip_scale(x: Sequence[float], logit_diff: Sequence[float], baseline: float) -> float:
    """The smallest injected ``x`` (≠ 0) at which ``logit_diff [S]`` is > 0 ("yes") while the no-injection
    ``baseline`` is ≤ 0 ("no"); NaN if it never flips or the baseline already leans yes (nothing to flip)."""
    x, logit_diff = np.asarray(x, float), np.asarray(logit_diff, float)
    if baseline > 0:
        return float("nan")
    hits = (x != 0) & (logit_diff > 0)
    return float(np.sort(x[hits])[0]) if hits.any() else float("nan")


def mass_note(mass: float) -> str:
    """How to word a yes − no reading at answer mass ``mass`` (P(yes) + P(no)): empty when it is a real answer."""
    if np.isnan(mass) or mass >= MIN_ANSWER_MASS:
        return ""
    return (f" (answer mass P(yes)+P(no) = {mass:.2f} < {MIN_ANSWER_MASS}: yes over no, not the model's answer "
            f"— it would mostly say something else)")


# ----------------------------------------------------------------------------------------- per-question arrays

@dataclass(frozen=True)
class QuestionCurves:
    """One vector's Δ per question at one layer: ``x [S]`` (ascending), ``delta [Q, S]``, ``logit [Q, S]``,
    ``baseline [Q]``, ``mass [Q, S]`` (NaN if not measured), ``is_intro [Q]`` (bool), ``questions [Q]``."""

    x: np.ndarray
    delta: np.ndarray
    logit: np.ndarray
    baseline: np.ndarray
    mass: np.ndarray
    is_intro: np.ndarray
    questions: tuple[str, ...]

    @property
    def injected(self) -> np.ndarray:
        """``[S]`` bool: the injected points (x ≠ 0; at 0 every Δ is 0 by definition)."""
        return self.x != 0

    def shift(self, is_intro: np.ndarray | None = None) -> np.ndarray:
        """S per x ``[S]`` under a labelling (default the real one): mean intro Δ − mean control Δ."""
        lab = self.is_intro if is_intro is None else is_intro
        return self.delta[lab].mean(axis=0) - self.delta[~lab].mean(axis=0)

    def group_delta(self, intro: bool) -> np.ndarray:
        """``[S]``: mean Δ over the introspection wordings (``True``) or the controls (``False``)."""
        return self.delta[self.is_intro == intro].mean(axis=0)

    @classmethod
    def synthetic(cls, x: Sequence[float], delta: np.ndarray, n_intro: int, *, baseline: float = -2.0
                  ) -> QuestionCurves:
        """Hand-made or simulated curves: ``delta [Q, S]`` with the first ``n_intro`` rows the introspection
        wordings (baseline the same for every question; mass unmeasured)."""
        delta = np.asarray(delta, float)
        q = delta.shape[0]
        is_intro = np.arange(q) < n_intro
        return cls(np.asarray(x, float), delta, delta + baseline, np.full(q, baseline), np.full(delta.shape, np.nan),
                   is_intro, tuple(f"q{i}" for i in range(q)))


def question_curves(df: pd.DataFrame, *, x: str = "scale") -> dict[tuple[str, int, str, int | None], QuestionCurves]:
    """Split a sweep table into :class:`QuestionCurves`, keyed by ``(concept, layer, vector_kind, vector_seed)``
    (``x="layer"``: keyed by ``(concept, scale, …)`` instead). Questions are in a fixed (sorted) order within each
    kind so a concept and its random vectors line up."""
    _check_columns(df)
    other = "layer" if x == "scale" else "scale"
    out = {}
    for key, group in df.groupby(["concept", other, "vector_kind", "vector_seed"], dropna=False, sort=True):
        concept, at, kind, seed = key
        seed = None if pd.isna(seed) else int(seed)
        order = group.sort_values(["question_kind", "question"], ascending=[False, True])
        logit = order.pivot_table(index="question", columns=x, values="logit_diff", sort=False)
        if logit.isna().any().any():
            raise ValueError(f"{concept!r} {other} {at} ({kind}): the questions were measured at different {x}s")
        questions = list(dict.fromkeys(order["question"]))
        logit = logit.loc[questions]
        kinds = order.drop_duplicates("question").set_index("question").loc[questions, "question_kind"]
        is_intro = (kinds == "introspection").to_numpy()
        if not is_intro.any() or is_intro.all():
            raise ValueError(f"{concept!r} {other} {at} ({kind}): needs introspection and control questions")
        base = order.groupby("question")["baseline_logit_diff"].mean().loc[questions].to_numpy(float)
        delta = order.pivot_table(index="question", columns=x, values="delta", sort=False).loc[questions]
        mass = (order.pivot_table(index="question", columns=x, values="answer_mass", sort=False).loc[questions]
                .to_numpy(float) if "answer_mass" in order.columns else np.full(logit.shape, np.nan))
        out[(concept, at.item() if hasattr(at, "item") else at, kind, seed)] = QuestionCurves(
            logit.columns.to_numpy(float), delta.to_numpy(float), logit.to_numpy(float), base, mass, is_intro,
            tuple(questions))
    return out


# ----------------------------------------------------------------------------------------------------- the test

def relabelings(n_questions: int, n_intro: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """``([P, Q] bool, exact)``: every choice of ``n_intro`` of ``n_questions`` questions as "introspection" (exact)
    when there are at most :data:`MAX_EXACT`, else :data:`N_PERMUTATIONS` random ones."""
    if math.comb(n_questions, n_intro) <= MAX_EXACT:
        masks = np.zeros((math.comb(n_questions, n_intro), n_questions), bool)
        for row, chosen in enumerate(itertools.combinations(range(n_questions), n_intro)):
            masks[row, list(chosen)] = True
        return masks, True
    order = np.argsort(rng.random((N_PERMUTATIONS, n_questions)), axis=1)
    masks = np.zeros((N_PERMUTATIONS, n_questions), bool)
    np.put_along_axis(masks, order[:, :n_intro], True, axis=1)
    return masks, False


def max_shift(delta: np.ndarray, masks: np.ndarray, injected: np.ndarray) -> np.ndarray:
    """T = max over injected x of S for each labelling: ``delta [Q, S]``, ``masks [P, Q]`` → ``[P]``."""
    m = masks.sum(axis=1, keepdims=True)
    shift = masks @ delta / m - (~masks) @ delta / (masks.shape[1] - m)  # [P, S]
    return shift[:, injected].max(axis=1)


def shift_test(concept: QuestionCurves, randoms: Sequence[QuestionCurves] = (), *, rng: np.random.Generator | int = 0
               ) -> dict[str, float]:
    """The calibrated test of one concept (see the module docstring): ``statistic`` T, ``peak_scale`` s*,
    ``p_questions``, ``p_random`` and ``random_rank`` (NaN with fewer than :data:`MIN_RANDOM` random vectors: then
    ``p_value`` is 1 — no verdict without the random-vector null), ``p_value``, ``n_relabelings``, ``exact`` (1.0 when
    every relabeling was enumerated)."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    injected = concept.injected
    if not injected.any():
        raise ValueError("the test needs at least one injected scale (x ≠ 0)")
    shift = concept.shift()
    peak = int(np.flatnonzero(injected)[np.argmax(shift[injected])])
    t_obs = float(shift[peak])
    masks, exact = relabelings(len(concept.is_intro), int(concept.is_intro.sum()), rng)
    t_perm = max_shift(concept.delta, masks, injected)
    tol = 1e-9 * max(1.0, abs(t_obs))
    hits = int((t_perm >= t_obs - tol).sum())
    p_questions = hits / len(masks) if exact else (1 + hits) / (1 + len(masks))
    p_random = rank = float("nan")
    if len(randoms) >= MIN_RANDOM:
        for r in randoms:
            if not (np.array_equal(r.x, concept.x) and r.questions == concept.questions):
                raise ValueError("the random vectors were measured at other scales or with other questions")
        t_rand = np.array([r.shift()[r.injected].max() for r in randoms])
        n = len(t_rand)
        rank = float((1 + (t_rand >= t_obs - tol).sum()) / (1 + n))
        spread = t_rand.std(ddof=1) * math.sqrt(1 + 1 / n)
        p_random = float(stats.t.sf((t_obs - t_rand.mean()) / spread, n - 1)) if spread > 0 else float(
            t_obs <= t_rand.mean())
    p_value = max(p_questions, p_random) if not math.isnan(p_random) else 1.0
    return {"statistic": t_obs, "peak_scale": float(concept.x[peak]), "p_questions": float(p_questions),
            "p_random": p_random, "random_rank": rank, "p_value": float(p_value), "n_relabelings": float(len(masks)),
            "exact": float(exact)}


def _one_concept(df: pd.DataFrame, concept: str, layer: int | None) -> tuple[QuestionCurves, list[QuestionCurves]]:
    sub = select(df, concept, layer=layer)
    if sub["layer"].nunique() > 1:
        raise ValueError(f"the table holds several layers ({sorted(sub['layer'].unique())}); pass layer=")
    at = int(sub["layer"].iloc[0])
    curves = question_curves(df[df["layer"] == at])
    return curves[(concept, at, "concept", None)], [q for k, q in curves.items() if k[2] == "random"]


def peak_scale(df: pd.DataFrame, concept: str, *, layer: int | None = None) -> float:
    """The peak scale s* of ``concept`` in a scale sweep: the injected scale with the largest
    introspection-specific shift S (the scale :func:`shift_test` picks; every notebook probes there)."""
    concept_curves, _ = _one_concept(df, concept, layer)
    shift, injected = concept_curves.shift(), concept_curves.injected
    return float(concept_curves.x[np.flatnonzero(injected)[np.argmax(shift[injected])]])


def concept_test(df: pd.DataFrame, concept: str, *, layer: int | None = None, seed: int = 0) -> dict[str, float]:
    """:func:`shift_test` of one concept of a scale sweep, against the random vectors measured at its layer."""
    concept_curves, randoms = _one_concept(df, concept, layer)
    at = int(select(df, concept, layer=layer)["layer"].iloc[0])
    return shift_test(concept_curves, randoms, rng=concept_rng(seed, concept, at))


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) ``[n]``, in the input order."""
    p = np.asarray(p_values, float)
    n = len(p)
    if n == 0:
        return p
    order = np.argsort(p)
    ranked = p[order] * n / np.arange(1, n + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    out = np.empty(n)
    out[order] = q
    return out


def bootstrap_interval(concept: QuestionCurves, index: int, *, rng: np.random.Generator, n_boot: int = N_BOOT,
                       level: float = CONFIDENCE) -> dict[str, float]:
    """Percentile intervals at x index ``index`` of S, the introspection Δ and the control Δ, resampling the
    wordings and the controls (each within its group, with replacement)."""
    intro = concept.delta[concept.is_intro, index]
    control = concept.delta[~concept.is_intro, index]
    bi = intro[rng.integers(0, len(intro), (n_boot, len(intro)))].mean(axis=1)
    bc = control[rng.integers(0, len(control), (n_boot, len(control)))].mean(axis=1)
    a = (1 - level) / 2
    q = lambda v: np.quantile(v, [a, 1 - a])  # noqa: E731
    (s_lo, s_hi), (i_lo, i_hi), (c_lo, c_hi) = q(bi - bc), q(bi), q(bc)
    return {"shift_ci_low": s_lo, "shift_ci_high": s_hi, "introspection_ci_low": i_lo, "introspection_ci_high": i_hi,
            "control_ci_low": c_lo, "control_ci_high": c_hi}


def effect_index(concept: QuestionCurves) -> int:
    """Index of the effect scale: the injected x where max(|introspection Δ|, |control Δ|) is largest."""
    size = np.maximum(np.abs(concept.group_delta(True)), np.abs(concept.group_delta(False)))
    injected = np.flatnonzero(concept.injected)
    return int(injected[np.argmax(size[injected])])


def classify(concept: QuestionCurves, q_value: float, *, alpha: float = ALPHA,
             effect_threshold: float = EFFECT_THRESHOLD) -> str:
    """The class of a concept (rules and order in the module docstring)."""
    if q_value <= alpha:
        return "introspection-specific"
    intro, control = concept.group_delta(True), concept.group_delta(False)
    inj, t = concept.injected, effect_threshold
    if np.all(np.abs(intro[inj]) < t) and np.all(np.abs(control[inj]) < t):
        return "no effect"
    e = effect_index(concept)
    i, c = intro[e], control[e]
    if i <= -t and c <= -t:
        return "shared suppression"
    if i >= t and c >= t:
        return "shared yes-shift"
    if (i >= t and c <= -t) or (i <= -t and c >= t):
        return "opposite"
    return "one-sided"


def concept_rng(seed: int, concept: str, layer: int) -> np.random.Generator:
    """The Generator of one (concept, layer): its numbers do not depend on the other concepts in the table."""
    return np.random.default_rng([int(seed), zlib.crc32(concept.encode()), int(layer)])


ATLAS_COLUMNS = ["model", "concept", "layer", "n_wordings", "n_controls", "n_random", "peak_scale", "shift",
                 "shift_ci_low", "shift_ci_high", "p_questions", "p_random", "random_rank", "p_value", "q_value",
                 "effect_scale", "introspection_delta", "introspection_ci_low", "introspection_ci_high",
                 "control_delta", "control_ci_low", "control_ci_high", "introspection_flip", "control_flip",
                 "answer_mass", "baseline_answer_mass", "low_mass", "class"]


def verdicts(df: pd.DataFrame, *, alpha: float = ALPHA, effect_threshold: float = EFFECT_THRESHOLD,
             n_boot: int = N_BOOT, level: float = CONFIDENCE, seed: int = 0) -> pd.DataFrame:
    """One row per (concept, layer) of a scale-sweep table: the test, its corrections, intervals, flips, answer mass
    and class (columns :data:`ATLAS_COLUMNS`), sorted by q-value then shift.

    ``peak_scale``/``shift`` with its interval: where S is largest; ``effect_scale`` with the introspection and
    control Δ and their intervals: where the injection does the most; ``answer_mass``: mean P(yes)+P(no) of the
    introspection wordings at the peak scale (``baseline_answer_mass`` without injection), ``low_mass`` when it is
    below :data:`MIN_ANSWER_MASS`. Random vectors at a layer form that layer's null (pooled over concepts).
    """
    if effect_threshold <= 0:
        raise ValueError("effect_threshold must be > 0 (logits)")
    if not 0 < alpha < 1 or not 0 < level < 1:
        raise ValueError(f"alpha {alpha} and level {level} must be in (0, 1)")
    curves = question_curves(df)
    rows = []
    for (concept, layer, kind, _), c in curves.items():
        if kind != "concept":
            continue
        randoms = [r for (_, lr, k, _), r in curves.items() if k == "random" and lr == layer]
        rng = concept_rng(seed, concept, layer)
        test = shift_test(c, randoms, rng=rng)
        peak = int(np.flatnonzero(c.x == test["peak_scale"])[0])
        effect = effect_index(c)
        ci = bootstrap_interval(c, effect, rng=rng, n_boot=n_boot, level=level)
        shift_ci = bootstrap_interval(c, peak, rng=rng, n_boot=n_boot, level=level)
        intro_logit, control_logit = c.logit[c.is_intro].mean(axis=0), c.logit[~c.is_intro].mean(axis=0)
        mass = float(np.nanmean(c.mass[c.is_intro, peak])) if np.isfinite(c.mass).any() else float("nan")
        sub = df[(df["concept"] == concept) & (df["layer"] == layer) & (df["vector_kind"] == "concept")
                 & (df["question_kind"] == "introspection")]
        base_mass = float(sub["baseline_answer_mass"].mean()) if "baseline_answer_mass" in sub else float("nan")
        rows.append({
            "model": df["model"].iloc[0] if "model" in df else "", "concept": concept, "layer": int(layer),
            "n_wordings": int(c.is_intro.sum()), "n_controls": int((~c.is_intro).sum()), "n_random": len(randoms),
            "peak_scale": test["peak_scale"], "shift": test["statistic"],
            "shift_ci_low": shift_ci["shift_ci_low"], "shift_ci_high": shift_ci["shift_ci_high"],
            "p_questions": test["p_questions"], "p_random": test["p_random"], "random_rank": test["random_rank"],
            "p_value": test["p_value"],
            "effect_scale": float(c.x[effect]), "introspection_delta": float(c.group_delta(True)[effect]),
            "introspection_ci_low": ci["introspection_ci_low"], "introspection_ci_high": ci["introspection_ci_high"],
            "control_delta": float(c.group_delta(False)[effect]),
            "control_ci_low": ci["control_ci_low"], "control_ci_high": ci["control_ci_high"],
            "introspection_flip": flip_scale(c.x, intro_logit, float(c.baseline[c.is_intro].mean())),
            "control_flip": flip_scale(c.x, control_logit, float(c.baseline[~c.is_intro].mean())),
            "answer_mass": mass, "baseline_answer_mass": base_mass,
            "low_mass": bool(mass < MIN_ANSWER_MASS) if not np.isnan(mass) else False,
        })
    if not rows:
        raise ValueError("the table has no concept-vector rows (vector_kind == 'concept')")
    out = pd.DataFrame(rows)
    out["q_value"] = benjamini_hochberg(out["p_value"])
    out["class"] = [classify(curves[(r.concept, r.layer, "concept", None)], r.q_value, alpha=alpha,
                             effect_threshold=effect_threshold) for r in out.itertuples()]
    return out[ATLAS_COLUMNS].sort_values(["q_value", "shift", "concept"], ascending=[True, False, True],
                                          ignore_index=True)


def class_counts(table: pd.DataFrame) -> pd.Series:
    """How many concepts fall in each class (every class listed, zeros included)."""
    return table["class"].value_counts().reindex(list(CLASSES), fill_value=0)


def random_null(df: pd.DataFrame) -> pd.DataFrame:
    """T (the max-over-scales shift) of every vector of a scale-sweep table: ``concept, layer, vector_kind,
    vector_seed, statistic`` — the random rows are the random-vector null the concepts are tested against."""
    rows = [{"concept": c, "layer": layer, "vector_kind": k, "vector_seed": s,
             "statistic": float(q.shift()[q.injected].max())}
            for (c, layer, k, s), q in question_curves(df).items()]
    out = pd.DataFrame(rows)
    out["vector_seed"] = out["vector_seed"].astype("Int64")
    return out


def describe_verdict(row: pd.Series | dict, *, alpha: float = ALPHA) -> str:
    """One sentence on one concept's verdict (a row of :func:`verdicts`), with its p-values, interval and mass."""
    r = dict(row)
    head = (f"{r['concept']} (layer {r['layer']}): {r['class']} — largest introspection-specific shift S = "
            f"{r['shift']:+.2f} at scale {r['peak_scale']:g} ({CONFIDENCE:.0%} CI {r['shift_ci_low']:+.2f} to "
            f"{r['shift_ci_high']:+.2f}; p_questions = {r['p_questions']:.3g} over {r['n_wordings']} wordings and "
            f"{r['n_controls']} controls, p_random = {r['p_random']:.3g} against {r['n_random']} random vectors, "
            f"q = {r['q_value']:.3g} at α = {alpha:g})")
    body = (f"; at scale {r['effect_scale']:g} the introspection Δ is {r['introspection_delta']:+.2f} "
            f"[{r['introspection_ci_low']:+.2f}, {r['introspection_ci_high']:+.2f}] and the control Δ "
            f"{r['control_delta']:+.2f} [{r['control_ci_low']:+.2f}, {r['control_ci_high']:+.2f}]")
    return head + body + (mass_note(r["answer_mass"]) or f"; answer mass {r['answer_mass']:.2f}") + "."
