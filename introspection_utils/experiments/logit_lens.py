"""The yes−no logit lens as a tidy table, each row beside the same question without injection (notebooks 04 and 08)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from introspection_utils.engine.measure import Trial, measure, trial_grid
from introspection_utils.engine.prompts import question_prompts
from introspection_utils.engine.vectors import VectorBank, concept_vectors, with_random

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

__all__ = ["LENS_COLUMNS", "lens_profile"]

LENS_COLUMNS = ["model", "concept", "vector_kind", "vector_seed", "layer", "scale", "question_kind", "question",
                "lens_layer", "lens_diff", "baseline_lens_diff", "answer_mass", "baseline_answer_mass"]
# answer_mass: P(yes) + P(no) of the real output (the last layer), the same for every read-out layer of a trial


def lens_profile(handle: ModelHandle, concepts: Sequence[str], scales: float | dict[str, float], *, layer: int,
                 n_controls: int = 10, n_random: int = 1, seed: int = 0, bank: VectorBank | None = None,
                 ablate: torch.Tensor | None = None) -> pd.DataFrame:
    """Yes−no logit lens at every layer for each concept injected at ``layer`` with its scale (one number for all
    concepts or ``{concept: scale}``), on the introspection question and ``n_controls`` control questions, with the
    concept vector and ``n_random`` norm-matched random vectors; each row also carries the same question's lens
    without injection. Columns: :data:`LENS_COLUMNS` (one row per trial × read-out layer). ``ablate``: a direction
    projected out of the residual stream in every pass (see :func:`introspection_utils.engine.measure.measure`).
    """
    handle.check_layer(layer)
    per_concept = scales if isinstance(scales, dict) else {c: float(scales) for c in concepts}
    missing = [c for c in concepts if c not in per_concept]
    if missing:
        raise ValueError(f"no scale given for concept(s) {missing}")
    bank = bank or concept_vectors(handle, concepts, progress=False)
    prompts = question_prompts(handle, n_controls)
    trials = [t for c in concepts for t in trial_grid(with_random(bank.get(c, layer), n_random, seed), prompts,
                                                      [per_concept[c]])]
    rows = [(t.vector.concept, t.vector.kind, t.vector.seed, t.prompt.kind, t.prompt.question) for t in trials]
    baselines = [Trial(p) for p in prompts]
    readout = measure(handle, trials + baselines, lens=True, ablate=ablate)
    lens, base = readout.lens[: len(trials)].numpy(), readout.lens[len(trials):].numpy()
    base_of = {p.question: base[i] for i, p in enumerate(prompts)}
    mass = readout.answer_mass[: len(trials)].numpy()
    base_mass = dict(zip((p.question for p in prompts), readout.answer_mass[len(trials):].tolist(), strict=True))
    frames = []
    n_layers = handle.arch.n_layers
    for (concept, kind, vseed, qkind, question), values, m in zip(rows, lens, mass, strict=True):
        frames.append(pd.DataFrame({
            "model": handle.name, "concept": concept, "vector_kind": kind, "vector_seed": vseed, "layer": layer,
            "scale": float(per_concept[concept]), "question_kind": qkind, "question": question,
            "lens_layer": np.arange(n_layers), "lens_diff": values, "baseline_lens_diff": base_of[question],
            "answer_mass": float(m), "baseline_answer_mass": base_mass[question]}))
    df = pd.concat(frames, ignore_index=True)[LENS_COLUMNS]
    df["vector_seed"] = df["vector_seed"].astype("Int64")
    return df
