"""Forced choice among concepts (acsresearch/latent-introspection-code, arXiv 2602.20031), one of the tasks a
yes-bias cannot score (:mod:`introspection_utils.experiments.tasks`): one of N concepts is injected; the model picks its
number from a list of the N, listed in a shuffled order per trial (seeded) and mapped back to the concept. The
readout is the N label tokens' logits at the answer position (a prefilled stem). The listings form Latin squares
(every concept at every position equally often), so an answer by position alone scores exactly 1/N. The outputs: an
N×N confusion matrix, accuracy against chance 1/N and against the position-matched chance (Wilson interval), and the
mutual information between injected and chosen concept in bits, with a permutation null. The same with no injection
and with norm-matched null vectors."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from introspection_utils.core.data import load_prompts
from introspection_utils.core.paths import checkpoint
from introspection_utils.core.results import SweepResult
from introspection_utils.engine.measure import Trial, answer_logits
from introspection_utils.engine.prompts import Prompt, chat_prompt
from introspection_utils.engine.vectors import (
    VectorBank,
    check_nulls,
    concept_vectors,
    default_layer,
    residual_norms,
)
from introspection_utils.experiments.tasks.common import (
    DEFAULT_CONCEPTS,
    TASK_ALPHA,
    best_row,
    check_task_inputs,
    condition_name,
    label_token_ids,
    save_task_table,
    strength_columns,
    task_null_vectors,
    vector_columns,
)
from introspection_utils.stats.accuracy import (
    accuracy_summary,
    chance_bar,
    chance_sentence,
    position_matched_chance,
    position_sentence,
    positions_balanced,
)

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

N_PERMUTATIONS = 2000  # permutation draws of the mutual-information null
# The null's draws are seeded by a constant, not by the run's seed: a summary is a function of its table alone, so the
# notebook's figure, its printed table and the findings' row (each summarising the same saved table) read one number.
PERMUTATION_SEED = 0



def forced_choice_prompt(handle: ModelHandle, options: Sequence[str], *, labels: Sequence[str] | None = None,
                         system: str | None = None) -> Prompt:
    """The paper's frame with the forced-choice trial: ``options`` (concepts, in the order shown) numbered by
    ``labels`` (default "1".."N"), the answer prefilled with "The answer is " (``data/prompts.toml``
    [forced_choice]). The injection starts on the "\\n\\n" before the trial line."""
    options = list(options)
    labels = list(labels) if labels is not None else [str(i + 1) for i in range(len(options))]
    if not 2 <= len(options) <= 9 and labels == [str(i + 1) for i in range(len(options))]:
        raise ValueError(f"{len(options)} options given; digit labels cover 2..9 (pass letters for more)")
    if len(labels) != len(options):
        raise ValueError(f"{len(labels)} labels for {len(options)} options")
    p, frame = load_prompts()["forced_choice"], load_prompts()["injected_thought"]
    trial = p["trial"].format(options=numbered_listing(p["option_format"], options, labels))
    last = frame["trial_lead"] + frame["separator"] + trial
    messages = [{"role": "user", "content": frame["preamble"]},
                {"role": "assistant", "content": frame["assistant_ack"]}, {"role": "user", "content": last}]
    return chat_prompt(handle, messages, injection_from=len(frame["trial_lead"]), prefill=p["prefill"],
                       kind="forced-choice", question=trial, system=system)



def numbered_listing(option_format: str, options: Sequence[str], labels: Sequence[str] | None = None) -> str:
    """``options`` one to a line in the order given, each by ``option_format`` (``{label}``, ``{concept}``) with its
    label from ``labels`` (default "1".."N"): the listing of notebook 13's trial and of the organisms' forced-choice
    training rows."""
    labels = list(labels) if labels is not None else [str(i + 1) for i in range(len(options))]
    return "\n".join(option_format.format(label=lab, concept=c) for lab, c in zip(labels, options, strict=True))



def balanced_orders(n: int, n_orders: int, seed: int) -> list[list[int]]:
    """Listings of ``range(n)`` in which every item stands at every position equally often: ``n_orders`` rounded
    up to a multiple of ``n`` — ⌈n_orders / n⌉ seeded base permutations, each with its ``n`` cyclic rotations (a
    Latin square per base). ``order[i]`` is the concept shown at position ``i``."""
    if isinstance(n_orders, bool) or not isinstance(n_orders, int) or n_orders < 1:
        raise ValueError(f"n_orders must be an integer >= 1, got {n_orders!r}")
    rng = np.random.default_rng([int(seed), n, 13])
    bases = [[int(i) for i in rng.permutation(n)] for _ in range(-(-n_orders // n))]
    return [[base[(i + r) % n] for i in range(n)] for base in bases for r in range(n)]



def choices_from_logits(logits: torch.Tensor, order: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The label logits ``[n, N]`` (positions in the shown order) mapped back to the canonical concepts:
    ``(chosen concept index [n], probabilities [n, N])``, probabilities = softmax over the N labels, column ``c``
    the probability of concept ``c`` (whichever position it was shown at)."""
    probs_by_position = logits.float().softmax(-1)
    canonical = torch.empty_like(probs_by_position)
    canonical[:, torch.as_tensor(list(order))] = probs_by_position
    return torch.as_tensor(list(order))[logits.argmax(-1)], canonical



