"""The verdicts: each definition on hand-built cases with known answers, the test's nulls computed by hand, the
classes' rules, the atlas on a tidy table and on a tiny-model sweep, and the calibration on synthetic sweeps (rates
printed: run with ``-s`` to see them)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from statsmodels.stats.multitest import multipletests

from introspection_utils.core.paths import project_root, read_block
from introspection_utils.engine import prompts
from introspection_utils.engine.vectors import VectorBank
from introspection_utils.experiments import atlas as metrics
from introspection_utils.experiments import sweeps
from introspection_utils.experiments.sweeps import COLUMNS
from introspection_utils.readings import sentences as readings
from introspection_utils.stats import definitions, line_test, synthetic_calibration, verdicts
from introspection_utils.stats.definitions import (
    QuestionCurves,
    flip_scale,
    question_curves,
    statistic_weights,
)

SCALES = [0.0, 1.0, 2.0, 4.0]
N_RANDOM = 100  # random vectors in the hand-built atlas: a rank p-value reaches 1/101, so 4 concepts can pass BH
SPREAD = [-3.0, -1.0, 1.0, 3.0, 5.0, -2.0, 0.0, 2.0]  # control baselines spanning 8 logits (cycled)


def _table(concepts: dict[str, tuple[list[list[float]], int]], *, randoms: list[list[list[float]]] = (),
           baseline: float | list[float] = -2.0, mass: float = 0.9, polarity: list[int] | None = None,
           with_polarity: bool = True) -> pd.DataFrame:
    """A tidy sweep table from per-question deltas at the injected SCALES[1:]: ``concepts`` maps a name to
    ``(deltas [Q, 3], n_wordings)``; ``randoms``: deltas of random vectors (same questions), under concept 'r';
    ``baseline``: one for every question or one per question; ``polarity``: one ±1 per wording (default +1);
    ``with_polarity=False`` leaves the column out (a table saved before it existed)."""
    rows = []

    def add(concept, kind, seed, deltas, n_wordings):
        base = np.broadcast_to(np.asarray(baseline, float), (len(deltas),))
        for q, per_scale in enumerate(deltas):
            question_kind = "introspection" if q < n_wordings else "control"
            sign = (polarity[q] if polarity else 1) if q < n_wordings else 0
            for scale, delta in zip(SCALES, [0.0, *per_scale], strict=True):
                rows.append({"model": "hand", "concept": concept, "vector_kind": kind, "vector_seed": seed,
                             "vector_norm": 1.0, "layer": 3, "scale": scale, "question_kind": question_kind,
                             "question": f"{question_kind}-{q}", "question_about": "self", "polarity": sign,
                             "expected": "yes" if sign >= 0 else "no", "answer_format": "open",
                             "logit_diff": base[q] + delta, "baseline_logit_diff": base[q], "delta": delta,
                             "answer_mass": mass, "baseline_answer_mass": mass,
                             "null_kind": "isotropic" if kind == "random" else "", "effective_strength": scale,
                             "relative_strength": scale})

    for name, (deltas, n_wordings) in concepts.items():
        add(name, "concept", None, deltas, n_wordings)
    first = next(iter(concepts.values()))
    for k, deltas in enumerate(randoms):
        add("r", "random", k, deltas, first[1])
    columns = list(dict.fromkeys([*COLUMNS, "polarity"]))  # COLUMNS may already hold it (and other tags: NaN here)
    df = pd.DataFrame(rows).reindex(columns=columns if with_polarity else [c for c in columns if c != "polarity"])
    df["vector_seed"] = df["vector_seed"].astype("Int64")
    return df


def _scaled(slopes: list[float]) -> list[list[float]]:
    return [[s * x for x in SCALES[1:]] for s in slopes]


def _spread(n_wordings: int, n_controls: int, wording: float = -1.0) -> list[float]:
    """Baselines: the wordings at ``wording``, the controls spread over SPREAD."""
    return [wording] * n_wordings + [SPREAD[k % len(SPREAD)] for k in range(n_controls)]


def _residual_by_hand(delta: np.ndarray, base: np.ndarray, roles: np.ndarray) -> np.ndarray:
    """I per column of ``delta [Q, S]``: np.polyfit over the controls, then the wordings' signed mean residual."""
    controls, wordings = roles == 0, roles != 0
    out = []
    for d in delta.T:
        c, b = np.polyfit(base[controls], d[controls], 1)
        out.append(np.mean(roles[wordings] * (d[wordings] - b - c * base[wordings])))
    return np.array(out)


# ---------------------------------------------------------------------------------------------------- definitions

