"""The answer-set readout: yes − no as ``logsumexp`` over each answer set, the float32 readout boundary (final
norm, the answer rows of the unembedding, the softcap) and the answer mass. Pure tensor code: each function runs
inside a trace (on the pass's tensors) or on plain tensors."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle


def yes_minus_no(logits: torch.Tensor, n_yes: int) -> torch.Tensor:
    """The readout of an answer: ``logsumexp`` over the yes set minus ``logsumexp`` over the no set.

    ``logits [..., k]``: the logits of :attr:`prompts.AnswerSet.ids` (the first ``n_yes`` the yes set, the rest the
    no set) → ``[...]``. With one token per set it is logit(yes) − logit(no). Pure tensor code (runs in a trace).
    """
    return logits[..., :n_yes].logsumexp(-1) - logits[..., n_yes:].logsumexp(-1)


def answer_readout(logits: torch.Tensor, log_partition: torch.Tensor, n_yes: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(yes − no [B], answer mass [B])`` from the answer tokens' final logits ``[B, k]`` and the full softmax's
    log-partition ``[B]`` (float32, CPU). The mass is the probability of every token of both sets; ``n_yes=None``
    (tokens that are not a yes/no pair, e.g. digits): the difference is NaN and the mass covers all ``k``."""
    logits, log_partition = logits.float().cpu(), log_partition.float().cpu()
    mass = (logits - log_partition[:, None]).exp().sum(-1)
    if n_yes is None:
        return torch.full_like(logits[:, 0], float("nan")), mass
    return yes_minus_no(logits, n_yes), mass


def readout_logits(handle: ModelHandle, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Inside a trace (or on plain tensors): the logits of the unembedding rows ``rows [k]`` for residuals
    ``hidden [..., D]`` (decoder-layer outputs, before the final norm) → ``[..., k]``, always float32.

    The float32 readout boundary, the one place the choice is made: a bfloat16 model computes its residual stream
    in bfloat16, and the numerically delicate last steps — the final norm, the answer rows of the unembedding and
    Gemma-2's softcap — are computed here in float32 from those bf16 activations (the norm module promotes a
    float32 input to a float32 output; the ``k`` rows are upcast, never the whole unembedding). For a float32 model
    this is the model's own final step (equal to its logits up to float32 summation order). The log-partition of
    the answer mass is the float32 ``logsumexp`` of the model's own full-vocabulary logits (one bf16 rounding per
    logit in a bf16 model: ≤ 2⁻⁹ relative); the agreement with float32 is tested in ``tests/test_bfloat16.py``.
    """
    logits = handle.final_norm(hidden.float()) @ handle.lm_head.weight[rows].float().T
    cap = handle.arch.final_logit_softcap
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits


def lens_diff(handle: ModelHandle, last: list[torch.Tensor], answer_ids: torch.Tensor, n_yes: int) -> torch.Tensor:
    """Inside a trace: the yes−no logit lens ``[B, len(last)]`` of the last-position residuals ``last`` (each
    ``[B, D]``) through :func:`readout_logits` (final norm, the answer sets' rows, the softcap; float32), then
    :func:`yes_minus_no`."""
    return yes_minus_no(readout_logits(handle, torch.stack(last, dim=1), answer_ids), n_yes)