def run_forced_choice(handle: ModelHandle, concepts: Sequence[str] = DEFAULT_CONCEPTS, *, layer: int | None = None,
                      scales: Sequence[float] = (4.0, 8.0), n_orders: int = 4, n_random: int = 1,
                      nulls: Sequence[str] = ("isotropic",), seed: int = 0, bank: VectorBank | None = None,
                      results_dir: str | Path | None = None, name: str = "forced_choice",
                      batch_size: int | None = None, progress: bool = True) -> SweepResult:
    """Forced choice among ``concepts`` (2..9): every concept injected at every scale under ``n_orders`` listings
    rounded up to a multiple of N (:func:`balanced_orders`: every concept at every position equally often, so a
    position bias scores exactly chance; N concepts × the listings trials per point), plus each listing without
    injection, plus ``n_random`` null vectors of each kind in ``nulls`` per concept (norm-matched to it, its
    "target" being that concept).

    One row per trial: ``model, condition ("concept", "random", "none"), vector_kind, null_kind, vector_seed,
    vector_norm, layer, scale, effective_strength, relative_strength, order_index, order, target, chosen,
    chosen_label, correct, p_target, p_<concept>…`` (probabilities over the N labels, canonical concept order).
    A no-injection row is repeated once per target concept (its choice cannot depend on it), so every condition
    has the same targets. ``layer=None``: 2/3 of the depth.
    """
    concepts = list(concepts)
    if not 2 <= len(concepts) <= 9 or len(set(concepts)) != len(concepts):
        raise ValueError(f"forced choice needs 2..9 distinct concepts, got {concepts}")
    layer = default_layer(handle, layer)
    check_task_inputs(handle, scales, n_random)
    check_nulls(nulls)
    orders = balanced_orders(len(concepts), n_orders, seed)
    bank = bank or concept_vectors(handle, concepts, progress=progress)
    vectors = [bank.get(c, layer) for c in concepts]
    randoms = task_null_vectors(handle, vectors, nulls, n_random, seed)
    labels = [str(i + 1) for i in range(len(concepts))]
    # each listing's answers kept under <results_dir>/.chunks/: an interrupted run resumes at the next listing
    key = {"model": handle.name, "revision": handle.revision, "dtype": str(handle.dtype), "layer": layer,
           "scales": [float(s) for s in scales], "vectors": hashlib.sha256(torch.stack(
               [v.vector.float() for v in (*vectors, *randoms)]).numpy().tobytes()).hexdigest()[:16]}
    rows, prompts = [], []
    for k, order in enumerate(orders):
        prompt = forced_choice_prompt(handle, [concepts[i] for i in order], labels=labels)
        prompts.append(prompt)
        ids = label_token_ids(handle, prompt, labels)
        trials = [Trial(prompt, v, float(s)) for v in (*vectors, *randoms) for s in scales] + [Trial(prompt)]
        listing = {**key, "prompt": [prompt.text, list(prompt.input_ids), prompt.injection_start], "ids": list(ids)}
        logits = checkpoint(results_dir, f"{name}-listing{k:03d}", listing,  # [n, N], positions as shown
                            lambda trials=trials, ids=ids: answer_logits(handle, trials, ids, batch_size=batch_size))
        chosen, probs = choices_from_logits(logits, order)
        h_norm = residual_norms(handle, prompt)
        eff, rel = strength_columns(trials, h_norm)
        for i, trial in enumerate(trials):
            targets = range(len(concepts)) if trial.vector is None else [concepts.index(trial.vector.concept)]
            for target in targets:
                rows.append((k, order, trial, target, int(chosen[i]), probs[i], eff[i], rel[i]))
    df = pd.DataFrame({
        "model": handle.name,
        "condition": [condition_name(r[2].vector) for r in rows],
        **vector_columns([r[2].vector for r in rows]),
        "layer": layer,
        "scale": [r[2].scale for r in rows],
        "effective_strength": [r[6] for r in rows],
        "relative_strength": [r[7] for r in rows],
        "order_index": [r[0] for r in rows],
        "order": [",".join(concepts[i] for i in r[1]) for r in rows],
        "target": [concepts[r[3]] for r in rows],
        "chosen": [concepts[r[4]] for r in rows],
        "chosen_label": [labels[r[1].index(r[4])] for r in rows],
        "p_target": [float(r[5][r[3]]) for r in rows],
        **{f"p_{c}": [float(r[5][j]) for r in rows] for j, c in enumerate(concepts)},
    })
    df["correct"] = df["target"] == df["chosen"]
    spec = {"task": "forced_choice", "concepts": concepts, "layer": layer, "scales": [float(s) for s in scales],
            "n_orders": len(orders), "n_orders_asked": n_orders, "n_random": n_random, "nulls": list(nulls),
            "seed": seed, "labels": labels}
    return save_task_table(handle, df, spec, prompts, results_dir, name)