def test_flip_scale_needs_a_no_baseline_and_a_yes_answer():
    assert flip_scale(SCALES, [-2.0, -1.0, 0.5, 2.0], -2.0) == 2.0
    assert math.isnan(flip_scale(SCALES, [-2.0, -1.0, -0.5, -0.1], -2.0))  # never flips
    assert math.isnan(flip_scale(SCALES, [0.5, 1.0, 2.0, 3.0], 0.5))  # already yes: nothing to flip
    assert flip_scale([0.0, 1.0], [1.0, 1.0], 0.0) == 1.0  # scale 0 is never a flip


def test_curve_table_means_and_shift_by_hand():
    deltas = [[1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]  # 2 wordings, 2 controls
    c = definitions.curve_table(_table({"x": (deltas, 2)}), "x")
    assert list(c["introspection"]) == pytest.approx([-2.0, 0.0, 1.0, 2.0])
    assert list(c["control_mean"]) == pytest.approx([-2.0, -2.0, -1.5, -1.0])
    assert list(c["shift"]) == pytest.approx([0.0, 2.0, 2.5, 3.0])
    assert (c["n_wordings"] == 2).all() and (c["n_controls"] == 2).all()
    assert (c["introspection_mass"] == 0.9).all()
    # every baseline the same: the controls' line is b alone, so I = S here, and the fit is flagged degenerate
    assert list(c["residual"]) == pytest.approx(list(c["shift"])) and not c["fit_ok"].any()
    assert list(c["predicted"]) == pytest.approx(list(c["introspection"] - c["residual"]))


def test_answer_mass_below_the_threshold_is_said():
    assert definitions.mass_note(0.9) == ""
    assert "yes over no, not the model's answer" in definitions.mass_note(0.12)


def test_question_curves_order_and_labels():
    deltas = [[1.0, 2.0, 3.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]
    curves = question_curves(_table({"x": (deltas, 1)}))
    c = curves[("x", 3, "concept", None)]
    assert c.is_intro.tolist() == [True, False, False] and c.delta.shape == (3, 4)
    assert c.shift().tolist() == pytest.approx([0.0, 1.0, 1.5, 2.0])
    assert c.polarity.tolist() == [1, 0, 0]


def test_statistic_weights_are_the_least_squares_residual():
    """I = weights @ Δ equals the wordings' signed mean residual from np.polyfit's line over the controls, for one
    labelling and for many at once; S's weights give mean wording Δ − mean control Δ."""
    rng = np.random.default_rng(1)
    base, delta = rng.normal(0, 2, 9), rng.normal(0, 1, (9, 4))
    roles = np.array([1, -1, 1, 0, 0, 0, 0, 0, 0])
    assert statistic_weights(base, roles) @ delta == pytest.approx(_residual_by_hand(delta, base, roles))
    many = np.array([roles, np.roll(roles, 3), np.roll(roles, 5)])
    by_hand = np.array([_residual_by_hand(delta, base, r) for r in many])
    assert statistic_weights(base, many) @ delta == pytest.approx(by_hand)
    s = statistic_weights(base, roles, "S") @ delta
    assert s == pytest.approx(delta[:3].mean(axis=0) - delta[3:].mean(axis=0))
    flat = statistic_weights(np.full(9, 0.5), roles) @ delta  # no spread: the line is b alone
    assert flat == pytest.approx((roles[:3, None] * (delta[:3] - delta[3:].mean(axis=0))).mean(axis=0))
    with pytest.raises(ValueError, match="choose one of"):
        statistic_weights(base, roles, "T")


def test_shared_shift_compression_and_a_balanced_bias_cancel_in_I_but_not_in_S():
    base = np.array(_spread(4, 8))
    s = np.array(SCALES)
    line = 0.7 * s[None, :] - 0.15 * np.outer(base, s)  # a shared push and compression: Δ = b(s) + c(s)·x
    polarity = [1, 1, -1, -1]
    c = QuestionCurves.synthetic(SCALES, line, 4, baseline=base, polarity=polarity)
    assert c.residual() == pytest.approx(np.zeros(4), abs=1e-12)
    assert c.fit()["b"] == pytest.approx(0.7 * s) and c.fit()["c"] == pytest.approx(-0.15 * s)
    assert (c.shift()[1:] > 0.2).all()  # the wordings start lower than the controls: compression lifts S
    biased = line.copy()
    biased[:4] += 0.4 * s  # every wording, both polarities, pushed towards yes more than the controls
    b = QuestionCurves.synthetic(SCALES, biased, 4, baseline=base, polarity=polarity)
    assert b.residual() == pytest.approx(np.zeros(4), abs=1e-12)
    planted = line.copy()
    planted[:4] += 0.4 * np.outer(polarity, s)  # detect wordings up, inverted down: towards reporting detection
    p = QuestionCurves.synthetic(SCALES, planted, 4, baseline=base, polarity=polarity)
    assert p.residual() == pytest.approx(0.4 * s)
    assert p.group_delta(True) - p.predicted() == pytest.approx(p.residual())


def test_polarity_defaults_for_old_tables_and_is_read_from_new_ones():
    deltas = _scaled([1.0, -1.0, 0.0, 0.1, -0.1, 0.0])
    old = _table({"x": (deltas, 2)}, with_polarity=False, baseline=_spread(2, 4))
    new = _table({"x": (deltas, 2)}, polarity=[1, -1], baseline=_spread(2, 4))
    assert question_curves(old)[("x", 3, "concept", None)].polarity.tolist() == [1, 1, 0, 0, 0, 0]
    c = question_curves(new)[("x", 3, "concept", None)]
    assert c.polarity.tolist() == [1, -1, 0, 0, 0, 0]
    assert c.group_delta(True)[1:] == pytest.approx(np.array(SCALES[1:]))  # the inverted one fell: detection
    table = definitions.curve_table(new, "x")
    assert list(table["residual"]) == pytest.approx(list(c.residual()))
    with pytest.raises(ValueError, match="polarity"):
        question_curves(new.assign(polarity=new["polarity"].replace(-1, 2)))


# -------------------------------------------------------------------------------------------------------- the test

def test_question_null_p_value_by_enumeration():
    """p_questions by hand: every choice of which questions are wordings and which of those are inverted, I refitted
    each time (np.polyfit), the max over injected scales compared with the observed one."""
    rng = np.random.default_rng(0)
    base = rng.normal(0, 2, 7)
    delta = np.c_[np.zeros(7), rng.normal(size=(7, 2))]
    c = QuestionCurves.synthetic([0.0, 1.0, 2.0], delta, n_intro=3, baseline=base, polarity=[1, -1, 1])
    t_obs = c.residual()[1:].max()
    by_hand = []
    for chosen in itertools.combinations(range(7), 3):
        for negative in chosen:
            roles = np.zeros(7, int)
            roles[list(chosen)] = 1
            roles[negative] = -1
            by_hand.append(_residual_by_hand(delta, base, roles)[1:].max())
    expected = np.mean(np.array(by_hand) >= t_obs - 1e-12)
    test = line_test.shift_test(c)
    assert test["exact"] == 1.0 and test["n_relabelings"] == math.comb(7, 3) * 3 == len(by_hand)
    assert test["p_questions"] == pytest.approx(expected)
    assert test["p_value"] == 1.0 and math.isnan(test["p_random"])  # no random vectors, no verdict


def test_sampled_relabelings_keep_the_sign_pattern():
    roles = np.array([1, 1, -1, -1] + [0] * 16)  # C(20, 4)·C(4, 2) > MAX_EXACT: sampled
    sampled, exact = line_test.relabelings(roles, np.random.default_rng(0))
    assert not exact and sampled.shape == (line_test.N_PERMUTATIONS, 20)
    assert ((sampled == 1).sum(axis=1) == 2).all() and ((sampled == -1).sum(axis=1) == 2).all()
    assert (sampled[:, :4] == -1).any() and (sampled[:, 4:] != 0).any()  # signs and positions both move


def test_one_wording_cannot_go_below_one_over_n_plus_one():
    delta = np.zeros((11, 2))
    delta[0, 1] = 10.0  # the single wording moves far more than any control
    test = line_test.shift_test(QuestionCurves.synthetic([0.0, 1.0], delta, n_intro=1, baseline=_spread(1, 10)))
    assert test["p_questions"] == pytest.approx(1 / 11)


def test_random_null_is_a_prediction_test_against_the_random_vectors():
    base = _spread(1, 4)

    def curves(t):
        return QuestionCurves.synthetic([0.0, 1.0], np.array([[0, t]] + [[0, 0.0]] * 4), n_intro=1, baseline=base)

    c = curves(3.0)
    randoms = [curves(t) for t in (0.0, 1.0, 2.0, 1.0)]
    test = line_test.shift_test(c, randoms)
    t_rand = np.array([0.0, 1.0, 2.0, 1.0])
    z = (3.0 - t_rand.mean()) / (t_rand.std(ddof=1) * math.sqrt(1 + 1 / 4))
    from scipy import stats

    assert test["p_random"] == pytest.approx(stats.t.sf(z, 3))
    assert test["random_rank"] == pytest.approx(1 / 5)
    assert test["p_value"] == max(test["p_questions"], test["p_random"])
    with pytest.raises(ValueError, match="other scales or with other questions"):
        line_test.shift_test(c, [QuestionCurves.synthetic([0.0, 2.0], np.zeros((5, 2)), n_intro=1)] * 3)


@pytest.mark.parametrize("baseline,n_controls", [(-2.0, 6), (None, 2)])
def test_a_degenerate_line_is_said_but_the_test_does_not_need_it(baseline, n_controls):
    """Controls without spread (all at −2) or too few of them: the controls' line is not identified, which the
    sentence says; the verdict's test (the nulls' prediction) runs regardless."""
    slopes = [3.0, 3.0] + [0.0] * n_controls
    base = baseline if baseline is not None else _spread(2, n_controls)
    rng = np.random.default_rng(0)
    randoms = [_scaled(rng.normal(0, 0.05, len(slopes))) for _ in range(30)]
    df = _table({"x": (_scaled(slopes), 2)}, randoms=randoms, baseline=base)
    c = question_curves(df)[("x", 3, "concept", None)]
    assert not c.fit_ok
    row = verdicts.verdicts(df, n_boot=100, mde=False).iloc[0]
    assert not row["fit_ok"] and row["p_random"] == pytest.approx(1 / 31)
    words = verdicts.describe_verdict(row)
    assert "degenerate" in words and "no test" not in words


def test_too_few_random_vectors_run_no_test_and_print_no_q():
    """Below MIN_RANDOM random vectors there is no test: p and q are NaN, the class comes from the descriptive rules,
    and no sentence prints a q."""
    concepts, randoms, base = _atlas_cases()
    df = _table({"sandwich": concepts["sandwich"]}, randoms=randoms[:verdicts.MIN_RANDOM - 1], baseline=base)
    row = verdicts.verdicts(df, n_boot=50).iloc[0]
    assert np.isnan(row["q_value"]) and np.isnan(row["p_value"]) and row["class"] != "introspection-specific"
    for brief in (True, False):
        words = verdicts.describe_verdict(row, brief=brief)
        assert "no test" in words and "q =" not in words
    assert "No test was run" in metrics.summary(verdicts.verdicts(df, n_boot=50), df)


def test_benjamini_hochberg_matches_statsmodels():
    p = np.array([0.001, 0.04, 0.03, 0.5, 0.2, 0.011])
    assert verdicts.benjamini_hochberg(p) == pytest.approx(multipletests(p, method="fdr_bh")[1])


def _class_case(name: str) -> QuestionCurves:
    base = np.array(_spread(2, 6))
    s = np.array(SCALES)
    kappa = 1 - np.exp(-s / 2)
    squeeze = -0.9 * np.outer(base, kappa)  # compression: |c|·max|x| reaches 4 logits
    delta = {"shared yes-shift": np.outer(np.ones(8), s) + 0.05 * squeeze,
             "shared suppression": -np.outer(np.ones(8), s),
             "compression": squeeze,
             "opposite": squeeze + np.outer([-0.8, -0.8] + [0.0] * 6, s),
             "one-sided": np.outer([0.8, 0.8] + [0.05, -0.05] * 3, s),
             "no effect": np.outer([0.1, 0.05] + [0.0, 0.02] * 3, s)}[name]
    return QuestionCurves.synthetic(SCALES, delta, 2, baseline=base)


@pytest.mark.parametrize("name", ["shared yes-shift", "shared suppression", "compression", "opposite", "one-sided",
                                  "no effect"])
def test_each_class_rule_on_hand_built_curves(name):
    c = _class_case(name)
    score = {"opposite": -2.0, "one-sided": 2.0}.get(name, 0.0)  # the verdict's I enters the classes on its own
    assert verdicts.classify(c, q_value=1.0, I=score) == name
    assert verdicts.classify(c, q_value=0.01, I=score) == "introspection-specific"  # the test decides first
    # beyond the controls, by at least the threshold, but not beyond random vectors: an injection detector
    assert verdicts.classify(c, q_value=0.5, q_controls=0.01, I_controls=1.5, I=score) == "injection detector"
    assert verdicts.classify(c, q_value=0.5, q_controls=0.01, I_controls=0.5, I=score) == name


# ------------------------------------------------------------------------------------------------------ the atlas

def _atlas_cases():
    rng = np.random.default_rng(3)
    base = _spread(4, 8)
    squeeze = [-0.6 * x for x in base]  # compression: Δ = −0.6·x per unit scale
    # random vectors of every size: a shared push b ∈ [−1.5, 1.5] and compression up to 1.5× the squeeze's, so the
    # nulls' prediction covers what the concepts do to the controls
    randoms = [_scaled(rng.uniform(-1.5, 1.5) + rng.normal(0, 0.05, 12) + rng.uniform(0, 1.5) * np.array(squeeze))
               for _ in range(N_RANDOM)]
    concepts = {
        "sandwich": (_scaled([2.0, 2.1, 1.9, 2.0] + [0.1, 0.0, 0.05, 0.1] * 2), 4),  # only the wordings move
        "water": (_scaled([1.0, 1.05, 0.95, 1.0] + [1.0, 1.02, 0.98, 1.0] * 2), 4),  # everything moves alike
        "bomb": (_scaled([-1.0, -1.1, -0.9, -1.0] + [-1.0, -1.05, -0.95, -1.0] * 2), 4),
        "squeeze": (_scaled([q + e for q, e in zip(squeeze, rng.normal(0, 0.02, 12), strict=True)]), 4),
    }
    return concepts, randoms, base


def test_atlas_classes_pvalues_and_reproducibility():
    concepts, randoms, base = _atlas_cases()
    df = _table(concepts, randoms=randoms, baseline=base)
    table = verdicts.verdicts(df, n_boot=300, mde=False)
    assert list(table.columns) == verdicts.ATLAS_COLUMNS
    got = dict(zip(table["concept"], table["class"], strict=True))
    assert got == {"sandwich": "introspection-specific", "water": "shared yes-shift", "bomb": "shared suppression",
                   "squeeze": "compression"}
    by = table.set_index("concept")
    sandwich = by.loc["sandwich"]
    # beyond every random vector and beyond the controls: the smallest rank p-value the 100 random vectors allow
    assert sandwich["p_random"] == sandwich["p_controls"] == pytest.approx(1 / (N_RANDOM + 1)) == sandwich["min_p"]
    assert sandwich["I_ci_low"] > 0 and sandwich["n_random"] == N_RANDOM and sandwich["covered"]
    assert sandwich["fit_ok"] and sandwich["control_span"] == pytest.approx(8.0)
    assert sandwich["answer_mass"] == pytest.approx(0.9) and not sandwich["low_mass"]
    # compression alone: S is large (the wordings start lower than the controls), I is ~0 and the test is not fooled
    squeeze = by.loc["squeeze"]
    assert squeeze["shift"] > 3.0 and abs(squeeze["I"]) < 0.3 and squeeze["q_value"] > 0.05
    assert squeeze["effect_c"] == pytest.approx(-0.6 * 4, abs=0.1) and squeeze["effect_r2"] > 0.99
    assert table["concept"].iloc[0] == "sandwich"  # ranked by q-value
    assert table.equals(verdicts.verdicts(df, n_boot=300, mde=False))
    text = metrics.summary(table, df)
    assert ("4 concepts at layer 3: 1 introspection-specific, 0 injection detector, 1 shared yes-shift, 1 shared "
            "suppression, 1 compression") in text
    assert "'sandwich' is introspection-specific" in text
    # the atlas's summary words each specific concept by the one function that words a verdict
    assert f"'sandwich' is {verdicts.describe_verdict(sandwich, brief=True)}." in text
    assert verdicts.describe_verdict(sandwich, brief=True).startswith(
        f"introspection-specific (q = {sandwich['q_value']:.2g} ≤ 0.05: I = {sandwich['I']:+.2f} beyond random vectors")
    none = metrics.summary(table[table["concept"] != "sandwich"], df)
    best = table[table["concept"] != "sandwich"].iloc[0]
    assert f"the smallest q-value is '{best['concept']}': {verdicts.describe_verdict(best, brief=True)}." in none
    assert "saved before the null-learned I" in verdicts.describe_verdict(sandwich.drop("I_controls"), brief=True)
    words = verdicts.describe_verdict(sandwich.to_dict() | {"concept": "sandwich"})
    assert "introspection-specific" in words and "I = +" in words and "contrast S" in words
    assert "with no inverted wording" in words  # one polarity only: the sentence says what that cannot rule out
    # every "no" states what the atlas could have found; a "yes" does not need to
    water = by.loc["water"].to_dict() | {"concept": "water"}
    assert "MDE" in verdicts.describe_verdict(water | {"mde": 0.5}, brief=True) and "MDE" not in words
    # the sentence shows the value its class was decided by (b at the effect scale for a shared yes-shift)
    assert f"b = {water['effect_b']:+.2f} ≥ 1 at scale {water['effect_scale']:g}" in verdicts.describe_verdict(water)


def test_bootstrap_interval_of_I_covers_it():
    concepts, randoms, base = _atlas_cases()
    c = question_curves(_table(concepts, randoms=randoms, baseline=base))[("sandwich", 3, "concept", None)]
    ci = line_test.bootstrap_interval(c, 3, rng=np.random.default_rng(0), n_boot=500)
    assert ci["I_ci_low"] <= c.residual()[3] <= ci["I_ci_high"]
    assert ci["shift_ci_low"] <= c.shift()[3] <= ci["shift_ci_high"]


def test_bootstrap_point_estimate_is_the_table_I_and_S():
    """A resample that draws every question once is the table: its I and S are the verdict table's (the bootstrap
    computes them with the one definition, definitions.statistic_weights, and no arithmetic of its own)."""
    concepts, randoms, base = _atlas_cases()
    df = _table(concepts, randoms=randoms, baseline=base)
    table = verdicts.verdicts(df, n_boot=50, mde=False).set_index("concept")
    curves = question_curves(df)
    for concept in concepts:
        c, row = curves[(concept, 3, "concept", None)], table.loc[concept]
        ones = np.ones((1, len(c.questions)))
        at_shift = int(np.flatnonzero(c.x == row["shift_scale"])[0])
        effect = int(np.flatnonzero(c.x == row["effect_scale"])[0])
        assert line_test.resampled(c, effect, ones)["I"][0] == pytest.approx(c.residual()[effect], abs=1e-12)
        assert line_test.resampled(c, at_shift, ones)["S"][0] == pytest.approx(row["shift"], abs=1e-12)
        point = line_test.resampled(c, effect, ones)
        assert point["introspection"][0] == pytest.approx(row["introspection_delta"], abs=1e-12)
        assert point["control"][0] == pytest.approx(row["control_delta"], abs=1e-12)


def test_a_resample_is_the_statistic_of_its_questions_drawn_again():
    """A resample's I and S equal those of the questions listed as often as they are drawn (np.polyfit by hand)."""
    concepts, randoms, base = _atlas_cases()
    c = question_curves(_table(concepts, randoms=randoms, baseline=base))[("squeeze", 3, "concept", None)]
    counts = line_test.resample_counts(c, rng=np.random.default_rng(5), n_boot=20)
    assert counts.shape == (20, len(c.questions)) and (counts[:, c.is_intro].sum(1) == c.is_intro.sum()).all()
    stats = line_test.resampled(c, 2, counts)
    for b, k in enumerate(counts.astype(int)):
        rows = np.repeat(np.arange(len(k)), k)
        d, x, roles = c.delta[rows, 2:3], c.baseline[rows], c.polarity[rows]
        assert stats["I"][b] == pytest.approx(_residual_by_hand(d, x, roles)[0], abs=1e-9)
        assert stats["S"][b] == pytest.approx(d[roles != 0].mean() - d[roles == 0].mean(), abs=1e-12)
    with pytest.raises(ValueError, match="counts of shape"):
        statistic_weights(c.baseline, c.polarity, "I", counts=-np.ones(len(c.questions)))


def test_random_null_and_its_medians_hold_I_and_S():
    concepts, randoms, base = _atlas_cases()
    df = _table(concepts, randoms=randoms, baseline=base)
    null = verdicts.random_null(df)
    assert {"statistic", "shift"} <= set(null.columns) and len(null) == 4 + N_RANDOM
    row = null[(null["concept"] == "squeeze")].iloc[0]
    assert row["shift"] > 3.0 and abs(row["statistic"]) < 0.3
    medians = verdicts.null_medians(null)
    assert medians["random_I"] == pytest.approx(null.loc[null["vector_kind"] == "random", "statistic"].median())
    assert medians["random_S"] > medians["random_I"] and medians["n_random"] == N_RANDOM


def test_a_concept_whose_random_vectors_do_the_same_is_not_specific():
    concepts, _, base = _atlas_cases()
    same = ([_scaled([2.0, 2.1, 1.9, 2.0] + [0.1, 0.0, 0.05, 0.1] * 2)] * 3
            + [_scaled([1.9, 2.0, 2.0, 1.9] + [0.0] * 8)] * 3)
    table = verdicts.verdicts(_table({"sandwich": concepts["sandwich"]}, randoms=same, baseline=base), n_boot=200,
                              mde=False)
    assert table["class"].iloc[0] != "introspection-specific" and table["p_random"].iloc[0] > 0.1


def test_low_answer_mass_is_flagged():
    concepts, randoms, base = _atlas_cases()
    df = _table(concepts, randoms=randoms, mass=0.1, baseline=base)
    table = verdicts.verdicts(df, n_boot=100, mde=False)
    assert table["low_mass"].all()
    assert "below 0.5" in metrics.summary(table, df)


def test_atlas_rejects_tables_without_controls_or_concepts():
    concepts, randoms, base = _atlas_cases()
    df = _table(concepts, randoms=randoms, baseline=base)
    with pytest.raises(ValueError, match="introspection and control questions"):
        verdicts.verdicts(df[df["question_kind"] != "control"])
    with pytest.raises(ValueError, match="no concept-vector rows"):
        verdicts.verdicts(df[df["vector_kind"] != "concept"])
    with pytest.raises(ValueError, match="lacks columns"):
        verdicts.verdicts(df.drop(columns=["delta"]))


def test_readings_use_the_peak_scale_and_the_one_flip_definition():
    deltas = _scaled([1.0, 0.1, 0.1, 0.2])  # one wording, three controls; intro crosses 0 at scale 4
    df = _table({"X": (deltas, 1)}, baseline=[-2.0, -3.0, -1.0, 1.0])
    assert readings.flip_scale(df, "X") == 4.0 and readings.flip_scale(df, "X", question_kind="control") is None
    scale, why = readings.choose_scale(df, "X")
    assert scale == line_test.peak_scale(df, "X") == 4.0
    assert "flips to yes at scale 4" in why and "control mean never flips" in why
    assert "line residual" in why and "controls' line predicts" in why
    text = readings.describe_scale_sweep(df, "X")
    assert "No test: the table holds 0 random vectors" in text
    assert "residual beyond the controls' line" in text and "S = " in text
    low = _table({"X": (deltas, 1)}, mass=0.1, baseline=[-2.0, -3.0, -1.0, 1.0])
    assert "not the model's answer" in readings.choose_scale(low, "X")[1]
    assert "puts yes over no at scale 4, but its answer mass there is 0.10: not a flip" in readings.choose_scale(
        low, "X")[1]
    assert "crosses zero" not in readings.describe_scale_sweep(low, "X")


def test_run_atlas_on_a_tiny_model(tiny_llama, tmp_path):
    g = torch.Generator().manual_seed(5)
    bank = VectorBank(("Dust", "Satellites"), torch.randn(2, 2, tiny_llama.arch.d_model, generator=g),
                      model=tiny_llama.name)
    table, sweep = metrics.run_atlas(tiny_llama, ["Dust", "Satellites"], [1.0, 4.0], layer=0, n_controls=2,
                                     n_random=2, bank=bank, n_boot=100, progress=False, results_dir=tmp_path)
    assert sorted(table["concept"]) == ["Dust", "Satellites"]
    assert set(table["class"]) <= set(verdicts.CLASSES)
    assert (table["n_wordings"] == len(prompts.default_wordings())).all()
    assert set(sweep.df["question_about"]) == {"self", "world"}
    assert sweep.df["answer_mass"].between(0, 1).all() and (tmp_path / "atlas.csv").is_file()
    with pytest.raises(ValueError, match="random-vector null needs at least 3"):
        metrics.run_atlas(tiny_llama, ["Dust"], [1.0], layer=0, n_random=1, bank=bank, progress=False)
    # another answer format's atlas sits beside the open turn's, never over it
    binary, _ = metrics.run_atlas(tiny_llama, ["Dust", "Satellites"], [4.0], layer=0, n_controls=2, n_random=2,
                                  bank=bank, n_boot=100, progress=False, results_dir=tmp_path, answer_format="binary")
    assert (tmp_path / "atlas_binary.csv").is_file() and (tmp_path / "atlas_binary_sweep.csv").is_file()
    assert set(pd.read_csv(tmp_path / "atlas_binary_sweep.csv")["answer_format"]) == {"binary"}
    assert set(pd.read_csv(tmp_path / "atlas_sweep.csv")["answer_format"]) == {"open"}
    assert [metrics.atlas_name(f) for f in prompts.ANSWER_FORMATS] == ["atlas", "atlas_binary", "atlas_prefill"]
    with pytest.raises(ValueError, match=r"answer_format must be one of \['open', 'binary', 'prefill'\], got 'yes'"):
        metrics.atlas_name("yes")


# ------------------------------------------------------------------------------------------------- calibration

def test_calibration_false_positives_and_power():
    """≥ 1,000 synthetic concepts per scenario: a shared shift, a question-specific bias, compression (alone and with
    a shift), a relabelled control and 'random vectors alike' are called introspection-specific at most at the
    nominal rate after Benjamini–Hochberg; uncorrected, within binomial error of α except where the concept vectors
    carry a confound their random vectors lack (twice the compression; a push on self questions — the documented
    limit of a null learned from random vectors); random vectors that share the effect make injection
    detectors; a planted effect is found with the stated power; S is fooled by compression and by the bias."""
    table = synthetic_calibration.calibrate(n_concepts=1000, progress=False).set_index("scenario")
    print("\ncalibration (α = 0.05, 2 detect + 2 inverted wordings, 10 controls, 2 random vectors, atlases of 50):")
    print(table[["called", "p_below_alpha", "detector", "S_called", "S_p_below_alpha", "truth"]].to_string())
    margin = synthetic_calibration.binomial_margin(0.05, 1000)  # 3 standard errors at n = 1000: 0.021
    for scenario in synthetic_calibration.FALSE_POSITIVE_SCENARIOS:
        assert table.loc[scenario, "called"] <= 0.05, scenario
        if scenario not in ("compression + shift", "question-specific bias"):
            assert table.loc[scenario, "p_below_alpha"] <= 0.05 + margin, scenario
    assert table.loc["random vectors alike", "detector"] >= 0.8
    for scenario in ("compression", "compression + shift", "question-specific bias"):
        assert table.loc[scenario, "S_p_below_alpha"] > 0.05 + margin, scenario  # S is fooled
    assert table.loc["planted δ=0.1", "called"] >= 0.6
    assert table.loc["planted δ=0.05", "called"] < table.loc["planted δ=0.25", "called"]
    # docs/verdicts.md's table is this run's (deterministic: the same seed gives the same numbers)
    assert read_block(project_root() / synthetic_calibration.CALIBRATION_DOC,
                      "calibration") == synthetic_calibration.markdown(table.reset_index())


def test_planted_compression_on_smollm_is_not_introspection(smollm):
    """A real forward pass with compression planted and no introspection anywhere: hooks pull the final yes and no
    logits towards each other whenever the residual entering layer L + 1 carries a concept direction (strength
    growing with its projection, up to 95%). The atlas must see a line with c ≈ −1 over the controls, an I near 0, and
    not call it introspection-specific."""
    from introspection_utils.engine.prompts import yes_no_ids
    from introspection_utils.engine.vectors import concept_vectors

    concepts, layer = ["Sandwich", "Bomb"], 20
    bank = concept_vectors(smollm, concepts, progress=False)
    units = torch.stack([bank.get(c, layer).vector for c in concepts]).float()
    norm = float(units.norm(dim=1).mean())
    units = units / units.norm(dim=1, keepdim=True)
    yes, no = yes_no_ids(smollm)
    squeeze = {}

    def carries_concept(module, args):
        proj = (args[0][:, -1, :].float() @ units.T).max(dim=1).values / norm  # in units of ‖v‖
        squeeze["g"] = (1 - torch.exp(-(proj - 1.5).clamp(min=0) / 1.5)).clamp(max=0.95)

    def compress(module, args, out):
        g = squeeze["g"].to(out.dtype)
        y, n = out[:, -1, yes].clone(), out[:, -1, no].clone()
        mid = (y + n) / 2
        out[:, -1, yes], out[:, -1, no] = mid + (1 - g) * (y - mid), mid + (1 - g) * (n - mid)
        return out

    hooks = [smollm.layers[layer + 1]._module.register_forward_pre_hook(carries_concept),
             smollm.lm_head._module.register_forward_hook(compress)]
    controls = sweeps.pick_controls(sweeps.control_battery(smollm), 12)  # spread baselines: the line is identified
    try:
        table, sweep = metrics.run_atlas(smollm, concepts, [8.0], layer=layer, n_controls=12, n_random=2, bank=bank,
                                         n_boot=200, progress=False, controls=controls)
    finally:
        for hook in hooks:
            hook.remove()
    print("\n" + table[["concept", "I", "effect_c", "effect_r2", "p_random", "p_controls", "q_value", "shift",
                         "class"]].to_string())
    assert table["fit_ok"].all() and (table["effect_c"] < -0.8).all() and (table["effect_r2"] > 0.95).all()
    # the hooks compress the paper's Yes/No pair; the readout sums every spelling, so part of the push can read as a
    # shared shift — what must never happen is an introspection verdict
    assert "introspection-specific" not in set(table["class"])
    assert set(table["class"]) <= {"compression", "shared suppression", "shared yes-shift"}


def test_the_default_atlas_on_the_embedded_model_runs_a_test(smollm, tmp_path, monkeypatch):
    """The first run a newcomer makes: the default controls come from the embedded model's own battery (cached per
    model), so they span its answers and the controls' line is identified; the verdict's test runs (q-values, an
    MDE), and a second pick reads the cached battery instead of asking the model again."""
    monkeypatch.setattr(metrics, "cache_dir", lambda: tmp_path)
    picked = metrics.default_controls(smollm, 12)
    assert len(picked) == 12 and len(set(picked)) == 12
    monkeypatch.setattr(metrics, "control_battery", lambda *a, **k: pytest.fail("the battery was asked again"))
    assert metrics.default_controls(smollm, 12) == picked
    table, sweep = metrics.run_atlas(smollm, ["Sandwich", "Bomb"], [4.0, 8.0], n_random=2, n_boot=50,
                                     progress=False)
    assert set(sweep.df.loc[sweep.df["question_kind"] == "control", "question"]) == set(picked)
    assert table["fit_ok"].all() and table["control_span"].min() >= definitions.MIN_CONTROL_SPAN
    assert table["q_value"].notna().all() and table["p_random"].notna().all()
    assert "no test" not in verdicts.describe_verdict(table.iloc[0])
