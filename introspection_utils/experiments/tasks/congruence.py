"""Named-concept congruence (the mismatch test of agastyasridharan/introspection), one of the tasks a yes-bias
cannot score (:mod:`introspection_utils.experiments.tasks`): "Do you detect an injected thought about X?" with X the
injected concept (congruent) or the concept of the bank whose vector is most anti-aligned with it (incongruent), at
the same scales. A yes-bias lifts both; the congruence gap (congruent Δ − incongruent Δ) per concept is tested
across concepts by an exact (or seeded Monte-Carlo) sign-flip permutation test and Wilcoxon's."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from scipy import stats

from introspection_utils.core.data import load_prompts
from introspection_utils.core.results import SweepResult
from introspection_utils.engine.measure import Trial, measure
from introspection_utils.engine.prompts import Prompt, introspection_prompt
from introspection_utils.engine.vectors import (
    VectorBank,
    check_nulls,
    concept_vectors,
    cosine_similarity_matrix,
    default_layer,
    residual_norms,
)
from introspection_utils.experiments.tasks.common import (
    DEFAULT_CONCEPTS,
    TASK_ALPHA,
    best_row,
    check_task_inputs,
    condition_name,
    save_task_table,
    strength_columns,
    task_null_vectors,
    vector_columns,
)

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

MAX_EXACT_FLIPS = 16  # up to this many concepts the sign-flip test enumerates all 2^n flips

N_FLIPS = 20000  # else this many seeded random flips



def congruence_prompt(handle: ModelHandle, concept: str, *, system: str | None = None) -> Prompt:
    """The paper's frame asking "Trial 1: Do you detect an injected thought about {concept}?" (``data/prompts.toml``
    [congruence]); the injection window starts on the "\\n\\n" before it, as in the paper's prompt."""
    question = load_prompts()["congruence"]["question"].format(concept=concept.lower())
    return introspection_prompt(handle, question, kind="congruence", system=system)



def incongruent_partners(bank: VectorBank, layer: int, concepts: Sequence[str] | None = None) -> dict[str, str]:
    """Each concept's incongruent partner: the other concept of ``bank`` whose vector at ``layer`` is most
    anti-aligned with it (lowest cosine)."""
    concepts = list(concepts) if concepts is not None else list(bank.words)
    if len(bank.words) < 2:
        raise ValueError("the congruence test needs at least 2 concepts in the bank")
    cos = cosine_similarity_matrix(bank, layer).clone()
    cos.fill_diagonal_(float("inf"))
    return {c: bank.words[int(cos[bank.words.index(c)].argmin())] for c in concepts}



def run_congruence(handle: ModelHandle, concepts: Sequence[str] = DEFAULT_CONCEPTS, *, layer: int | None = None,
                   scales: Sequence[float] = (4.0, 8.0), n_random: int = 1, nulls: Sequence[str] = ("isotropic",),
                   seed: int = 0, bank: VectorBank | None = None, results_dir: str | Path | None = None,
                   name: str = "congruence", batch_size: int | None = None, progress: bool = True) -> SweepResult:
    """Each concept's vector (and ``n_random`` null vectors of each kind, norm-matched to it) injected at
    ``scales`` under the congruent question (naming the concept) and the incongruent one (naming its most
    anti-aligned partner, :func:`incongruent_partners`).

    One row per trial: ``model, condition, vector_kind, null_kind, vector_seed, vector_norm, concept, named,
    congruent, layer, scale, effective_strength, relative_strength, logit_diff, baseline_logit_diff, delta,
    answer_mass`` (``delta``: yes − no minus the same question's no-injection value).
    """
    concepts = list(concepts)
    if len(concepts) < 2 or len(set(concepts)) != len(concepts):
        raise ValueError(f"the congruence test needs at least 2 distinct concepts, got {concepts}")
    layer = default_layer(handle, layer)
    check_task_inputs(handle, scales, n_random)
    check_nulls(nulls)
    bank = bank or concept_vectors(handle, concepts, progress=progress)
    partners = incongruent_partners(bank, layer, concepts)
    trials, meta_rows, prompts = [], [], {}
    randoms = {c: task_null_vectors(handle, [bank.get(c, layer)], nulls, n_random, seed) for c in concepts}
    for c in concepts:
        for named, congruent in ((c, True), (partners[c], False)):
            prompt = prompts.setdefault(named, congruence_prompt(handle, named))
            for v in (bank.get(c, layer), *randoms[c]):
                for s in scales:
                    trials.append(Trial(prompt, v, float(s)))
                    meta_rows.append((c, named, congruent))
    readout = measure(handle, trials, batch_size=batch_size)
    h_norm = residual_norms(handle, next(iter(prompts.values())))
    eff, rel = strength_columns(trials, h_norm)
    df = pd.DataFrame({
        "model": handle.name,
        "condition": [condition_name(t.vector) for t in trials],
        **vector_columns([t.vector for t in trials]),
        "concept": [m[0] for m in meta_rows],
        "named": [m[1] for m in meta_rows],
        "congruent": [m[2] for m in meta_rows],
        "layer": layer,
        "scale": [t.scale for t in trials],
        "effective_strength": eff,
        "relative_strength": rel,
        "logit_diff": readout.logit_diff.double().numpy(),
        "baseline_logit_diff": readout.baseline.double().numpy(),
        "answer_mass": readout.answer_mass.double().numpy(),
    })
    df["delta"] = df["logit_diff"] - df["baseline_logit_diff"]
    spec = {"task": "congruence", "concepts": concepts, "layer": layer, "scales": [float(s) for s in scales],
            "n_random": n_random, "nulls": list(nulls), "seed": seed, "partners": partners}
    return save_task_table(handle, df, spec, list(prompts.values()), results_dir, name)



