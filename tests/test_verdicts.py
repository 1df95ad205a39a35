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

from introspection_utils import calibration, metrics, readings, verdicts
from introspection_utils.paths import project_root, read_block
from introspection_utils.sweeps import COLUMNS
from introspection_utils.vectors import VectorBank
from introspection_utils.verdicts import QuestionCurves

SCALES = [0.0, 1.0, 2.0, 4.0]


def _table(concepts: dict[str, tuple[list[list[float]], int]], *, randoms: list[list[list[float]]] = (),
           baseline: float = -2.0, mass: float = 0.9) -> pd.DataFrame:
    """A tidy sweep table from per-question deltas at the injected SCALES[1:]: ``concepts`` maps a name to
    ``(deltas [Q, 3], n_wordings)``; ``randoms``: deltas of random vectors (same questions), under concept 'r'."""
    rows = []

    def add(concept, kind, seed, deltas, n_wordings):
        for q, per_scale in enumerate(deltas):
            question_kind = "introspection" if q < n_wordings else "control"
            for scale, delta in zip(SCALES, [0.0, *per_scale], strict=True):
                rows.append({"model": "hand", "concept": concept, "vector_kind": kind, "vector_seed": seed,
                             "vector_norm": 1.0, "layer": 3, "scale": scale, "question_kind": question_kind,
                             "question": f"{question_kind}-{q}", "question_about": "self",
                             "polarity": int(question_kind == "introspection"),
                             "expected": "yes" if question_kind == "introspection" else "no", "answer_format": "open",
                             "logit_diff": baseline + delta, "baseline_logit_diff": baseline, "delta": delta,
                             "answer_mass": mass, "baseline_answer_mass": mass})

    for name, (deltas, n_wordings) in concepts.items():
        add(name, "concept", None, deltas, n_wordings)
    first = next(iter(concepts.values()))
    for k, deltas in enumerate(randoms):
        add("r", "random", k, deltas, first[1])
    df = pd.DataFrame(rows)[COLUMNS]
    df["vector_seed"] = df["vector_seed"].astype("Int64")
    return df


def _scaled(slopes: list[float]) -> list[list[float]]:
    return [[s * x for x in SCALES[1:]] for s in slopes]


# ---------------------------------------------------------------------------------------------------- definitions

def test_flip_scale_needs_a_no_baseline_and_a_yes_answer():
    assert verdicts.flip_scale(SCALES, [-2.0, -1.0, 0.5, 2.0], -2.0) == 2.0
    assert math.isnan(verdicts.flip_scale(SCALES, [-2.0, -1.0, -0.5, -0.1], -2.0))  # never flips
    assert math.isnan(verdicts.flip_scale(SCALES, [0.5, 1.0, 2.0, 3.0], 0.5))  # already yes: nothing to flip
    assert verdicts.flip_scale([0.0, 1.0], [1.0, 1.0], 0.0) == 1.0  # scale 0 is never a flip


