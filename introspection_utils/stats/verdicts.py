"""Verdicts: the calibrated test that tells an introspection-specific answer from a generic push of the logits (a
shared "yes", every answer drawn towards indifference, or a report of *any* injection), the classes, and one sentence
per verdict.

**The test** (all concepts of one layer at once; :func:`verdicts`, :func:`layer_test`) is
:func:`introspection_utils.stats.introspection_score.score_test`: each wording's response to a generic perturbation is
learned from the random (null) vectors — its loadings on the controls' Δ — and I is what the wordings do beyond that
prediction, signed by polarity (logits at the largest scale). ``p_random`` ranks a concept's score among the random
vectors' out-of-sample scores (beyond random vectors); ``p_controls`` ranks its score beyond the controls' part alone
(beyond the controls); ``p_value`` is the larger, and Benjamini–Hochberg across the table's concepts gives
``q_value`` (and ``q_controls``). Every row carries the atlas's MDE (:func:`introspection_score.atlas_mde`: the
smallest I called for 80% of its concepts, on its own noise) and the smallest p its random vectors allow, so a
"no" says what it could have found. Under :data:`MIN_RANDOM` random vectors: no test (NaN p and q; no q printed).

**Classes** (exclusive, decided in this order by :func:`classify`; t = ``effect_threshold`` logits, α = ``alpha``):

1. ``introspection-specific``: q_value ≤ α (beyond random vectors and beyond the controls).
2. ``injection detector``: q_controls ≤ α and I beyond the controls' part alone ≥ t, but not beyond random vectors:
   the wordings report an injection for any vector — a detector that is not concept-specific.
3. ``no effect``: at every injected scale |b| and the line's compression push |c|·max|x_q| are < t, and |I| < t.
4. ``opposite``: I ≤ −t. 5. ``one-sided``: I ≥ t, and the test did not find it specific.
6. ``shared yes-shift``: b ≥ t at the effect scale (every question pushed towards "yes").
7. ``shared suppression``: b ≤ −t there (all pushed towards "no", e.g. "bomb").
8. ``compression``: otherwise — the answers drawn towards indifference, the wordings with them.

b and c are the controls' line Δ = b + c·x (:mod:`.definitions`), read at the **effect scale** (where
|b| or |c|·max|x_q| is largest); they describe, the test decides. :func:`decided_by` words the values a class was
decided by, and :func:`describe_verdict` is the one place a row is put into words.

**The controls'-line test it replaced** — :func:`.line_test.shift_test`: T = max over scales of the line's residual
(or of the contrast S), a relabelling null over which questions are wordings and a t-tail prediction test against the
random vectors — is kept for the contrast S (the synthetic calibration shows why S does not decide) and as the
comparison column of :mod:`.plasmode`'s table; it decides nothing.

**Other contrasts that are not the verdict.** ``mechanisms``, ``patching`` and ``attribution`` decompose the
difference-in-differences "introspection effect − mean control effect" at one scale: that is S at one scale (weights
1/m on the wordings, −1/n on the controls; :func:`introspection_utils.stats.shifts.specific`), a linear target that
attribution can split into components exactly; their maps locate where S is made, which includes any compression.
``readings.top_heads``' ``introspection_minus_control`` is an attention difference, not a logit one.

Calibration: :mod:`.plasmode` on the model's own sweeps and :mod:`.synthetic_calibration` on synthetic sweeps whose
truth is known; their tables are in ``docs/verdicts.md``, held by ``tests/test_plasmode.py`` and
``tests/test_verdicts.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from introspection_utils.stats.definitions import (
    MIN_ANSWER_MASS,
    QuestionCurves,
    flip_scale,
    question_curves,
)
from introspection_utils.stats.introspection_score import (
    HETEROGENEITIES,
    MIN_NULLS,
    QuestionDesign,
    atlas_mde,
    benjamini_hochberg,
    population_p,
    score_test,
)
from introspection_utils.stats.line_test import CONFIDENCE, N_BOOT, bootstrap_interval, concept_rng, peak_index

EFFECT_THRESHOLD = 1.0  # logits: a |delta| below this counts as "no change"
ALPHA = 0.05
MIN_RANDOM = MIN_NULLS  # random vectors needed for the random-vector null
CLASSES = ("introspection-specific", "injection detector", "shared yes-shift", "shared suppression", "compression",
           "opposite", "one-sided", "no effect")


# ----------------------------------------------------------------------------------------------------- the test

def movement(concept: QuestionCurves) -> dict[str, np.ndarray]:
    """What the injection does to the questions at each x ``[S]``, on the controls' line: ``b`` (shared push), ``c``
    (slope), ``r2``, ``compression`` (the line's push on the most extreme control, |c|·max|x_q|) and ``size`` (the
    larger of |b| and compression). The descriptive classes are read at the effect scale, where ``size`` is largest;
    the verdict's I (:mod:`.introspection_score`) is not a per-scale quantity and enters the classes on its own."""
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
    scale; :func:`introspection_score.score_test`). NaN q-values (no test) never decide a class."""
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


ATLAS_COLUMNS = ["model", "concept", "layer", "n_wordings", "n_inverted", "n_controls", "n_random", "control_span",
                 "fit_ok", "I", "I_ci_low", "I_ci_high", "I_controls", "generic", "p_random", "p_controls", "p_value",
                 "q_value", "q_controls", "min_p", "covered", "noise", "mde", "population_p", "shift_scale", "shift",
                 "shift_ci_low", "shift_ci_high", "effect_scale", "introspection_delta", "introspection_ci_low",
                 "introspection_ci_high", "control_delta", "control_ci_low", "control_ci_high", "effect_b",
                 "effect_c", "effect_r2", "introspection_flip", "control_flip", "answer_mass", "baseline_answer_mass",
                 "low_mass", "class"]


def layer_test(concepts: Sequence[QuestionCurves], randoms: Sequence[QuestionCurves], *,
               groups: Sequence[str] | None = None, alpha: float = ALPHA, mde: bool = True,
               heterogeneity: float | Sequence[float] = HETEROGENEITIES) -> dict[str, object] | None:
    """:func:`introspection_score.score_test` of one layer's concepts against its random vectors (each vector's injected
    scales; ``groups``: each random vector's concept — one concept's random vectors are left out together), with the
    atlas's MDE and the population test (``heterogeneity``: see :func:`verdicts`); None with fewer than
    :data:`MIN_RANDOM` random vectors (no test)."""
    if len(randoms) < MIN_RANDOM:
        return None
    first = concepts[0]
    if any(c.questions != first.questions or not np.array_equal(c.x, first.x) for c in [*concepts, *randoms]):
        raise ValueError("the random vectors were measured at other scales or with other questions")
    inj = first.injected
    design = QuestionDesign(
        wordings=np.flatnonzero(first.is_intro), controls=np.flatnonzero(~first.is_intro),
        polarity=first.polarity[first.is_intro].astype(int), baseline=first.baseline.astype(float),
        scales=first.x[inj].astype(float))
    concept_delta, null_delta = (np.stack([v.delta[:, inj] for v in vs]) for vs in (concepts, randoms))
    groups = None if groups is None else np.asarray(groups)
    test = score_test(concept_delta, null_delta, design, groups=groups, heterogeneity=heterogeneity)
    return {"test": test, "design": design, "mde": atlas_mde(concept_delta, null_delta, design, groups=groups,
                                                             alpha=alpha, heterogeneity=heterogeneity)
            if mde else float("nan"), "population_p": population_p(test.z, test.null_z)}


def verdicts(df: pd.DataFrame, *, alpha: float = ALPHA, effect_threshold: float = EFFECT_THRESHOLD,
             n_boot: int = N_BOOT, level: float = CONFIDENCE, seed: int = 0, mde: bool = True,
             heterogeneity: float | Sequence[float] = HETEROGENEITIES) -> pd.DataFrame:
    """One row per (concept, layer) of a scale-sweep table: the test (:func:`introspection_score.score_test`), its
    corrections, the controls' line at the effect scale, S, flips, answer mass and class (columns
    :data:`ATLAS_COLUMNS`), sorted by q-value then I.

    ``I`` (logits at the largest scale: the effect that would leave the concept at its nulls' median z) with
    ``I_ci_low``/``I_ci_high`` (the same at the nulls' out-of-sample quantiles), ``I_controls`` (beyond the controls'
    part alone), ``generic`` (the nulls' own response beyond the controls, same units); ``p_random`` (beyond random
    vectors, by rank), ``p_controls`` (beyond the controls), ``p_value`` (the larger), ``q_value`` and ``q_controls``
    (Benjamini–Hochberg across concepts), ``min_p`` (1 / (R + 1): the smallest p R random vectors allow), ``covered``,
    ``noise`` (the concept's residual noise within the nulls' range), ``mde`` (the atlas's smallest I called for 80%
    of its concepts, on its own noise: :func:`introspection_score.atlas_mde`; ``mde=False`` skips it),
    ``population_p`` (are the concepts as a group beyond their nulls); ``shift_scale``, ``shift`` (S, the write-up's
    contrast) and its interval; ``effect_scale`` (where the controls' line moves most: the descriptive classes are
    read there) with the (signed) introspection and control Δ, their intervals, ``effect_b``, ``effect_c``,
    ``effect_r2``; ``control_span`` and ``fit_ok`` (the line's identification — descriptive only);
    ``answer_mass`` (mean P(yes)+P(no) of the wordings at the largest scale, ``baseline_answer_mass`` without
    injection; ``low_mass`` below :data:`MIN_ANSWER_MASS`). Random vectors at a layer form that layer's null (pooled
    over concepts). With fewer than :data:`MIN_RANDOM` of them no test is run: the p- and q-values are NaN.
    ``heterogeneity``: the effect's spread across wordings the weights allow for (0: the same on every wording), or
    the alternatives the test takes the largest z over (default :data:`introspection_score.HETEROGENEITIES`)."""
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
        tested = layer_test(concepts, randoms, groups=[k[0] for k in null_keys], alpha=alpha, mde=mde,
                            heterogeneity=heterogeneity)
        nan = np.full(len(concepts), np.nan)
        if tested is not None:
            test = tested["test"]
            top = test.top_scale
            lo, hi = np.quantile(test.null_z, [(1 + level) / 2, (1 - level) / 2])  # in units of each score's sd
            I, I_lo, I_hi = test.I, test.effect_at(lo) * top, test.effect_at(hi) * top  # noqa: E741, N806
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


def describe_test(df: pd.DataFrame, concept: str, *, layer: int) -> str:
    """The verdict's test of ``concept`` in words (:func:`verdicts` on the table's concepts and random
    vectors at ``layer``, without the MDE): I beyond the nulls' prediction and its two rank p-values, or why no
    test was run."""
    at = df[df["layer"] == layer]
    n_random = int(at.loc[at["vector_kind"] == "random", ["concept", "vector_seed"]].drop_duplicates().shape[0])
    if n_random < MIN_RANDOM:
        return (f"No test: the table holds {n_random} random vectors at layer {layer} (the test needs "
                f"≥ {MIN_RANDOM}).")
    row = verdicts(at, n_boot=1, mde=False).set_index("concept").loc[concept]
    return (f"The verdict's test: I = {row['I']:+.2f} [{row['I_ci_low']:+.2f}, {row['I_ci_high']:+.2f}] beyond the "
            f"random vectors' prediction, p_random = {row['p_random']:.3g} and p_controls = {row['p_controls']:.3g} "
            f"by rank against {n_random} random vectors (the smallest p they allow is {row['min_p']:.2g}).")


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
    low = not pd.isna(r["answer_mass"]) and r["answer_mass"] < MIN_ANSWER_MASS
    mass = (f"; answer mass {r['answer_mass']:.2f} < {MIN_ANSWER_MASS:g}: yes over no, not the model's answer" if low
            else f"; answer mass {r['answer_mass']:.2f}")
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
