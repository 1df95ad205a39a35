"""Accuracy against chance, said once: the Wilson summary against statsmodels, the exact binomial test's critical
count and power by brute force, the sample size a target needs, and the chance sentence's three cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from statsmodels.stats.proportion import proportion_confint

from introspection_utils.stats import accuracy as acc


def test_the_summary_is_wilson_and_the_exact_binomial_test():
    s = acc.accuracy_summary(7, 15, 0.2)
    low, high = proportion_confint(7, 15, alpha=0.05, method="wilson")
    assert (s.ci_low, s.ci_high) == pytest.approx((low, high))
    # P(X ≥ 7) for X ~ Binomial(15, 0.2), summed by hand
    assert s.p_binomial == pytest.approx(sum(math.comb(15, k) * 0.2 ** k * 0.8 ** (15 - k) for k in range(7, 16)))
    assert s.accuracy == pytest.approx(7 / 15) and s.as_row()["n"] == 15


def test_critical_count_and_power_by_brute_force():
    n, chance = 15, 0.2
    tail = [sum(math.comb(n, j) * chance ** j * (1 - chance) ** (n - j) for j in range(k, n + 1)) for k in range(n + 1)]
    assert acc.critical_count(n, chance) == next(k for k, t in enumerate(tail) if t <= 0.05) == 7  # issue #30: 47%
    mde = acc.detectable_accuracy(n, chance)
    assert acc.detection_power(n, chance, mde) == pytest.approx(0.8, abs=1e-6)
    assert acc.detection_power(n, chance, mde - 0.01) < 0.8 < acc.detection_power(n, chance, mde + 0.01)
    assert np.isnan(acc.detectable_accuracy(1, 0.5))  # one trial cannot pass a test at 5%


def test_sample_size_reaches_the_power_it_promises():
    for chance in (0.2, 0.25, 0.5):
        n = acc.sample_size(chance)
        target = min(2 * chance, (1 + chance) / 2)
        assert acc.detection_power(n, chance, target) >= 0.8 > acc.detection_power(n - 1, chance, target)
    with pytest.raises(ValueError, match="must lie above chance"):
        acc.sample_size(0.5, 0.4)


def test_the_chance_sentence_has_a_below_chance_case_and_states_the_mde():
    assert acc.compared_with_chance(0.3, 0.6, 0.2) == "above chance"
    assert acc.compared_with_chance(0.0, 0.1, 0.2) == "below chance"
    assert acc.compared_with_chance(0.1, 0.3, 0.2) == "not distinguishable from chance"
    below = acc.chance_sentence(acc.accuracy_summary(0, 40, 0.2).as_row())
    assert "below chance (20%)" in below and "would be found with 80% power" in below
    above = acc.chance_sentence(acc.accuracy_summary(12, 15, 0.2).as_row())
    assert "above chance" in above and "power" not in above  # a found effect needs no MDE


def test_the_chance_sentences_docstring_example_is_what_it_prints():
    """The docstring's example is the function's output for the count it names, so it cannot go stale."""
    printed = acc.chance_sentence(acc.accuracy_summary(3, 15, 0.2).as_row())
    assert "3 of 15 against chance 20%" in acc.chance_sentence.__doc__
    assert f'"{printed}"' in " ".join(acc.chance_sentence.__doc__.split())


def test_the_power_plan_says_the_sample_a_task_needs_and_what_a_run_can_find():
    text = acc.power_plan("forced choice", 0.2, 15)
    assert text.startswith(f"forced choice: chance 20%; {acc.sample_size(0.2)} trials find 40% correct with 80% power")
    assert f"this run's 15 find {acc.detectable_accuracy(15, 0.2):.0%}" in text
    assert "too few" in acc.power_plan("strength", 0.5, 2)
