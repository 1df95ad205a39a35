"""An accuracy against chance, said once: the Wilson interval and the one-sided binomial test of a count
(:func:`accuracy_summary`), the sentence that compares it with chance — above, below, or not distinguishable
(:func:`compared_with_chance`) — and its power: the smallest accuracy a sample of n finds with 80% power
(:func:`detectable_accuracy`, the task's MDE) and the sample a target accuracy needs (:func:`sample_size`). The
tasks of notebook 13 and the localization of notebook 10 word their numbers through these."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from introspection_utils.core.intervals import wilson_interval, z_score

ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class Accuracy:
    """``correct`` of ``n`` against ``chance``: ``accuracy``, the Wilson interval ``ci_low``–``ci_high`` at
    ``level``, ``p_binomial`` (one-sided exact binomial test above chance) and ``mde`` (the smallest accuracy this n
    finds with 80% power at α = 0.05: :func:`detectable_accuracy`)."""

    n: int
    correct: int
    chance: float
    accuracy: float
    ci_low: float
    ci_high: float
    p_binomial: float
    mde: float
    level: float = 0.95

    def as_row(self) -> dict[str, float]:
        """The record as table columns."""
        return asdict(self)


def critical_count(n: int, chance: float, *, alpha: float = ALPHA) -> int:
    """The smallest k with P(X ≥ k) ≤ ``alpha`` for X ~ Binomial(``n``, ``chance``): a one-sided exact binomial test
    at ``alpha`` calls k or more correct; n + 1 when no count can."""
    k = np.arange(n + 2)
    tail = stats.binom.sf(k - 1, n, chance)  # P(X ≥ k)
    hits = np.flatnonzero(tail <= alpha)
    return int(hits[0]) if len(hits) else n + 1


def detection_power(n: int, chance: float, accuracy: float, *, alpha: float = ALPHA) -> float:
    """The probability that the one-sided exact binomial test at ``alpha`` calls a sample of ``n`` whose true
    accuracy is ``accuracy``."""
    return float(stats.binom.sf(critical_count(n, chance, alpha=alpha) - 1, n, accuracy))


def detectable_accuracy(n: int, chance: float, *, alpha: float = ALPHA, power: float = POWER) -> float:
    """The MDE of an accuracy test: the smallest true accuracy found with ``power`` by a sample of ``n`` (bisection on
    :func:`detection_power`, which rises with the accuracy); NaN when even 100% correct cannot pass (n too small)."""
    if n <= 0 or critical_count(n, chance, alpha=alpha) > n:
        return float("nan")
    lo, hi = chance, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if detection_power(n, chance, mid, alpha=alpha) < power else (lo, mid)
    return hi


def sample_size(chance: float, target: float | None = None, *, alpha: float = ALPHA, power: float = POWER,
                max_n: int = 5000) -> int:
    """The smallest n at which the one-sided exact binomial test at ``alpha`` finds a true accuracy ``target``
    (default twice chance, or halfway from chance to perfect when that is lower — 75% against a coin's 50%) with
    ``power``; :class:`ValueError` when ``max_n`` is not enough."""
    target = min(2 * chance, (1 + chance) / 2) if target is None else target
    if not chance < target <= 1:
        raise ValueError(f"the target accuracy {target} must lie above chance {chance} and at most 1")
    for n in range(1, max_n + 1):
        if detection_power(n, chance, target, alpha=alpha) >= power:
            return n
    raise ValueError(f"no n up to {max_n} finds {target:.0%} against chance {chance:.0%} with {power:.0%} power")


def accuracy_summary(correct: int, n: int, chance: float, *, level: float = 0.95) -> Accuracy:
    """The :class:`Accuracy` of ``correct`` of ``n`` against ``chance``: the one Wilson summary every task uses."""
    low, high = wilson_interval(correct, n, z=z_score(level))
    p = float(stats.binomtest(int(correct), int(n), chance, alternative="greater").pvalue) if n else float("nan")
    return Accuracy(n=int(n), correct=int(correct), chance=float(chance), accuracy=correct / n if n else float("nan"),
                    ci_low=low, ci_high=high, p_binomial=p, mde=detectable_accuracy(int(n), chance), level=level)


def compared_with_chance(ci_low: float, ci_high: float, chance: float) -> str:
    """"above chance", "below chance" or "not distinguishable from chance": where an accuracy's interval lies."""
    if ci_low > chance:
        return "above chance"
    if ci_high < chance:
        return "below chance"
    return "not distinguishable from chance"


def chance_sentence(row, *, what: str = "correct") -> str:
    """One accuracy against chance in words, from a row with ``accuracy, ci_low, ci_high, n, chance`` (and ``mde``
    when it has one). 3 of 15 against chance 20%: "20% correct (95% CI 7%–45%, n=15), not distinguishable from chance
    (20%); with n=15 an accuracy of 54% would be found with 80% power" (held by ``tests/test_accuracy.py``)."""
    text = (f"{row['accuracy']:.0%} {what} (95% CI {row['ci_low']:.0%}–{row['ci_high']:.0%}, n={int(row['n'])}), "
            f"{compared_with_chance(row['ci_low'], row['ci_high'], row['chance'])} ({row['chance']:.0%})")
    mde = row.get("mde", detectable_accuracy(int(row["n"]), float(row["chance"])))
    if not row["ci_low"] > row["chance"]:
        text += (f"; with n={int(row['n'])} an accuracy of {mde:.0%} would be found with {POWER:.0%} power"
                 if not np.isnan(mde) else f"; n={int(row['n'])} is too few for any accuracy to pass the test")
    return text


def power_plan(task: str, chance: float, n: int | None = None, *, alpha: float = ALPHA, power: float = POWER) -> str:
    """How many trials ``task`` needs, in words: the sample that finds the default target (:func:`sample_size`) with
    ``power``, and — given the ``n`` a run uses — the accuracy that n finds (its MDE)."""
    target = min(2 * chance, (1 + chance) / 2)
    text = (f"{task}: chance {chance:.0%}; {sample_size(chance, alpha=alpha, power=power)} trials find {target:.0%} "
            f"correct with {power:.0%} power (one-sided exact binomial test at α = {alpha:g})")
    if n is not None:
        mde = detectable_accuracy(n, chance, alpha=alpha, power=power)
        text += (f"; this run's {n} find {mde:.0%}" if not np.isnan(mde) else
                 f"; this run's {n} are too few for any accuracy to pass")
    return text + "."
