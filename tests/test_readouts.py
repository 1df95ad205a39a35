"""The readouts the verdict's test can be read on: the answer's scale maps every yes − no difference monotonically into
(−1, 1), a move deep inside one answer counts for almost nothing there; read in logits, :func:`readout_p` is the
verdict's own test; the larger of two readouts keeps its rank p-values exact (the nulls ranked by the same larger z)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from introspection_utils.core.paths import project_root
from introspection_utils.stats import plasmode as pm
from introspection_utils.stats.introspection_score import score_test
from introspection_utils.stats.readouts import READOUTS, answer_delta, answer_scale, readout_p


@pytest.fixture(scope="module")
def qwen():
    full = pm.panel(pd.read_csv(project_root() / "figures/qwen2.5-coder-1.5b-instruct/results/atlas_sweep.csv"))
    return pm.subsample(full, 20)


def test_the_answer_scale_is_p_yes_minus_p_no_between_the_two_answers():
    x = np.array([-40.0, -2.0, 0.0, 1.5, 30.0])
    p_yes = 1 / (1 + np.exp(-x))  # softmax over the two answers
    assert answer_scale(x) == pytest.approx(p_yes - (1 - p_yes))
    assert (np.diff(answer_scale(x)) > 0).all() and (np.abs(answer_scale(x)) <= 1).all()  # ±1 in float at ±30


def test_a_move_deep_inside_one_answer_counts_for_almost_nothing_on_the_answer_scale(qwen):
    design = qwen.design
    delta = np.zeros((1, len(design.baseline), len(design.scales)))
    deep = replace(design, baseline=np.full(len(design.baseline), -40.0))
    assert np.abs(answer_delta(delta + 25.0, deep)).max() < 1e-6  # −40 → −15: still "no"
    assert answer_delta(delta + 2.0, design).min() > 0.0  # near indifference a move of 2 logits shows
    assert READOUTS["logits"](delta + 2.0, design) == pytest.approx(delta + 2.0)


def test_read_in_logits_readout_p_is_the_verdicts_test(qwen):
    test = score_test(qwen.concept_delta, qwen.null_delta, qwen.design, groups=qwen.groups)
    p_random, p_controls = readout_p(qwen.concept_delta, qwen.null_delta, qwen.design, qwen.groups)
    assert p_random == pytest.approx(test.p_random) and p_controls == pytest.approx(test.p_controls)
    assert pm.score_method(qwen.concept_delta, qwen.null_delta, qwen, qwen.groups) == pytest.approx(
        np.maximum(p_random, p_controls))


def test_the_larger_of_two_readouts_keeps_rank_p_values_exact_on_the_nulls(qwen):
    """Each null group held out and ranked against the rest by the larger z: its p-values are the ranks of
    exchangeable values, never below 1 / (R + 1), and the rate at α stays near α (leave-one-out on the real nulls)."""
    p_random, _ = readout_p(qwen.concept_delta, qwen.null_delta, qwen.design, qwen.groups, tuple(READOUTS))
    assert p_random.min() >= 1 / (len(qwen.null_delta) + 1) - 1e-12
    assert pm.false_positive_rate(qwen, method=pm.larger_readout_method) <= 0.1
    with pytest.raises(ValueError, match="unknown readout 'probabilities'; choose from logits, answer scale"):
        readout_p(qwen.concept_delta, qwen.null_delta, qwen.design, qwen.groups, ("probabilities",))
