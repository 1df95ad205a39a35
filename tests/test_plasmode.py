"""Plasmode: effects planted into the committed Qwen2.5-Coder-1.5B atlas sweep. The verdict's statistic finds a
wording effect of I = +0.5 logits for ≥ 80% of the concepts, the controls'-line I it replaced reproduces the
baseline issue #30 measured, the false-positive rate on the real null vectors (leave-one-out) is at most α, a
planted compression or yes-shift is not called, random vectors that share the effect make injection detectors, and
docs/verdicts.md's table is this module's."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from introspection_utils.apps import verdict_tables
from introspection_utils.core.paths import project_root, read_block
from introspection_utils.stats import plasmode as pm
from introspection_utils.stats import verdicts
from introspection_utils.stats.introspection_score import plant, score_test

SWEEP = project_root() / "figures/qwen2.5-coder-1.5b-instruct/results/atlas_sweep.csv"


@pytest.fixture(scope="module")
def qwen_df():
    return pd.read_csv(SWEEP)


@pytest.fixture(scope="module")
def qwen(qwen_df):
    return pm.panel(qwen_df)


def test_the_panel_holds_the_committed_sweep(qwen):
    assert qwen.concept_delta.shape == (57, 18, 3) and qwen.null_delta.shape == (114, 18, 3)
    assert list(qwen.design.scales) == [2.0, 4.0, 8.0] and sorted(qwen.design.polarity) == [-1, -1, -1, 1, 1, 1]
    assert len(set(qwen.groups)) == 57 and qwen.about_self[qwen.design.wordings].all()


def test_effects_plant_what_they_say(qwen):
    d, s = qwen.design, qwen.design.scales
    base = qwen.concept_delta[:2]
    assert pm.Effect("yes-shift", 0.1).apply(base, qwen) - base == pytest.approx(
        np.broadcast_to(0.1 * s, base.shape))
    pushed = pm.Effect("self push", 0.1).apply(base, qwen) - base
    assert pushed[:, qwen.about_self] == pytest.approx(np.broadcast_to(0.1 * s, pushed[:, qwen.about_self].shape))
    assert pushed[:, ~qwen.about_self] == pytest.approx(0.0)
    assert pm.Effect("wording", 0.05).apply(base, qwen)[:, d.wordings] - base[:, d.wordings] == pytest.approx(
        0.05 * np.outer(d.polarity, s)[None].repeat(2, 0))
    assert pm.Effect("compression", 0.0).apply(base, qwen) == pytest.approx(base)
    squeezed = pm.Effect("compression", 0.8).apply(base, qwen) + d.baseline[None, :, None]
    assert (np.abs(squeezed) <= np.abs(base + d.baseline[None, :, None]) + 1e-12).all()  # towards indifference
    assert pm.Effect("stronger", 2.0).apply(base, qwen) == pytest.approx(2 * base)
    assert pm.Effect("wording", 0.05).apply(base, qwen) == pytest.approx(plant(base, d, 0.05))
    with pytest.raises(ValueError, match="arrays only"):  # a hook cannot plant it one answer at a time
        pm.Effect("stronger", 2.0).answer(1.0, scale=8.0, polarity=0, about_self=False, top_scale=8.0)
    with pytest.raises(ValueError, match="unknown effect"):
        pm.Effect("louder", 1.0)


def test_mde_interpolates_on_the_grid():
    curve = pd.DataFrame({"delta": [0.05, 0.1, 0.2], "I": [0.4, 0.8, 1.6], "called": [0.2, 0.6, 1.0]})
    assert pm.mde(curve) == pytest.approx(0.8 + (0.8 - 0.6) / (1.0 - 0.6) * 0.8)
    assert np.isnan(pm.mde(curve.assign(called=[0.0, 0.1, 0.5])))


def test_the_verdict_finds_I_half_a_logit_for_most_concepts_and_beats_the_line_it_replaced(qwen):
    """Issue #30's target: ≥ 80% of the concepts called at I = +0.5 logits on the model's own noise (the committed
    bfloat16 sweep, largest scale 8: δ = 0.0625), which neither alternative of the weights reaches alone with an
    effect the same on every wording and no wording left out (the varying-effect one alone stays below); the
    controls'-line I it replaced stays below 80% at I = +0.8."""
    new = pm.power_curve(qwen, [0.0625])
    assert new["called"].iloc[0] >= 0.8
    assert pm.power_curve(qwen, [0.0625], method=pm.varying_effect_method)["called"].iloc[0] < 0.8
    old = pm.power_curve(qwen, [0.1], method=pm.residual_method)
    assert old["called"].iloc[0] < 0.8


def test_the_false_positive_rate_on_the_real_null_vectors_is_at_most_alpha(qwen):
    """Each concept's two random vectors held out and tested as concepts against the other 112: p ≤ α for at most
    α of the 114."""
    assert pm.false_positive_rate(qwen) <= 0.05


