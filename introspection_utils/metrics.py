"""The atlas: every concept measured the same way and given a calibrated verdict — is its "yes" introspection, or a
generic push of the logits that the control questions share?

The definitions (introspection-specific shift, flip scale, answer mass), the test and the classes live in
:mod:`introspection_utils.verdicts`; this module runs the sweep the test needs and words the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from introspection_utils.prompts import introspection_questions
from introspection_utils.sweeps import SweepResult, save_table, scale_sweep
from introspection_utils.vectors import default_layer
from introspection_utils.verdicts import (
    ALPHA,
    EFFECT_THRESHOLD,
    MIN_ANSWER_MASS,
    MIN_RANDOM,
    N_BOOT,
    class_counts,
    random_null,
    verdicts,
)

if TYPE_CHECKING:
    from introspection_utils.executors import LocalExecutor, RayExecutor
    from introspection_utils.models import ModelHandle
    from introspection_utils.vectors import VectorBank


def run_atlas(handle: ModelHandle, concepts: Sequence[str], scales: Sequence[float], *, layer: int | None = None,
              n_controls: int = 10, wordings: Sequence[str] | None = None, n_random: int = 2, seed: int = 0,
              n_boot: int = N_BOOT, alpha: float = ALPHA, effect_threshold: float = EFFECT_THRESHOLD,
              results_dir: str | Path | None = None, bank: VectorBank | None = None, progress: bool = True,
              executor: str | LocalExecutor | RayExecutor = "local", address: str | None = None
              ) -> tuple[pd.DataFrame, SweepResult]:
    """Measure every concept's scale sweep at one layer (default: 2/3 of the depth) with every introspection wording
    (``wordings``: default all of :func:`prompts.introspection_questions`), ``n_controls`` balanced controls and
    ``n_random`` random vectors per concept (pooled into the layer's null), and give each its verdict.

    ``executor``, ``address``: where the sweep's questions run (``"ray"``: over the actors of a Ray cluster; see
    :func:`sweeps.run_sweep`); the verdicts are computed here from the assembled table.

    Returns ``(verdict table, sweep)`` (:func:`verdicts.verdicts` columns); with ``results_dir`` the sweep is saved
    as ``atlas_sweep.csv`` (resumable) and the table as ``atlas.csv``, each beside its ``.meta.json``.
    """
    layer = default_layer(handle, layer)
    if n_controls < 2:
        raise ValueError(f"n_controls must be >= 2 (one about the model, one about the world), got {n_controls}")
    if len(concepts) * n_random < MIN_RANDOM:
        raise ValueError(f"the random-vector null needs at least {MIN_RANDOM} random vectors at the layer; "
                         f"{len(concepts)} concept(s) × n_random={n_random} give {len(concepts) * n_random}")
    wordings = list(wordings) if wordings is not None else introspection_questions()
    sweep = scale_sweep(handle, concepts, scales, layer=layer, n_controls=n_controls, introspection=wordings,
                        n_random=n_random, seed=seed, results_dir=results_dir, name="atlas_sweep", bank=bank,
                        progress=progress, executor=executor, address=address)
    table = verdicts(sweep.df, alpha=alpha, effect_threshold=effect_threshold, n_boot=n_boot, seed=seed)
    if results_dir is not None:
        save_table(handle, table, results_dir, "atlas", concepts=list(concepts), scales=list(scales), layer=layer,
                   n_controls=n_controls, wordings=wordings, n_random=n_random, seed=seed, n_boot=n_boot,
                   alpha=alpha, effect_threshold=effect_threshold)
    return table, sweep


def summary(table: pd.DataFrame, df: pd.DataFrame, *, alpha: float = ALPHA) -> str:
    """Sentences computed from a verdict table and its sweep: the class counts, each introspection-specific concept
    with its shift, interval and q-value, the random-vector null, and how many readings sit at a low answer mass."""
    counts = class_counts(table)
    parts = [f"{len(table)} concepts at layer {', '.join(map(str, sorted(table['layer'].unique())))}: "
             + ", ".join(f"{n} {c}" for c, n in counts.items()) + f" (α = {alpha:g}, Benjamini–Hochberg)."]
    specific = table[table["class"] == "introspection-specific"]
    for r in specific.itertuples():
        parts.append(f"'{r.concept}' is introspection-specific: S = {r.shift:+.2f} at scale {r.peak_scale:g} "
                     f"(95% CI {r.shift_ci_low:+.2f} to {r.shift_ci_high:+.2f}), p_questions = {r.p_questions:.3g}, "
                     f"p_random = {r.p_random:.3g}, q = {r.q_value:.3g}.")
    if specific.empty:
        best = table.iloc[0]
        parts.append(f"None is introspection-specific; the smallest q-value is '{best['concept']}' (q = "
                     f"{best['q_value']:.3g}, S = {best['shift']:+.2f} at scale {best['peak_scale']:g}, p_questions "
                     f"= {best['p_questions']:.3g}, p_random = {best['p_random']:.3g}).")
    null = random_null(df)
    null = null.loc[null["vector_kind"] == "random", "statistic"]
    if len(null):
        beat = int((table["shift"] > null.max()).sum())
        parts.append(f"The {len(null)} random vectors' largest shifts: mean {null.mean():+.2f}, max {null.max():+.2f}; "
                     f"{beat} of {len(table)} concepts exceed every random vector.")
    low = int(table["low_mass"].sum())
    if low:
        parts.append(f"{low} of {len(table)} concepts are read where the introspection answer mass P(yes)+P(no) is "
                     f"below {MIN_ANSWER_MASS} (median {table['answer_mass'].median():.2f}): there 'yes over no' is "
                     f"not the model's answer.")
    return " ".join(parts)
