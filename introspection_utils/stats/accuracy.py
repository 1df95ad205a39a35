"""An accuracy against chance, said once: the Wilson interval and the one-sided binomial test of a count
(:func:`accuracy_summary`), the sentence that compares it with chance — above, below, or not distinguishable
(:func:`compared_with_chance`) — and its power: the smallest accuracy a sample of n finds with 80% power
(:func:`detectable_accuracy`, the task's MDE), the sample a target accuracy needs (:func:`sample_size`) and the chance
of a responder that answers by position alone (:func:`position_matched_chance`). The tasks of notebook 13 and the
localization of notebook 10 word their numbers through these."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from introspection_utils.core.intervals import wilson_interval, z_score

ALPHA = 0.05
POWER = 0.8
# The smallest median |Δ margin| (logits, against the same prompt without injection) at which an injection counts as
# moving a task's readout: below it the answer's odds change by under 5%, and the answers are the no-injection ones,
# so an accuracy there reads the design's balance, not the injection.
MOVED_FLOOR = 0.05


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


def position_matched_chance(target_positions, answer_positions, n_positions: int) -> float:
    """The accuracy of a responder that ignores the injection and answers position k as often as the reference
    answers (``answer_positions``, 0-based: e.g. the no-injection trials') do, on trials whose right answers stand
    at ``target_positions``: Σ_trials q(target's position) / n, q the reference's answer frequencies. When every
    position is the right answer equally often it is 1/``n_positions`` whatever q is; NaN without a reference."""
    targets = np.asarray(target_positions, dtype=np.int64)
    answers = np.asarray(answer_positions, dtype=np.int64)
    if not len(targets) or not len(answers):
        return float("nan")
    # In integers, one division at the end: on a balanced design the result is 1/n exactly, not up to rounding.
    shared = np.bincount(targets, minlength=n_positions) * np.bincount(answers, minlength=n_positions)
    return int(shared.sum()) / (len(targets) * len(answers))


def positions_balanced(target_positions, n_positions: int) -> bool:
    """Whether the right answer stands at every one of ``n_positions`` positions equally often (then any
    position-only responder scores exactly 1/``n_positions``)."""
    counts = np.bincount(np.asarray(target_positions, dtype=np.int64), minlength=n_positions)
    return bool(len(counts) == n_positions and (counts == counts[0]).all())


def chance_bar(row) -> float:
    """What a summary row's accuracy must beat: the larger of its ``chance`` and its ``position_chance``
    (:func:`position_matched_chance`; a row without one, its chance)."""
    position = row.get("position_chance", float("nan"))
    return float(row["chance"] if np.isnan(position) else max(row["chance"], position))


def position_sentence(row, design: str, balance: str) -> str:
    """The position-matched chance of a summary row (``chance, position_chance, balanced``) in words: exactly
    chance on a balanced ``design`` (``balance``: what stands everywhere equally often), else what a responder
    answering by position alone would score and the bar the accuracy is judged against (:func:`chance_bar`)."""
    if bool(row["balanced"]):
        return (f"The {design} put {balance} equally often, so a responder answering by position alone scores "
                f"exactly chance (position-matched chance {row['position_chance']:.0%}).")
    return (f"The {design} are not balanced (not {balance} equally often: a table from before the balanced design): "
            f"a responder answering positions as often as no injection and the null vectors do would score "
            f"{row['position_chance']:.0%} against chance {row['chance']:.0%}, so the accuracy is judged against "
            f"{chance_bar(row):.0%}.")


def readout_moved(margin_shift: float) -> bool:
    """Whether an injection measurably moves a task's readout: its median |margin − the no-injection margin| exceeds
    :data:`MOVED_FLOOR`."""
    return bool(margin_shift > MOVED_FLOOR)


def unmoved_sentence(where: str, margin_shift: float) -> str:
    """The reading where the injection does not move the readout (:func:`readout_moved`), in place of its accuracy."""
    return (f"at {where} the injection does not move the readout: the answer margins stay within "
            f"{margin_shift:.3f} logits (median) of no injection, under the {MOVED_FLOOR:g} that counts as moved, so "
            f"its accuracy there is not a reading of the injection.")
