"""The atlas: every concept measured the same way and given a calibrated verdict — is its "yes" introspection, or a
generic push of the logits that the control questions share?

The definitions (the introspection residual I, the contrast S, flip scale, answer mass), the test and the classes
live in :mod:`introspection_utils.verdicts`; this module runs the sweep the test needs and words the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from introspection_utils.prompts import default_wordings
from introspection_utils.sweeps import SweepResult, save_table, scale_sweep
from introspection_utils.vectors import default_layer
from introspection_utils.verdicts import (
    ALPHA,
    EFFECT_THRESHOLD,
    MIN_ANSWER_MASS,
    MIN_CONTROL_SPAN,
    MIN_FIT_CONTROLS,
    MIN_RANDOM,
    N_BOOT,
    class_counts,
    random_null,
    verdicts,
)

if TYPE_CHECKING:
    from introspection_utils.models import ModelHandle
    from introspection_utils.vectors import VectorBank


def run_atlas(handle: ModelHandle, concepts: Sequence[str], scales: Sequence[float], *, layer: int | None = None,
              n_controls: int = 12, wordings: Sequence[str] | None = None, n_random: int = 2, seed: int = 0,
              n_boot: int = N_BOOT, alpha: float = ALPHA, effect_threshold: float = EFFECT_THRESHOLD,
              answer_format: str = "open", results_dir: str | Path | None = None, bank: VectorBank | None = None,
              progress: bool = True
              ) -> tuple[pd.DataFrame, SweepResult]:
    """Measure every concept's scale sweep at one layer (default: 2/3 of the depth) with every introspection wording
    (``wordings``: default :func:`prompts.default_wordings`, detect and inverted), ``n_controls`` controls balanced by
    topic and expected answer, asked and read in ``answer_format`` (:data:`prompts.ANSWER_FORMATS`), and
    ``n_random`` random vectors per concept (pooled into the layer's null), and give each its verdict.

    Returns ``(verdict table, sweep)`` (:func:`verdicts.verdicts` columns); with ``results_dir`` the sweep is saved
    as ``atlas_sweep.csv`` (resumable) and the table as ``atlas.csv``, each beside its ``.meta.json``.
    """
    layer = default_layer(handle, layer)
    if n_controls < 2:
        raise ValueError(f"n_controls must be >= 2 (one about the model, one about the world), got {n_controls}")
    if len(concepts) * n_random < MIN_RANDOM:
        raise ValueError(f"the random-vector null needs at least {MIN_RANDOM} random vectors at the layer; "
                         f"{len(concepts)} concept(s) × n_random={n_random} give {len(concepts) * n_random}")
    wordings = list(wordings) if wordings is not None else default_wordings()
    sweep = scale_sweep(handle, concepts, scales, layer=layer, n_controls=n_controls, introspection=wordings,
                        n_random=n_random, seed=seed, answer_format=answer_format, results_dir=results_dir,
                        name="atlas_sweep", bank=bank, progress=progress)
    table = verdicts(sweep.df, alpha=alpha, effect_threshold=effect_threshold, n_boot=n_boot, seed=seed)
    if results_dir is not None:
        save_table(handle, table, results_dir, "atlas", concepts=list(concepts), scales=list(scales), layer=layer,
                   n_controls=n_controls, wordings=wordings, n_random=n_random, seed=seed, n_boot=n_boot,
                   alpha=alpha, effect_threshold=effect_threshold, answer_format=answer_format)
    return table, sweep


def summary(table: pd.DataFrame, df: pd.DataFrame, *, alpha: float = ALPHA) -> str:
    """Sentences computed from a verdict table and its sweep: the class counts, each introspection-specific concept
    with its I, interval, the controls' line and q-value (S beside it), degenerate fits, the random-vector null (I and
    S), and how many readings sit at a low answer mass."""
    counts = class_counts(table)
    parts = [f"{len(table)} concepts at layer {', '.join(map(str, sorted(table['layer'].unique())))}: "
             + ", ".join(f"{n} {c}" for c, n in counts.items()) + f" (α = {alpha:g}, Benjamini–Hochberg)."]
    specific = table[table["class"] == "introspection-specific"]
    for r in specific.itertuples():
        parts.append(f"'{r.concept}' is introspection-specific: I = {r.I:+.2f} at scale {r.peak_scale:g} "
                     f"(95% CI {r.I_ci_low:+.2f} to {r.I_ci_high:+.2f}; the controls' line b = {r.b:+.2f}, c = "
                     f"{r.c:+.2f}), p_questions = {r.p_questions:.3g}, p_random = {r.p_random:.3g}, q = "
                     f"{r.q_value:.3g}; S = {r.shift:+.2f}.")
    if specific.empty:
        best = table.iloc[0]
        parts.append(f"None is introspection-specific; the smallest q-value is '{best['concept']}' (q = "
                     f"{best['q_value']:.3g}, I = {best['I']:+.2f} at scale {best['peak_scale']:g}, p_questions "
                     f"= {best['p_questions']:.3g}, p_random = {best['p_random']:.3g}; S = {best['shift']:+.2f}).")
    degenerate = int((~table["fit_ok"].astype(bool)).sum())
    if degenerate:
        parts.append(f"For {degenerate} of {len(table)} concepts the controls' fit is degenerate (fewer than "
                     f"{MIN_FIT_CONTROLS} controls or baselines spanning < {MIN_CONTROL_SPAN:g} logits): no test.")
    null = random_null(df)
    null = null[null["vector_kind"] == "random"]
    if len(null):
        beat = int((table["I"] > null["statistic"].max()).sum())
        parts.append(f"The {len(null)} random vectors' largest I: median {null['statistic'].median():+.2f}, max "
                     f"{null['statistic'].max():+.2f} (their largest S: median {null['shift'].median():+.2f}); "
                     f"{beat} of {len(table)} concepts exceed every random vector on I.")
    low = int(table["low_mass"].sum())
    if low:
        parts.append(f"{low} of {len(table)} concepts are read where the introspection answer mass P(yes)+P(no) is "
                     f"below {MIN_ANSWER_MASS} (median {table['answer_mass'].median():.2f}): there 'yes over no' is "
                     f"not the model's answer.")
    return " ".join(parts)