def test_curve_table_means_and_shift_by_hand():
    deltas = [[1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]  # 2 wordings, 2 controls
    c = verdicts.curve_table(_table({"x": (deltas, 2)}), "x")
    assert list(c["introspection"]) == pytest.approx([-2.0, 0.0, 1.0, 2.0])
    assert list(c["control_mean"]) == pytest.approx([-2.0, -2.0, -1.5, -1.0])
    assert list(c["shift"]) == pytest.approx([0.0, 2.0, 2.5, 3.0])
    assert (c["n_wordings"] == 2).all() and (c["n_controls"] == 2).all()
    assert (c["introspection_mass"] == 0.9).all()


def test_answer_mass_below_the_threshold_is_said():
    assert verdicts.mass_note(0.9) == ""
    assert "yes over no, not the model's answer" in verdicts.mass_note(0.12)


def test_question_curves_order_and_labels():
    deltas = [[1.0, 2.0, 3.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]
    curves = verdicts.question_curves(_table({"x": (deltas, 1)}))
    c = curves[("x", 3, "concept", None)]
    assert c.is_intro.tolist() == [True, False, False] and c.delta.shape == (3, 4)
    assert c.shift().tolist() == pytest.approx([0.0, 1.0, 1.5, 2.0])


# -------------------------------------------------------------------------------------------------------- the test

def test_question_null_p_value_by_enumeration():
    rng = np.random.default_rng(0)
    delta = rng.normal(size=(6, 3))
    c = QuestionCurves.synthetic([0.0, 1.0, 2.0], np.c_[np.zeros(6), delta[:, :2]], n_intro=2)
    t_obs = c.shift()[1:].max()
    by_hand = []
    for chosen in itertools.combinations(range(6), 2):
        mask = np.isin(np.arange(6), chosen)
        by_hand.append(c.shift(mask)[1:].max())
    expected = np.mean(np.array(by_hand) >= t_obs - 1e-12)
    test = verdicts.shift_test(c)
    assert test["exact"] == 1.0 and test["n_relabelings"] == 15
    assert test["p_questions"] == pytest.approx(expected)
    assert test["p_value"] == 1.0 and math.isnan(test["p_random"])  # no random vectors, no verdict


def test_one_wording_cannot_go_below_one_over_n_plus_one():
    delta = np.zeros((11, 2))
    delta[0, 1] = 10.0  # the single wording moves far more than any control
    test = verdicts.shift_test(QuestionCurves.synthetic([0.0, 1.0], delta, n_intro=1))
    assert test["p_questions"] == pytest.approx(1 / 11)


def test_random_null_is_a_prediction_test_against_the_random_vectors():
    c = QuestionCurves.synthetic([0.0, 1.0], np.array([[0, 3.0], [0, 0.0], [0, 0.0]]), n_intro=1)
    randoms = [QuestionCurves.synthetic([0.0, 1.0], np.array([[0, t], [0, 0.0], [0, 0.0]]), n_intro=1)
               for t in (0.0, 1.0, 2.0, 1.0)]
    test = verdicts.shift_test(c, randoms)
    t_rand = np.array([0.0, 1.0, 2.0, 1.0])
    z = (3.0 - t_rand.mean()) / (t_rand.std(ddof=1) * math.sqrt(1 + 1 / 4))
    from scipy import stats

    assert test["p_random"] == pytest.approx(stats.t.sf(z, 3))
    assert test["random_rank"] == pytest.approx(1 / 5)
    assert test["p_value"] == max(test["p_questions"], test["p_random"])
    with pytest.raises(ValueError, match="other scales or with other questions"):
        verdicts.shift_test(c, [QuestionCurves.synthetic([0.0, 2.0], np.zeros((3, 2)), n_intro=1)] * 3)


def test_benjamini_hochberg_matches_statsmodels():
    p = np.array([0.001, 0.04, 0.03, 0.5, 0.2, 0.011])
    assert verdicts.benjamini_hochberg(p) == pytest.approx(multipletests(p, method="fdr_bh")[1])


@pytest.mark.parametrize("name,slopes,n_wordings", [
    ("shared yes-shift", [1.0, 1.1, 0.9, 1.0, 1.05, 0.95], 2),
    ("shared suppression", [-1.0, -1.1, -0.9, -1.0, -1.05, -0.95], 2),
    ("opposite", [-0.8, -0.9, 0.5, 0.6, 0.55, 0.5], 2),
    ("one-sided", [0.1, 0.0, 0.8, 0.9, 0.7, 0.8], 2),
    ("no effect", [0.1, 0.05, 0.0, -0.05, 0.1, 0.0], 2),
])
def test_each_class_rule_on_hand_built_curves(name, slopes, n_wordings):
    c = QuestionCurves.synthetic(SCALES, np.c_[np.zeros(len(slopes)), _scaled(slopes)], n_intro=n_wordings)
    assert verdicts.classify(c, q_value=1.0) == name
    assert verdicts.classify(c, q_value=0.01) == "introspection-specific"  # the test decides first


# ------------------------------------------------------------------------------------------------------ the atlas

def _atlas_cases():
    rng = np.random.default_rng(3)
    randoms = [_scaled(0.5 + rng.normal(0, 0.05, 8)) for _ in range(20)]
    concepts = {
        "sandwich": (_scaled([2.0, 2.1, 1.9, 2.0, 0.1, 0.0, 0.05, 0.1]), 4),  # only the wordings move
        "water": (_scaled([1.0, 1.05, 0.95, 1.0, 1.0, 1.02, 0.98, 1.0]), 4),  # everything moves alike
        "bomb": (_scaled([-1.0, -1.1, -0.9, -1.0, -1.0, -1.05, -0.95, -1.0]), 4),
    }
    return concepts, randoms


def test_atlas_classes_pvalues_and_reproducibility():
    concepts, randoms = _atlas_cases()
    df = _table(concepts, randoms=randoms)
    table = verdicts.verdicts(df, n_boot=300)
    assert list(table.columns) == verdicts.ATLAS_COLUMNS
    got = dict(zip(table["concept"], table["class"], strict=True))
    assert got == {"sandwich": "introspection-specific", "water": "shared yes-shift", "bomb": "shared suppression"}
    sandwich = table.set_index("concept").loc["sandwich"]
    assert sandwich["p_questions"] == pytest.approx(1 / math.comb(8, 4))  # the observed labelling is the extreme
    assert sandwich["peak_scale"] == 4.0 and sandwich["shift_ci_low"] > 0 and sandwich["n_random"] == 20
    assert sandwich["answer_mass"] == pytest.approx(0.9) and not sandwich["low_mass"]
    assert table["concept"].iloc[0] == "sandwich"  # ranked by q-value
    alone = verdicts.verdicts(_table({"sandwich": concepts["sandwich"]}, randoms=randoms), n_boot=300).iloc[0]
    assert (alone["shift_ci_low"], alone["shift_ci_high"]) == (sandwich["shift_ci_low"], sandwich["shift_ci_high"])
    assert table.equals(verdicts.verdicts(df, n_boot=300))
    text = metrics.summary(table, df)
    assert "3 concepts at layer 3: 1 introspection-specific, 1 shared yes-shift, 1 shared suppression" in text
    assert "'sandwich' is introspection-specific" in text
    assert "introspection-specific" in verdicts.describe_verdict(sandwich.to_dict() | {"concept": "sandwich"})


def test_a_concept_whose_random_vectors_do_the_same_is_not_specific():
    concepts, _ = _atlas_cases()
    same = [_scaled([2.0, 2.1, 1.9, 2.0, 0.1, 0.0, 0.05, 0.1])] * 3 + [_scaled([1.9, 2.0, 2.0, 1.9] + [0.0] * 4)] * 3
    table = verdicts.verdicts(_table({"sandwich": concepts["sandwich"]}, randoms=same), n_boot=200)
    assert table["class"].iloc[0] != "introspection-specific" and table["p_random"].iloc[0] > 0.3


def test_low_answer_mass_is_flagged():
    concepts, randoms = _atlas_cases()
    table = verdicts.verdicts(_table(concepts, randoms=randoms, mass=0.1), n_boot=100)
    assert table["low_mass"].all()
    assert "below 0.5" in metrics.summary(table, _table(concepts, randoms=randoms, mass=0.1))


def test_atlas_rejects_tables_without_controls_or_concepts():
    concepts, randoms = _atlas_cases()
    df = _table(concepts, randoms=randoms)
    with pytest.raises(ValueError, match="introspection and control questions"):
        verdicts.verdicts(df[df["question_kind"] != "control"])
    with pytest.raises(ValueError, match="no concept-vector rows"):
        verdicts.verdicts(df[df["vector_kind"] != "concept"])
    with pytest.raises(ValueError, match="lacks columns"):
        verdicts.verdicts(df.drop(columns=["delta"]))


def test_readings_use_the_peak_scale_and_the_one_flip_definition():
    deltas = _scaled([1.0, 0.1, 0.1, 0.2])  # one wording, three controls; intro crosses 0 at scale 4
    df = _table({"X": (deltas, 1)}, baseline=-2.0)
    assert readings.flip_scale(df, "X") == 4.0 and readings.flip_scale(df, "X", question_kind="control") is None
    scale, why = readings.choose_scale(df, "X")
    assert scale == verdicts.peak_scale(df, "X") == 4.0
    assert "flips to yes at scale 4" in why and "control mean never flips" in why
    text = readings.describe_scale_sweep(df, "X")
    assert "one wording: p cannot go below 1/(n+1)" in text and "p = 0.25" in text
    low = _table({"X": (deltas, 1)}, mass=0.1)
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
    assert set(table["class"]) <= set(verdicts.CLASSES) and (table["n_wordings"] == 6).all()
    assert set(sweep.df["question_about"]) == {"self", "world"}
    assert sweep.df["answer_mass"].between(0, 1).all() and (tmp_path / "atlas.csv").is_file()
    with pytest.raises(ValueError, match="random-vector null needs at least 3"):
        metrics.run_atlas(tiny_llama, ["Dust"], [1.0], layer=0, n_random=1, bank=bank, progress=False)


# ------------------------------------------------------------------------------------------------- calibration

def test_calibration_false_positives_and_power():
    """≥ 1,000 synthetic concepts per scenario: shared shifts, a relabelled control and 'random vectors alike' are
    called introspection-specific at most at the nominal rate; a planted effect is found with the stated power."""
    table = calibration.calibrate(n_concepts=1000, progress=False).set_index("scenario")
    print("\ncalibration (α = 0.05, 4 wordings, 10 controls, 2 random vectors per concept, atlases of 50):")
    print(table[["called", "p_below_alpha", "p_questions_below_alpha", "truth"]].to_string())
    for scenario in calibration.FALSE_POSITIVE_SCENARIOS:
        assert table.loc[scenario, "called"] <= 0.05
        # uncorrected, per concept: the nominal 5% within binomial error (3 sd at n = 1000 is 0.021)
        assert table.loc[scenario, "p_below_alpha"] <= 0.05 + 0.021
    assert table.loc["relabelled control", "p_questions_below_alpha"] <= 0.05 + 0.021
    assert table.loc["planted δ=0.25", "called"] >= 0.6  # the power the README states (measured 0.77)
    assert table.loc["planted δ=0.1", "called"] < table.loc["planted δ=0.25", "called"]
    # the README's table is this run's (deterministic: the same seed gives the same numbers)
    assert read_block(project_root() / "README.md", "calibration") == calibration.markdown(table.reset_index())