def confusion_matrix(targets: Sequence, chosen: Sequence, labels: Sequence) -> np.ndarray:
    """``[N, N]`` counts: row = injected (target) concept, column = chosen concept, in the order of ``labels``."""
    index = {c: i for i, c in enumerate(labels)}
    out = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, c in zip(targets, chosen, strict=True):
        out[index[t], index[c]] += 1
    return out



def mutual_information(confusion: np.ndarray) -> float:
    """Plug-in mutual information (bits) between rows and columns of a count matrix ``[N, M]``:
    Σ p(t,c) log2 p(t,c) / (p(t) p(c)). 0 when the choice does not depend on the target."""
    joint = np.asarray(confusion, dtype=float)
    total = joint.sum()
    if total == 0:
        return float("nan")
    joint = joint / total
    outer = joint.sum(1, keepdims=True) @ joint.sum(0, keepdims=True)
    nz = joint > 0
    return float(max((joint[nz] * np.log2(joint[nz] / outer[nz])).sum(), 0.0))



def mi_permutation_test(targets: Sequence, chosen: Sequence, labels: Sequence, *, n_permutations: int = N_PERMUTATIONS,
                        seed: int = 0) -> tuple[float, float, float]:
    """``(mi, p, null_mean)``: the mutual information of (target, chosen) and its permutation p-value — the
    choices shuffled against the targets ``n_permutations`` times (seeded), p = (1 + #{MI_perm ≥ MI}) / (1 + n).
    ``null_mean`` is the permutation mean (the plug-in estimate's bias at this n)."""
    labels = list(labels)
    t = np.array([labels.index(x) for x in targets])
    c = np.array([labels.index(x) for x in chosen])
    n = len(labels)
    mi = mutual_information(np.bincount(t * n + c, minlength=n * n).reshape(n, n))
    rng = np.random.default_rng([int(seed), 7])
    perm = np.array([mutual_information(np.bincount(t * n + rng.permutation(c), minlength=n * n).reshape(n, n))
                     for _ in range(n_permutations)])
    p = float((1 + (perm >= mi - 1e-12).sum()) / (1 + n_permutations))
    return mi, p, float(perm.mean())