def test_a_planted_compression_or_yes_shift_is_not_called(qwen):
    scenarios = pm.fitted_scenarios(qwen)
    for name in ("compression", "yes-shift", "self push"):
        effect = scenarios[name]
        p = pm.score_method(effect.apply(qwen.concept_delta, qwen), qwen.null_delta, qwen, qwen.groups)
        assert pm.called_fraction(p) == 0.0, name
    assert pm.false_positive_rate(qwen, scenarios["compression"]) <= 0.05


def test_null_vectors_that_push_as_hard_as_the_concepts_are_called_at_most_alpha(qwen):
    """The fitted "stronger as concepts are" scenario (held-out nulls made to push the controls as hard as the
    concepts, their residuals as spread): each score compared in units of its own sd, which grows with the push
    (null_prediction.prediction_variance), keeps p ≤ α at most α of the time; ranking the raw δ̂ did not."""
    assert pm.false_positive_rate(qwen, pm.fitted_scenarios(qwen)["stronger as concepts are"]) <= 0.05


def test_random_vectors_that_share_the_effect_make_injection_detectors(qwen_df):
    """The anomaly-detector organism in plasmode: every vector, concept or random, moves the wordings towards
    reporting detection (I = 1.6 logits at scale 8), the controls untouched. Beyond the controls, not beyond random
    vectors: the class that says so, never introspection-specific."""
    df = qwen_df.copy()
    wording = df["question_kind"] == "introspection"
    bump = 0.2 * df["scale"] * df["polarity"].where(wording, 0)
    df["delta"] += bump
    df["logit_diff"] += bump
    table = verdicts.verdicts(df, n_boot=1, mde=False)
    counts = verdicts.class_counts(table)
    assert counts["introspection-specific"] == 0
    assert counts["injection detector"] >= 0.8 * len(table)
    row = table[table["class"] == "injection detector"].iloc[0]
    assert "beyond the controls" in verdicts.describe_verdict(row, brief=True)


def test_a_wording_effect_planted_into_every_concept_moves_only_their_scores_by_exactly_itself(qwen):
    """Why the population test's power can be computed without rescoring (``ScoreTest.shifted_z``, used by
    ``plasmode.population_power``): the weights see each kind centred on its own mean, so a δ shared by every concept
    adds exactly δ to each concept's δ̂ under every alternative, and leaves every null's out-of-sample δ̂, and every
    sd, unchanged."""
    plain = score_test(qwen.concept_delta, qwen.null_delta, qwen.design, groups=qwen.groups)
    planted = score_test(plant(qwen.concept_delta, qwen.design, 0.05), qwen.null_delta, qwen.design,
                         groups=qwen.groups)
    assert planted.delta_hats.shape == (2, 57)
    assert planted.delta_hats - plain.delta_hats == pytest.approx(np.full((2, 57), 0.05), abs=1e-9)
    assert planted.delta_hat - plain.delta_hat == pytest.approx(np.full(57, 0.05), abs=1e-9)
    assert planted.null_delta_hats == pytest.approx(plain.null_delta_hats, abs=1e-12)
    assert planted.sds == pytest.approx(plain.sds) and planted.null_score_sds == pytest.approx(plain.null_score_sds)
    assert planted.z == pytest.approx(plain.shifted_z(0.05))


def test_the_population_test_finds_a_small_shared_effect_and_rarely_rejects_with_nothing_planted(qwen):
    """The population test (one-sided Mann–Whitney of the concepts' z against the nulls') on bootstrap atlases of
    the committed sweep: with nothing planted it rejects in at most 2α of the resamples (the concepts as a group are
    not beyond their nulls), its power rises with δ, and its MDE lies below the per-concept
    test's (it pools 57 concepts)."""
    curve = pm.population_power(qwen, [0.0, 0.005, 0.01, 0.02], n_resamples=300)
    assert curve["rejected"].iloc[0] <= 0.1
    assert curve["rejected"].is_monotonic_increasing and curve["rejected"].iloc[-1] >= 0.8
    assert pm.mde(curve, column="rejected") < 0.5


def test_docs_table_is_this_modules(qwen):
    """docs/verdicts.md's plasmode block holds the rows this module computes (the open format's power at I = 0.5 and
    its false-positive rate on the nulls are recomputed here; ``python -m introspection_utils.apps.verdict_tables
    plasmode`` rewrites the block)."""
    block = read_block(project_root() / verdict_tables.DOC, "plasmode")
    open_part = block.split("**qwen2.5-coder-1.5b-instruct, binary format**")[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[4:-1]]
            for line in open_part.splitlines() if line.startswith("| ")}
    called = pm.power_curve(qwen, [0.0625])["called"].iloc[0]
    assert rows["called at I = 0.50"][0] == f"{called:.1%}"
    assert rows["FPR: no effect"][0] == f"{pm.false_positive_rate(qwen):.1%}"
    assert float(rows["MDE (I, logits, 80% called)"][0]) <= 0.6
    population = pm.population_power(qwen, pm.POPULATION_GRID, until=pm.POWER)
    assert rows["population MDE (I, logits, 80% of resamples)"] == [f"{pm.mde(population, column='rejected'):.2f}",
                                                                     *["—"] * (len(pm.METHODS) - 1)]
    assert rows["population test: rejected, nothing planted"][0] == f"{population['rejected'].iloc[0]:.1%}"
