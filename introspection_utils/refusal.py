"""The refusal direction (difference of means, harmful vs harmless instructions) and the layer to take it from.

Following Arditi et al. (2024): at every layer, the mean residual stream at the last token of chat-formatted
harmful instructions minus that of harmless ones. Ablating it (``inject.measure(..., ablate=direction)``) projects
it out of the residual stream at every layer and position.

Best layer, the stated criterion: split the prompts in half (even / odd lines); compute each layer's direction on
one half and score it on the other by the separation of the two sets' projections onto the unit direction
(Cohen's d: difference of means over the pooled standard deviation), averaged over both splits. The best layer is
the one with the largest held-out d among layers between ``lo`` and ``hi`` of the depth (default 20%–80%, where
refusal directions are usually found; the first and last layers mostly carry token identity and the next-token
prediction).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd
import torch

from introspection_utils.data import load_list
from introspection_utils.prompts import chat_prompt
from introspection_utils.vectors import last_token_activations

if TYPE_CHECKING:
    from introspection_utils.models import ModelHandle


def instruction_activations(handle: ModelHandle, instructions: Sequence[str], *, batch_size: int = 16
                            ) -> torch.Tensor:
    """Residual stream at the last token (just before the answer) of each instruction as a user turn:
    ``[n, n_layers, d_model]``."""
    prompts = [chat_prompt(handle, [{"role": "user", "content": text}], kind="refusal", question=text)
               for text in instructions]
    return last_token_activations(handle, prompts, batch_size=batch_size)


def _cohens_d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per column: (mean a − mean b) / pooled std. ``a [n, L]``, ``b [m, L]`` → ``[L]``."""
    pooled = ((a.var(0) * (len(a) - 1) + b.var(0) * (len(b) - 1)) / (len(a) + len(b) - 2)).sqrt()
    return (a.mean(0) - b.mean(0)) / pooled.clamp_min(1e-8)


def refusal_directions(handle: ModelHandle, *, harmful: Sequence[str] | None = None,
                       harmless: Sequence[str] | None = None, lo: float = 0.2, hi: float = 0.8
                       ) -> tuple[torch.Tensor, pd.DataFrame]:
    """Difference-of-means directions at every layer and their held-out quality.

    Returns ``directions [n_layers, d_model]`` (mean harmful − mean harmless, all prompts) and a table with one row
    per layer: ``layer, norm, heldout_d, eligible`` (``eligible`` = within ``lo``–``hi`` of the depth). Defaults
    are ``data/refusal_harmful.txt`` and ``data/refusal_harmless.txt``.
    """
    harmful = list(harmful) if harmful is not None else list(load_list("refusal_harmful"))
    harmless = list(harmless) if harmless is not None else list(load_list("refusal_harmless"))
    if len(harmful) < 4 or len(harmless) < 4:
        raise ValueError("need at least 4 harmful and 4 harmless instructions (2 per held-out half)")
    if not 0 <= lo < hi <= 1:
        raise ValueError(f"need 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
    bad = instruction_activations(handle, harmful).float()
    good = instruction_activations(handle, harmless).float()
    directions = bad.mean(0) - good.mean(0)  # [L, D]
    scores = []
    for fit, score in ((slice(0, None, 2), slice(1, None, 2)), (slice(1, None, 2), slice(0, None, 2))):
        unit = torch.nn.functional.normalize(bad[fit].mean(0) - good[fit].mean(0), dim=-1)  # [L, D]
        scores.append(_cohens_d((bad[score] * unit).sum(-1), (good[score] * unit).sum(-1)))
    n_layers = handle.arch.n_layers
    table = pd.DataFrame({
        "layer": range(n_layers),
        "norm": directions.norm(dim=-1).numpy(),
        "heldout_d": torch.stack(scores).mean(0).numpy(),
        "eligible": [lo * n_layers <= i < hi * n_layers for i in range(n_layers)],
    })
    return directions, table


def best_layer(table: pd.DataFrame) -> int:
    """The eligible layer with the largest held-out Cohen's d (see the module docstring)."""
    eligible = table[table["eligible"]]
    if eligible.empty:
        raise ValueError("no eligible layer: widen lo/hi")
    return int(eligible.loc[eligible["heldout_d"].idxmax(), "layer"])


def unit_direction(directions: torch.Tensor, layer: int) -> torch.Tensor:
    """The refusal direction of ``layer``, normalised: ``[d_model]``."""
    return torch.nn.functional.normalize(directions[layer].float(), dim=-1)
