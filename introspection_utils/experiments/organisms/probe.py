"""The organisms' behaviour probe: what an organism answers, while it trains, to the training wordings with a
training concept's vector, a norm-matched random direction and nothing injected (:func:`behaviour_probe`); recorded
by :func:`introspection_utils.experiments.organisms.training.train_organism` at its checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from introspection_utils.engine.prompts import yes_no_ids
from introspection_utils.experiments.organisms.forward import (
    Row,
    injected_logits,
    row_prompt,
    row_trials,
    trial_batch,
)
from introspection_utils.experiments.organisms.frozen_work import FrozenWork
from introspection_utils.experiments.organisms.splits import CONDITIONS

if TYPE_CHECKING:
    from introspection_utils.engine.vectors import VectorBank
    from introspection_utils.experiments.organisms.splits import OrganismSplit
    from introspection_utils.experiments.organisms.training import OrganismConfig
    from introspection_utils.models.handle import ModelHandle

PROBE_SEED_OFFSET = 2_000_000  # the probe's random directions: seeds training's draws (RANDOM_SEED_OFFSET + [0, 1e6))
#                                and the evaluation's nulls never use
DETECTED = tuple(f"detected_{c}" for c in CONDITIONS)  # the probe's detected rates, by condition

PROBE_CONCEPTS = 2  # 2 concepts × the 10 yes/no training wordings × 3 conditions: 20 rows a rate, a few seconds on
#                     the embedded model (a learning signal, not a measurement: the evaluation measures)


def probe_rows(config: OrganismConfig, split: OrganismSplit, n_concepts: int = PROBE_CONCEPTS
               ) -> tuple[int, list[Row]]:
    """The behaviour probe's layer and rows: the first ``n_concepts`` training concepts × the training wordings
    answered yes or no (the naming ones left out) × each condition (the concept's vector, a norm-matched random
    direction, none), at the config's middle scale and middle injection layer; the same rows at every step."""
    layer, scale = config.layers[len(config.layers) // 2], config.scales[len(config.scales) // 2]
    wordings = [w.text for w in split.wordings if not w.names]
    rows = [Row(question, condition, concept, scale, PROBE_SEED_OFFSET + i)
            for i, concept in enumerate(split.train[:n_concepts]) for question in wordings
            for condition in CONDITIONS]
    return layer, rows


def behaviour_probe(model: torch.nn.Module, layers: torch.nn.ModuleList, handle: ModelHandle, config: OrganismConfig,
                    split: OrganismSplit, bank: VectorBank, frozen: FrozenWork | None = None, *,
                    n_concepts: int = PROBE_CONCEPTS) -> dict[str, float]:
    """What the organism does now (``model``: the peft model being trained) on :func:`probe_rows`: by condition, the
    fraction of rows it answers as reporting an injected thought (``detected_<condition>``: the wording's polarity ×
    (yes − no) > 0, the evaluation's rule in
    :func:`~introspection_utils.experiments.organisms.evaluation.organism_detection_rates`) and the fraction it answers
    "yes" (``yes_<condition>``); :func:`probe_answers` then :func:`probe_rates`.

    The training records it at its checkpoints: whether the behaviour is being learned shows in the curve, before
    an evaluation is spent on an organism that answers alike whatever is injected."""
    layer, rows = probe_rows(config, split, n_concepts)
    return probe_rates(rows, probe_answers(model, layers, handle, config, layer, rows, bank, frozen), split)


def probe_answers(model: torch.nn.Module, layers: torch.nn.ModuleList, handle: ModelHandle, config: OrganismConfig,
                  layer: int, rows: Sequence[Row], bank: VectorBank, frozen: FrozenWork | None = None, *,
                  batch_size: int = 24) -> np.ndarray:
    """``rows``' yes − no logits ``[len(rows)]`` (the paper's one-token answers, at the answer position) through
    ``model`` injected at ``layer``, without gradients."""
    yes_id, no_id = yes_no_ids(handle)
    frozen = frozen or FrozenWork()
    adapted: dict[tuple[int, ...], object] = {}  # the model does not change during the probe: each prefix once
    diffs: list[float] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            trials = row_trials(chunk, [row_prompt(handle, r.question) for r in chunk], layer, bank)
            batch = trial_batch(handle, trials, [[] for _ in chunk], layer)
            shared = tuple(batch.prefix[0].tolist())
            if shared and shared not in adapted:
                adapted[shared] = frozen.adapted(model, layers, batch, config.first_adapted)
            hidden = frozen.lower(model, layers, batch, config.first_adapted, apart=True)
            logits = injected_logits(model, layers, batch, first=config.first_adapted, keep=1, hidden=hidden,
                                     prefix=adapted.get(shared))
            diffs += (logits[:, -1, yes_id].float() - logits[:, -1, no_id].float()).tolist()
    return np.asarray(diffs)


def probe_rates(rows: Sequence[Row], diffs: np.ndarray, split: OrganismSplit) -> dict[str, float]:
    """By condition: ``detected_<condition>``, the fraction of ``rows`` whose wording's polarity × ``diffs`` (yes −
    no) is > 0, and ``yes_<condition>``, the fraction with yes − no > 0."""
    polarity = {w.text: w.polarity for w in split.wordings}
    out = {}
    for condition in CONDITIONS:
        picked = [(polarity[r.question], d) for r, d in zip(rows, diffs, strict=True) if r.condition == condition]
        out[f"detected_{condition}"] = float(np.mean([p * d > 0 for p, d in picked]))
        out[f"yes_{condition}"] = float(np.mean([d > 0 for _, d in picked]))
    return out


def probe_postfix(probed: dict | None) -> dict[str, str]:
    """A progress bar's note of the last probe (a training's record, or ``None``): the detected rates with a
    concept vector, a random direction, none."""
    if probed is None:
        return {}
    return {"detected c/r/n": "/".join(f"{probed[c]:.2f}" for c in DETECTED)}
