"""Separation metric, flip points, classification and bootstrap on hand-built curves with known answers; the atlas
on a hand-built sweep table and on a real tiny-model sweep."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from introspection_utils import metrics
from introspection_utils.metrics import Curves
from introspection_utils.sweeps import COLUMNS, scale_sweep

SCALES = [1.0, 2.0, 4.0, 8.0]

# Hand-built cases: (intro delta per scale, control deltas per question and scale, intro baseline, control baseline)
CASES = {
    # introspection flips at scale 2 (−1 + 3 > 0), controls hardly move there: separated
    "separated": ([0.5, 3.0, 5.0, 6.0], [[0.0, 0.2, 1.0, 3.0], [0.1, 0.3, 1.5, 4.0], [0.0, 0.1, 0.8, 3.5]], -1.0, -2.0),
    # introspection and controls move together: bias shift
    "bias shift": ([0.5, 3.0, 5.0, 6.0], [[0.4, 2.9, 5.0, 6.1], [0.6, 3.1, 4.8, 5.9], [0.5, 3.0, 5.2, 6.0]],
                   -1.0, -2.0),
    # nothing moves by a logit anywhere
    "no effect": ([0.1, -0.2, 0.3, 0.4], [[0.0, 0.1, -0.1, 0.2], [0.1, 0.0, 0.2, -0.3]], -1.0, -2.0),
    # both fall below their baselines (e.g. "bomb"): interference
    "interference": ([-0.5, -2.0, -4.0, -6.0], [[-0.4, -1.8, -3.5, -5.0], [-0.6, -2.2, -4.1, -6.2]], -1.0, -2.0),
}


def _curves(name: str) -> Curves:
    intro, controls, ib, cb = CASES[name]
    return Curves.from_arrays(SCALES, intro, controls, intro_baseline=ib, control_baselines=cb)


@pytest.mark.parametrize("name", list(CASES))
def test_hand_built_curves_get_their_class(name):
    c = _curves(name)
    ci = metrics.bootstrap(c, n_boot=500, rng=0)
    assert metrics.classify(c, ci["ci_low"]) == name


def test_separation_is_the_gap_at_the_introspection_flip_scale():
    c = _curves("separated")
    assert metrics.intro_flip(c) == 2.0  # −1 + 0.5 ≤ 0 at scale 1, −1 + 3 > 0 at scale 2
    assert metrics.control_flip(c) == 8.0  # −2 + mean(1.0, 1.5, 0.8) ≤ 0 at 4; −2 + 3.5 > 0 at 8
    assert metrics.separation(c) == pytest.approx(3.0 - np.mean([0.2, 0.3, 0.1]))
    assert metrics.scale_gap(c) == 6.0


def test_flip_from_a_yes_baseline_needs_a_clear_move_towards_yes():
    # baseline already "yes" (+0.5): the flip is the first scale with delta >= effect_threshold
    assert metrics.flip_scale(SCALES, np.array([0.9, 1.2, 2.0, 3.0]), np.array([0.4, 0.7, 1.5, 2.5])) == 4.0
    assert metrics.flip_scale(SCALES, np.array([0.9, 1.2, 2.0, 3.0]), np.array([0.4, 0.7, 1.5, 2.5]),
                              effect_threshold=0.5) == 2.0
    # scale 0 never counts as a flip
    assert metrics.flip_scale([0.0, 1.0], np.array([1.0, -1.0]), np.array([0.0, 0.0])) != 0.0


def test_no_flip_uses_the_largest_introspection_effect_and_gap_is_nan_or_inf():
    c = _curves("interference")
    assert math.isnan(metrics.intro_flip(c))
    assert c.scales[metrics.reference_index(c)] == 8.0  # |−6| is the largest effect
    assert math.isnan(metrics.scale_gap(c))
    never = Curves.from_arrays(SCALES, [0.5, 3.0, 5.0, 6.0], [[0.0, 0.0, 0.0, 0.0]], intro_baseline=-1.0,
                               control_baselines=-2.0)
    assert metrics.scale_gap(never) == math.inf


def test_thresholds_are_arguments():
    c = _curves("separated")
    ci = metrics.bootstrap(c, n_boot=200, rng=0)
    assert metrics.classify(c, ci["ci_low"], separation_threshold=10.0) == "bias shift"
    assert metrics.classify(_curves("no effect"), 0.0, effect_threshold=0.01) != "no effect"


def test_bootstrap_is_seeded_and_reproducible():
    noise = np.random.default_rng(0)
    c = Curves.from_arrays(SCALES, [0.5, 3.0, 5.0, 6.0], noise.normal(0.5, 1.0, (6, 4)), intro_baseline=-1.0,
                           control_baselines=-5.0)
    randoms = [Curves.from_arrays(SCALES, noise.normal(0, 1, 4), noise.normal(0, 1, (6, 4)), intro_baseline=-1.0,
                                  control_baselines=-5.0) for _ in range(5)]
    a = metrics.bootstrap(c, randoms, n_boot=300, rng=7)
    b = metrics.bootstrap(c, randoms, n_boot=300, rng=np.random.default_rng(7))
    other = metrics.bootstrap(c, randoms, n_boot=300, rng=8)
    assert a == b
    assert a != other
    assert a["ci_low"] <= metrics.separation(c) <= a["ci_high"]
    assert a["excess_ci_low"] <= a["excess_ci_high"]
    assert math.isnan(metrics.bootstrap(c, n_boot=50, rng=0)["excess_ci_low"])  # no random vectors, no excess


def test_bootstrap_interval_by_hand_with_two_controls():
    # controls 0 and 2 at the flip scale: resampled means are 0, 1 or 2 -> S in {3, 2, 1}
    c = Curves.from_arrays([1.0], [3.0], [[0.0], [2.0]], intro_baseline=-1.0, control_baselines=-5.0)
    ci = metrics.bootstrap(c, n_boot=4000, rng=0, level=0.9)
    assert (ci["ci_low"], ci["ci_high"]) == (1.0, 3.0)
    assert metrics.separation(c) == 2.0


def _table(cases: dict[str, str], n_random: int = 2) -> pd.DataFrame:
    """A tidy sweep table (sweeps.COLUMNS) built from the hand-made cases: concept -> case name."""
    rows = []
    for concept, name in cases.items():
        intro, controls, ib, cb = CASES[name]
        vectors = [("concept", None, 1.0)] + [("random", k, 0.2) for k in range(n_random)]
        for kind, seed, factor in vectors:
            for s_index, scale in enumerate([0.0, *SCALES]):
                def row(question_kind, question, delta, base, kind=kind, seed=seed, scale=scale, concept=concept):
                    return {"model": "hand", "concept": concept, "vector_kind": kind, "vector_seed": seed,
                            "vector_norm": 1.0, "layer": 3, "scale": scale, "question_kind": question_kind,
                            "question": question, "logit_diff": base + delta, "baseline_logit_diff": base,
                            "delta": delta}
                at = s_index - 1
                rows.append(row("introspection", "trial", factor * intro[at] if at >= 0 else 0.0, ib))
                for q, control in enumerate(controls):
                    rows.append(row("control", f"q{q}", factor * control[at] if at >= 0 else 0.0, cb))
    df = pd.DataFrame(rows)[COLUMNS]
    df["vector_seed"] = df["vector_seed"].astype("Int64")
    return df


def test_atlas_on_a_hand_built_table_finds_each_class():
    cases = {"sandwich": "separated", "water": "bias shift", "rock": "no effect", "bomb": "interference"}
    table = metrics.atlas(_table(cases), n_boot=400)
    assert list(table.columns) == metrics.ATLAS_COLUMNS
    assert dict(zip(table["concept"], table["class"], strict=True)) == cases
    assert table["concept"].iloc[0] == "sandwich"  # ranked by separation
    assert (table["n_random"] == 2).all() and (table["n_controls"] > 0).all()
    counts = metrics.class_counts(table)
    assert list(counts.index) == list(metrics.CLASSES) and counts.sum() == 4
    sandwich = table.set_index("concept").loc["sandwich"]
    assert sandwich["reference_scale"] == 2.0 and sandwich["control_flip"] == 8.0 and sandwich["scale_gap"] == 6.0
    assert "4 concepts: 1 separated, 1 bias shift, 1 no effect, 1 interference" in metrics.summary(
        table, _table(cases))
    # the same seed gives the same intervals, whatever other concepts the table holds
    alone = metrics.atlas(_table({"sandwich": "separated"}), n_boot=400).iloc[0]
    assert (alone["ci_low"], alone["ci_high"]) == (sandwich["ci_low"], sandwich["ci_high"])


def test_atlas_rejects_tables_without_controls_or_concepts():
    df = _table({"sandwich": "separated"})
    with pytest.raises(ValueError, match="control question"):
        metrics.atlas(df[df["question_kind"] != "control"])
    with pytest.raises(ValueError, match="no concept-vector rows"):
        metrics.atlas(df[df["vector_kind"] != "concept"])
    with pytest.raises(ValueError, match="lacks columns"):
        metrics.atlas(df.drop(columns=["delta"]))


def test_atlas_on_a_tiny_model_sweep(tiny_llama):
    import torch

    from introspection_utils.vectors import VectorBank

    g = torch.Generator().manual_seed(5)
    bank = VectorBank(("Dust", "Satellites"), torch.randn(2, 2, tiny_llama.arch.d_model, generator=g),
                      model=tiny_llama.name)
    sweep = scale_sweep(tiny_llama, ["Dust", "Satellites"], [1.0, 4.0, 16.0], layer=0, n_controls=2, n_random=2,
                        bank=bank, progress=False)
    table = metrics.atlas(sweep.df, n_boot=200)
    assert sorted(table["concept"]) == ["Dust", "Satellites"]
    assert set(table["class"]) <= set(metrics.CLASSES)
    assert (table["ci_low"] <= table["ci_high"]).all() and (table["n_random"] == 2).all()
    scores = metrics.vector_scores(sweep.df)
    assert len(scores) == 2 * 3  # each concept and its two random vectors
    assert table.equals(metrics.atlas(sweep.df, n_boot=200))  # reproducible
