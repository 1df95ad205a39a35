"""What the three tasks a yes-bias cannot score share (:mod:`introspection_utils.experiments.tasks`): the default
concepts, the level at which a task's effect counts as found, the label tokens read at the answer position, the
strengths and null vectors of a run, the vector columns every table carries (``effective_strength`` = s·‖v‖,
``relative_strength`` = s·‖v‖/‖h‖), the checks before any compute, and the save with metadata."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

from introspection_utils.core.results import SweepResult
from introspection_utils.engine.measure import Trial
from introspection_utils.engine.metadata import metadata
from introspection_utils.engine.prompts import Prompt
from introspection_utils.engine.vectors import (
    ConceptVector,
    check_nulls,
    null_source,
    null_vector,
)

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

DEFAULT_CONCEPTS = ("Dust", "Satellites", "Trumpets", "Origami", "Illusions", "Cameras")

TASK_ALPHA = 0.05  # the level at which a task's effect counts as found (each task one test: no correction)



def label_token_ids(handle: ModelHandle, prompt: Prompt, labels: Sequence[str]) -> list[int]:
    """The token id of each label as the model would write it right after ``prompt`` (its prefilled answer stem):
    ``prompt.text + label`` must tokenise as ``prompt``'s tokens plus exactly one more. A label that is several
    tokens (or merges with the stem) is a ``ValueError`` naming it and its pieces."""
    ids = []
    for label in labels:
        if not isinstance(label, str) or not label:
            raise ValueError(f"label {label!r} must be a non-empty string")
        full = handle.tokenizer(prompt.text + label, add_special_tokens=False)["input_ids"]
        n = len(prompt.input_ids)
        if tuple(full[:n]) != prompt.input_ids or len(full) != n + 1:
            pieces = [handle.tokenizer.decode([i]) for i in full[n - 1:]]
            raise ValueError(f"label {label!r} is not a single token after the answer stem for {handle.name} "
                             f"(the stem's last token and the label tokenise as {pieces}); use single-token labels "
                             f"such as digits 1..9 or letters")
        ids.append(int(full[n]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"labels {list(labels)} do not give distinct tokens")
    return ids



def strength_columns(trials: Sequence[Trial], h_norm: torch.Tensor) -> tuple[list[float], list[float]]:
    """``effective_strength`` s·‖v‖ and ``relative_strength`` s·‖v‖/‖h‖ of each trial (0 without a vector)."""
    eff = [abs(t.scale) * t.vector.norm if t.vector is not None else 0.0 for t in trials]
    rel = [e / float(h_norm[t.injection_layer]) if t.vector is not None else 0.0 for e, t in zip(eff, trials,
                                                                                                  strict=True)]
    return eff, rel



def task_null_vectors(handle: ModelHandle, vectors: Sequence[ConceptVector], nulls: Sequence[str], n_random: int,
                  seed: int) -> list[ConceptVector]:
    """``n_random`` null vectors of each kind per vector (the in-distribution kinds drawn from the baseline words)."""
    nulls = check_nulls(nulls)
    source = null_source(handle) if n_random and set(nulls) & {"covariance", "other-word"} else None
    return [null_vector(v, seed + k, kind, source) for v in vectors for kind in nulls for k in range(n_random)]



def vector_columns(vectors: Sequence[ConceptVector | None]) -> dict:
    return {"vector_kind": [v.kind if v is not None else "none" for v in vectors],
            "null_kind": [(v.null or "") if v is not None else "" for v in vectors],
            "vector_seed": pd.array([v.seed if v is not None else None for v in vectors], dtype="Int64"),
            "vector_norm": [v.norm if v is not None else 0.0 for v in vectors]}



def check_task_inputs(handle: ModelHandle, scales: Sequence[float], n_random: int) -> None:
    if not list(scales):
        raise ValueError("no scales given")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"scale {s!r} must be a finite number")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise ValueError(f"n_random must be an integer >= 0, got {n_random!r}")



def condition_name(vector: ConceptVector | None) -> str:
    """"concept", "random" or "none" (no injection): the condition a task row is in."""
    if vector is None:
        return "none"
    return "random" if vector.kind == "random" else "concept"



def save_task_table(handle: ModelHandle, df: pd.DataFrame, spec: dict, prompts: Sequence[Prompt],
                    results_dir, name: str,
          extra: dict | None = None) -> SweepResult:
    meta = metadata(handle, spec, [p.hash for p in prompts])
    meta.update(extra or {})
    result = SweepResult(df, meta)
    if results_dir is not None:
        result.save(Path(results_dir) / name)
    return result



def best_column(summary: pd.DataFrame) -> str:
    """The column a task summary's "best" is read by (:func:`best_row`): ``accuracy`` where the model names
    something (forced choice, strength comparison), else ``mean_gap`` (congruence, which names nothing)."""
    for column in ("accuracy", "mean_gap"):
        if column in summary:
            return column
    raise ValueError(f"a task summary has an 'accuracy' or a 'mean_gap' column; this one has {list(summary.columns)}")


def best_row(summary: pd.DataFrame) -> pd.Series:
    """The concept vectors' best point (scale or layer) of a task summary — the one definition every reading, figure
    and "found" rule of the tasks uses: the row with the highest accuracy (the fraction of trials the model gets
    right, the number the "found" rules test against chance; congruence: the largest mean gap,
    :func:`best_column`), ties to the first (the smallest scale or layer)."""
    conc = summary[summary["condition"] == "concept"]
    if conc.empty:
        raise ValueError("the summary has no concept-vector rows")
    return conc.loc[conc[best_column(summary)].idxmax()]