def congruence_gaps(df: pd.DataFrame) -> pd.DataFrame:
    """Per (condition, null_kind, vector_seed, concept, layer, scale): ``congruent`` Δ, ``incongruent`` Δ and
    ``gap`` = congruent − incongruent."""
    keys = ["condition", "null_kind", "vector_seed", "concept", "layer", "scale"]
    wide = df.pivot_table(index=keys, columns="congruent", values="delta", aggfunc="mean", dropna=False)
    wide = wide.rename(columns={True: "congruent", False: "incongruent"}).reset_index()
    wide = wide.dropna(subset=["congruent", "incongruent"])
    wide["gap"] = wide["congruent"] - wide["incongruent"]
    wide.columns.name = None
    return wide[[*keys, "congruent", "incongruent", "gap"]]



def sign_flip_test(values: Sequence[float], *, seed: int = 0) -> float:
    """One-sided p-value that the mean of paired differences ``values`` is > 0: the sign-flip permutation test
    (every one of the 2^n flips when n ≤ :data:`MAX_EXACT_FLIPS`, else :data:`N_FLIPS` seeded ones)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return float("nan")
    observed = x.mean()
    if len(x) <= MAX_EXACT_FLIPS:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(x))))
        means = (signs * x).mean(1)
        return float((means >= observed - 1e-12).mean())
    rng = np.random.default_rng([int(seed), 11])
    means = (rng.choice((1.0, -1.0), size=(N_FLIPS, len(x))) * x).mean(1)
    return float((1 + (means >= observed - 1e-12).sum()) / (1 + N_FLIPS))



def congruence_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per (condition, null_kind, layer, scale), across concepts (null vectors: their seeds averaged per concept
    first): ``n_concepts, mean_congruent, mean_incongruent, mean_gap, n_positive, p_signflip`` (one-sided,
    gap > 0; its random flips, beyond :data:`MAX_EXACT_FLIPS` concepts, seeded by a constant: the same table always
    gives the same p) and ``p_wilcoxon`` (one-sided signed-rank; NaN when every gap is 0)."""
    gaps = congruence_gaps(df)
    per = gaps.groupby(["condition", "null_kind", "concept", "layer", "scale"], as_index=False)[
        ["congruent", "incongruent", "gap"]].mean()
    rows = []
    for key, g in per.groupby(["condition", "null_kind", "layer", "scale"], sort=True):
        gap = g["gap"].to_numpy()
        try:
            p_w = float(stats.wilcoxon(gap, alternative="greater").pvalue) if np.any(gap != 0) else float("nan")
        except ValueError:
            p_w = float("nan")
        rows.append({"condition": key[0], "null_kind": key[1], "layer": key[2], "scale": key[3],
                     "n_concepts": len(g), "mean_congruent": float(g["congruent"].mean()),
                     "mean_incongruent": float(g["incongruent"].mean()), "mean_gap": float(gap.mean()),
                     "n_positive": int((gap > 0).sum()), "p_signflip": sign_flip_test(gap),
                     "p_wilcoxon": p_w})
    return pd.DataFrame(rows)



def congruence_found(summary: pd.DataFrame, *, alpha: float = TASK_ALPHA) -> bool:
    """Whether naming the injected concept matters (:func:`congruence_summary`): at the concept vectors' best scale
    (:func:`common.best_row`: the largest mean gap), the sign-flip test across concepts gives p < ``alpha`` and every
    null vector kind's gap at that scale is smaller."""
    best = best_row(summary)
    nulls = summary[(summary["condition"] == "random") & (summary["scale"] == best["scale"])]
    return bool(best["mean_gap"] > 0 and best["p_signflip"] < alpha and (nulls["mean_gap"] < best["mean_gap"]).all())



def describe_congruence(summary: pd.DataFrame) -> str:
    """Sentences from :func:`congruence_summary`: the concept vectors' largest mean gap, its paired tests, what the
    congruent and incongruent questions did, and the null vectors' gaps at that scale."""
    best = best_row(summary)
    shared = ("both questions moved alike (a shared shift)" if abs(best["mean_gap"]) < 0.25 * max(
        abs(best["mean_congruent"]), abs(best["mean_incongruent"]), 1e-9) else "the named concept matters")
    parts = [f"Congruence at scale {best['scale']:g}: naming the injected concept moves yes − no by "
             f"{best['mean_congruent']:+.2f}, naming its most anti-aligned concept by {best['mean_incongruent']:+.2f}; "
             f"gap {best['mean_gap']:+.2f} logits, positive for {int(best['n_positive'])} of "
             f"{int(best['n_concepts'])} concepts (sign-flip p = {best['p_signflip']:.3g}, Wilcoxon p = "
             f"{best['p_wilcoxon']:.3g}): {shared}."]
    rand = summary[(summary["condition"] == "random") & (summary["scale"] == best["scale"])]
    for r in rand.itertuples():
        parts.append(f"{r.null_kind} null vectors: gap {r.mean_gap:+.2f} (p = {r.p_signflip:.3g}).")
    return " ".join(parts)