def target_and_answer_positions(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The 0-based position at which each row's listing showed its target, and the position the model answered."""
    target = np.array([order.split(",").index(t) for order, t in zip(df["order"], df["target"], strict=True)],
                      dtype=np.int64)
    return target, df["chosen_label"].astype(int).to_numpy() - 1


def forced_choice_summary(df: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """Per (condition, null_kind, layer, scale): ``n, correct, accuracy, chance (1/N), ci_low, ci_high`` (Wilson),
    ``p_binomial``, ``mde`` (:func:`stats.accuracy.accuracy_summary`), ``position_chance`` (the accuracy a responder
    answering by position alone would get on this group's listings, answering positions as often as the
    no-injection trials do or as each null kind's trials at that scale do — the largest of these,
    :func:`stats.accuracy.position_matched_chance`; 1/N exactly whenever every concept of the group is the target
    under every listing, as in :func:`run_forced_choice`), ``balanced`` (each concept was the target at every
    position equally often: the Latin-square listings; then a concept's own row of the confusion matrix is free of
    position too; a table without ``order`` and ``chosen_label`` has neither: NaN and False), ``mi_bits``,
    ``mi_p`` (permutation: :data:`N_PERMUTATIONS` draws seeded by :data:`PERMUTATION_SEED` over the group's (target,
    chosen) pairs in sorted order, so the same trials, in any row order, always give the same p), ``mi_null_mean``.
    The no-injection rows form one group (scale 0)."""
    df = df.reset_index(drop=True)  # positions below are row numbers
    concepts = sorted(set(df["target"]))
    n = len(concepts)
    chance = 1.0 / n
    has_positions = {"order", "chosen_label"} <= set(df.columns)  # a table without its listings has no positions
    target_pos, answer_pos = (target_and_answer_positions(df) if has_positions else
                              (np.zeros(len(df), dtype=np.int64), np.zeros(len(df), dtype=np.int64)))
    target_idx = np.array([concepts.index(t) for t in df["target"]], dtype=np.int64)
    none = (df["condition"] == "none").to_numpy()
    rows = []
    keys = ["condition", "null_kind", "layer", "scale"]
    for key, group in df.groupby(keys, sort=True, dropna=False):
        at = df.index.get_indexer(group.index)
        references = [answer_pos[none]] + [answer_pos[df.index.get_indexer(g.index)] for _, g in
                                           df[(df["condition"] == "random") & (df["scale"] == key[3])]
                                           .groupby("null_kind", sort=True)]
        position_chance = (max((position_matched_chance(target_pos[at], r, n) for r in references if len(r)),
                               default=chance) if has_positions else float("nan"))
        group = group.sort_values(["target", "chosen"], kind="stable")  # the draws see the pairs, not the row order
        mi, p, null_mean = mi_permutation_test(group["target"], group["chosen"], concepts,
                                               n_permutations=N_PERMUTATIONS, seed=PERMUTATION_SEED)
        acc = accuracy_summary(int(group["correct"].sum()), len(group), chance, level=level)
        rows.append({**dict(zip(keys, key, strict=True)), "n": acc.n, "correct": acc.correct, "accuracy": acc.accuracy,
                     "chance": chance, "position_chance": position_chance,
                     "balanced": has_positions and positions_balanced(target_idx[at] * n + target_pos[at], n * n),
                     "ci_low": acc.ci_low, "ci_high": acc.ci_high,
                     "p_binomial": acc.p_binomial, "mde": acc.mde, "mi_bits": mi, "mi_p": p,
                     "mi_null_mean": null_mean})
    return pd.DataFrame(rows)



def forced_choice_found(summary: pd.DataFrame, *, alpha: float = TASK_ALPHA) -> bool:
    """Whether the concept vectors are identified (:func:`forced_choice_summary`): at their best scale
    (:func:`common.best_row`) the accuracy's interval lies above chance and above the position-matched chance
    (:func:`stats.accuracy.chance_bar`), MI beats its permutation null (p < ``alpha``), and every null vector kind at
    that scale scores below the interval's low end."""
    best = best_row(summary)
    nulls = summary[(summary["condition"] == "random") & (summary["scale"] == best["scale"])]
    return bool(best["ci_low"] > chance_bar(best) and best["mi_p"] < alpha
                and (nulls["accuracy"] < best["ci_low"]).all())



def describe_forced_choice(summary: pd.DataFrame) -> str:
    """Sentences from :func:`forced_choice_summary`: the concept vectors' best scale (:func:`common.best_row`)
    against chance and MI's null, and what no injection and the null vectors do."""
    best = best_row(summary)
    chance = float(best["chance"])
    parts = [f"Forced choice among {round(1 / chance)} concepts (chance {chance:.0%}): the concept vectors are "
             f"named most often at scale {best['scale']:g}, {chance_sentence(best)}; mutual information "
             f"{best['mi_bits']:.2f} bits (permutation p = {best['mi_p']:.3g}, permutation mean "
             f"{best['mi_null_mean']:.2f})."]
    if not pd.isna(best.get("position_chance", float("nan"))):
        parts.append(position_sentence(best, "listings", "every concept at every position"))
    none = summary[summary["condition"] == "none"]
    if len(none):
        r = none.iloc[0]
        parts.append(f"Without injection {r['accuracy']:.0%} (MI {r['mi_bits']:.2f} bits, p = {r['mi_p']:.3g}).")
    rand = summary[(summary["condition"] == "random") & (summary["scale"] == best["scale"])]
    for r in rand.itertuples():
        parts.append(f"{r.null_kind} null vectors at that scale: {r.accuracy:.0%} (MI {r.mi_bits:.2f} bits, "
                     f"p = {r.mi_p:.3g}).")
    return " ".join(parts)

