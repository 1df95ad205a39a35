"""What the verdict's test reads each answer on: the yes − no logit difference itself (the verdict's readout), or the
answer's scale, P(yes) − P(no) between the two answers (issue #30: compared on the model's own noise and on the
model organisms in docs/verdicts.md, not adopted). Every array stays in logits until it is read, so an effect is
planted in logits whatever the readout."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from introspection_utils.stats.introspection_score import QuestionDesign, rank_p, score_test


def answer_scale(x: np.ndarray | float) -> np.ndarray:
    """A yes − no logit difference x read on the answer's scale: tanh(x / 2) = P(yes) − P(no) between the two
    answers, in (−1, 1) — a move deep inside one answer counts for little there, a move across it for much."""
    return np.tanh(np.asarray(x, float) / 2)


def answer_delta(delta: np.ndarray, design: QuestionDesign) -> np.ndarray:
    """``delta [V, Q, S]`` (logits) read on the answer's scale: :func:`answer_scale` of x + Δ less that of x, x the
    design's no-injection baselines ``[Q]``."""
    x = design.baseline[None, :, None]
    return answer_scale(x + delta) - answer_scale(x)


READOUTS = {"logits": lambda delta, design: np.asarray(delta, float), "answer scale": answer_delta}


def readout_p(concept_delta: np.ndarray, null_delta: np.ndarray, design: QuestionDesign, groups: np.ndarray,
              readouts: Sequence[str] = ("logits",)) -> tuple[np.ndarray, np.ndarray]:
    """``(p_random, p_controls)`` ``[V]`` of the verdict's test (:func:`introspection_score.score_test`) on each of
    ``readouts`` (keys of :data:`READOUTS`), z the largest over them ranked among the nulls' largest — so the rank
    p-values stay exact, as for the two alternatives of the weights. ``("logits",)`` is the verdict's own test."""
    unknown = [r for r in readouts if r not in READOUTS]
    if unknown or not readouts:
        raise ValueError(f"unknown readout {unknown[0] if unknown else None!r}; choose from {', '.join(READOUTS)}")
    tests = [score_test(READOUTS[r](concept_delta, design), READOUTS[r](null_delta, design), design, groups=groups)
             for r in readouts]
    null_z = np.max([t.null_z for t in tests], axis=0)
    return (rank_p(np.max([t.z for t in tests], axis=0), null_z),
            rank_p(np.max([t.controls_z for t in tests], axis=0), null_z))
