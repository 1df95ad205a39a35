"""Tasks a yes-bias cannot score: forced choice among concepts, named-concept congruence, strength comparison.

A uniform push of the logits towards "yes" moves every yes/no question alike. These tasks ask for *content* or
*magnitude*, so a push that ignores the injected concept scores exactly chance:

* **forced choice** (acsresearch/latent-introspection-code, arXiv 2602.20031): one of N concepts is injected; the
  model picks its number from a list of the N, listed in a shuffled order per trial (seeded) and mapped back to the
  concept. The readout is the N label tokens' logits at the answer position (a prefilled stem); the outputs an N×N
  confusion matrix, accuracy against chance 1/N (Wilson interval) and the mutual information between injected and
  chosen concept in bits, with a permutation null. The same with no injection and with norm-matched null vectors.
* **congruence** (the mismatch test of agastyasridharan/introspection): "Do you detect an injected thought about X?"
  with X the injected concept (congruent) or the concept of the bank whose vector is most anti-aligned with it
  (incongruent), at the same scales. A yes-bias lifts both; the congruence gap (congruent Δ − incongruent Δ) per
  concept is tested across concepts by an exact (or seeded Monte-Carlo) sign-flip permutation test and Wilcoxon's.
* **strength comparison** (Hahami et al., arXiv 2512.12411): the same vector injected into two sentences of one
  prompt at two strengths; "which sentence has the stronger injected thought?" read from the logits of "1" and "2".
  Both orders are measured (counterbalanced), so a preference for either answer scores exactly 50%.

Every injection goes through :mod:`introspection_utils.engine.inject` (the prefix-cached engine; weighted spans for the
two strengths). Every table carries ``effective_strength`` = s·‖v‖ and ``relative_strength`` = s·‖v‖/‖h‖
(:func:`vectors.residual_norms` of the task's own prompt at the layer).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from scipy import stats

from introspection_utils.core.data import load_list, load_prompts
from introspection_utils.core.intervals import wilson_interval, z_score
from introspection_utils.core.results import SweepResult
from introspection_utils.engine.inject import Trial, answer_logits, measure
from introspection_utils.engine.metadata import metadata
from introspection_utils.engine.prompts import Prompt, chat_prompt, introspection_prompt
from introspection_utils.engine.vectors import (
    ConceptVector,
    VectorBank,
    check_nulls,
    concept_vectors,
    cosine_similarity_matrix,
    default_layer,
    default_layers,
    null_source,
    null_vector,
    residual_norms,
)

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

N_PERMUTATIONS = 2000  # permutation draws of the mutual-information null
MAX_EXACT_FLIPS = 16  # up to this many concepts the sign-flip test enumerates all 2^n flips
N_FLIPS = 20000  # else this many seeded random flips
DEFAULT_CONCEPTS = ("Dust", "Satellites", "Trumpets", "Origami", "Illusions", "Cameras")


# ------------------------------------------------------------------------------------------------ shared pieces


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


def _strengths(trials: Sequence[Trial], h_norm: torch.Tensor) -> tuple[list[float], list[float]]:
    """``effective_strength`` s·‖v‖ and ``relative_strength`` s·‖v‖/‖h‖ of each trial (0 without a vector)."""
    eff = [abs(t.scale) * t.vector.norm if t.vector is not None else 0.0 for t in trials]
    rel = [e / float(h_norm[t.injection_layer]) if t.vector is not None else 0.0 for e, t in zip(eff, trials,
                                                                                                  strict=True)]
    return eff, rel


def _null_vectors(handle: ModelHandle, vectors: Sequence[ConceptVector], nulls: Sequence[str], n_random: int,
                  seed: int) -> list[ConceptVector]:
    """``n_random`` null vectors of each kind per vector (the in-distribution kinds drawn from the baseline words)."""
    nulls = check_nulls(nulls)
    source = null_source(handle) if n_random and set(nulls) & {"covariance", "other-word"} else None
    return [null_vector(v, seed + k, kind, source) for v in vectors for kind in nulls for k in range(n_random)]


def _vector_columns(vectors: Sequence[ConceptVector | None]) -> dict:
    return {"vector_kind": [v.kind if v is not None else "none" for v in vectors],
            "null_kind": [(v.null or "") if v is not None else "" for v in vectors],
            "vector_seed": pd.array([v.seed if v is not None else None for v in vectors], dtype="Int64"),
            "vector_norm": [v.norm if v is not None else 0.0 for v in vectors]}


def _check_common(handle: ModelHandle, scales: Sequence[float], n_random: int) -> None:
    if not list(scales):
        raise ValueError("no scales given")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"scale {s!r} must be a finite number")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise ValueError(f"n_random must be an integer >= 0, got {n_random!r}")


def _condition(vector: ConceptVector | None) -> str:
    """"concept", "random" or "none" (no injection): the condition a task row is in."""
    if vector is None:
        return "none"
    return "random" if vector.kind == "random" else "concept"


def _save(handle: ModelHandle, df: pd.DataFrame, spec: dict, prompts: Sequence[Prompt], results_dir, name: str,
          extra: dict | None = None) -> SweepResult:
    meta = metadata(handle, spec, [p.hash for p in prompts])
    meta.update(extra or {})
    result = SweepResult(df, meta)
    if results_dir is not None:
        result.save(Path(results_dir) / name)
    return result


# ------------------------------------------------------------------------------------------------ forced choice


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
    listing = "\n".join(p["option_format"].format(label=lab, concept=c) for lab, c in zip(labels, options,
                                                                                          strict=True))
    trial = p["trial"].format(options=listing)
    last = frame["trial_lead"] + frame["separator"] + trial
    messages = [{"role": "user", "content": frame["preamble"]},
                {"role": "assistant", "content": frame["assistant_ack"]}, {"role": "user", "content": last}]
    return chat_prompt(handle, messages, injection_from=len(frame["trial_lead"]), prefill=p["prefill"],
                       kind="forced-choice", question=trial, system=system)


def shuffled_orders(n: int, n_orders: int, seed: int) -> list[list[int]]:
    """``n_orders`` seeded permutations of ``range(n)``: ``order[i]`` is the concept shown at position ``i``."""
    if n_orders < 1:
        raise ValueError(f"n_orders must be >= 1, got {n_orders}")
    rng = np.random.default_rng([int(seed), n, 13])
    return [[int(i) for i in rng.permutation(n)] for _ in range(n_orders)]


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
    """Forced choice among ``concepts`` (2..9): every concept injected at every scale under ``n_orders`` shuffled
    listings, plus each listing without injection, plus ``n_random`` null vectors of each kind in ``nulls`` per
    concept (norm-matched to it, its "target" being that concept).

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
    _check_common(handle, scales, n_random)
    check_nulls(nulls)
    orders = shuffled_orders(len(concepts), n_orders, seed)
    bank = bank or concept_vectors(handle, concepts, progress=progress)
    vectors = [bank.get(c, layer) for c in concepts]
    randoms = _null_vectors(handle, vectors, nulls, n_random, seed)
    labels = [str(i + 1) for i in range(len(concepts))]
    rows, prompts = [], []
    for k, order in enumerate(orders):
        prompt = forced_choice_prompt(handle, [concepts[i] for i in order], labels=labels)
        prompts.append(prompt)
        ids = label_token_ids(handle, prompt, labels)
        trials = [Trial(prompt, v, float(s)) for v in (*vectors, *randoms) for s in scales] + [Trial(prompt)]
        logits = answer_logits(handle, trials, ids, batch_size=batch_size)  # [n, N], positions as shown
        chosen, probs = choices_from_logits(logits, order)
        h_norm = residual_norms(handle, prompt)
        eff, rel = _strengths(trials, h_norm)
        for i, trial in enumerate(trials):
            targets = range(len(concepts)) if trial.vector is None else [concepts.index(trial.vector.concept)]
            for target in targets:
                rows.append((k, order, trial, target, int(chosen[i]), probs[i], eff[i], rel[i]))
    df = pd.DataFrame({
        "model": handle.name,
        "condition": [_condition(r[2].vector) for r in rows],
        **_vector_columns([r[2].vector for r in rows]),
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
            "n_orders": n_orders, "n_random": n_random, "nulls": list(nulls), "seed": seed, "labels": labels}
    return _save(handle, df, spec, prompts, results_dir, name)


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


def forced_choice_summary(df: pd.DataFrame, *, level: float = 0.95, n_permutations: int = N_PERMUTATIONS,
                          seed: int = 0) -> pd.DataFrame:
    """Per (condition, null_kind, layer, scale): ``n, correct, accuracy, chance (1/N), ci_low, ci_high`` (Wilson),
    ``mi_bits``, ``mi_p`` (permutation), ``mi_null_mean``. The no-injection rows form one group (scale 0)."""
    concepts = sorted(set(df["target"]))
    chance = 1.0 / len(concepts)
    rows = []
    keys = ["condition", "null_kind", "layer", "scale"]
    for key, group in df.groupby(keys, sort=True, dropna=False):
        mi, p, null_mean = mi_permutation_test(group["target"], group["chosen"], concepts,
                                               n_permutations=n_permutations, seed=seed)
        n, k = len(group), int(group["correct"].sum())
        low, high = wilson_interval(k, n, z=z_score(level))
        rows.append({**dict(zip(keys, key, strict=True)), "n": n, "correct": k, "accuracy": k / n, "chance": chance,
                     "ci_low": low, "ci_high": high, "mi_bits": mi, "mi_p": p, "mi_null_mean": null_mean})
    return pd.DataFrame(rows)


TASK_ALPHA = 0.05  # the level at which a task's effect counts as found (each task one test: no correction)


def _best(summary: pd.DataFrame, column: str) -> pd.Series:
    conc = summary[summary["condition"] == "concept"]
    if conc.empty:
        raise ValueError("the summary has no concept-vector rows")
    return conc.loc[conc[column].idxmax()]


def forced_choice_found(summary: pd.DataFrame, *, alpha: float = TASK_ALPHA) -> bool:
    """Whether the concept vectors are identified (:func:`forced_choice_summary`): at their best scale by MI the
    accuracy's interval lies above chance, MI beats its permutation null (p < ``alpha``), and every null vector kind
    at that scale scores below the interval's low end."""
    best = _best(summary, "mi_bits")
    nulls = summary[(summary["condition"] == "random") & (summary["scale"] == best["scale"])]
    return bool(best["ci_low"] > best["chance"] and best["mi_p"] < alpha
                and (nulls["accuracy"] < best["ci_low"]).all())


def describe_forced_choice(summary: pd.DataFrame) -> str:
    """Sentences from :func:`forced_choice_summary`: the concept vectors' best scale against chance and MI's null,
    and what no injection and the null vectors do."""
    best = _best(summary, "mi_bits")
    chance = float(best["chance"])
    rel = "above" if best["ci_low"] > chance else "below" if best["ci_high"] < chance else "not distinguishable from"
    parts = [f"Forced choice among {round(1 / chance)} concepts (chance {chance:.0%}): the concept vectors are "
             f"identified best at scale {best['scale']:g}, {best['accuracy']:.0%} correct (95% CI "
             f"{best['ci_low']:.0%}–{best['ci_high']:.0%}, n={int(best['n'])}), {rel} chance; mutual information "
             f"{best['mi_bits']:.2f} bits (permutation p = {best['mi_p']:.3g}, permutation mean "
             f"{best['mi_null_mean']:.2f})."]
    none = summary[summary["condition"] == "none"]
    if len(none):
        r = none.iloc[0]
        parts.append(f"Without injection {r['accuracy']:.0%} (MI {r['mi_bits']:.2f} bits, p = {r['mi_p']:.3g}).")
    rand = summary[(summary["condition"] == "random") & (summary["scale"] == best["scale"])]
    for r in rand.itertuples():
        parts.append(f"{r.null_kind} null vectors at that scale: {r.accuracy:.0%} (MI {r.mi_bits:.2f} bits, "
                     f"p = {r.mi_p:.3g}).")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------ congruence


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
    _check_common(handle, scales, n_random)
    check_nulls(nulls)
    bank = bank or concept_vectors(handle, concepts, progress=progress)
    partners = incongruent_partners(bank, layer, concepts)
    trials, meta_rows, prompts = [], [], {}
    randoms = {c: _null_vectors(handle, [bank.get(c, layer)], nulls, n_random, seed) for c in concepts}
    for c in concepts:
        for named, congruent in ((c, True), (partners[c], False)):
            prompt = prompts.setdefault(named, congruence_prompt(handle, named))
            for v in (bank.get(c, layer), *randoms[c]):
                for s in scales:
                    trials.append(Trial(prompt, v, float(s)))
                    meta_rows.append((c, named, congruent))
    readout = measure(handle, trials, batch_size=batch_size)
    h_norm = residual_norms(handle, next(iter(prompts.values())))
    eff, rel = _strengths(trials, h_norm)
    df = pd.DataFrame({
        "model": handle.name,
        "condition": [_condition(t.vector) for t in trials],
        **_vector_columns([t.vector for t in trials]),
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
    return _save(handle, df, spec, list(prompts.values()), results_dir, name)


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


def congruence_summary(df: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """Per (condition, null_kind, layer, scale), across concepts (null vectors: their seeds averaged per concept
    first): ``n_concepts, mean_congruent, mean_incongruent, mean_gap, n_positive, p_signflip`` (one-sided,
    gap > 0) and ``p_wilcoxon`` (one-sided signed-rank; NaN when every gap is 0)."""
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
                     "n_positive": int((gap > 0).sum()), "p_signflip": sign_flip_test(gap, seed=seed),
                     "p_wilcoxon": p_w})
    return pd.DataFrame(rows)


def congruence_found(summary: pd.DataFrame, *, alpha: float = TASK_ALPHA) -> bool:
    """Whether naming the injected concept matters (:func:`congruence_summary`): at the concept vectors' largest
    mean gap, the sign-flip test across concepts gives p < ``alpha`` and every null vector kind's gap at that scale is
    smaller."""
    best = _best(summary, "mean_gap")
    nulls = summary[(summary["condition"] == "random") & (summary["scale"] == best["scale"])]
    return bool(best["mean_gap"] > 0 and best["p_signflip"] < alpha and (nulls["mean_gap"] < best["mean_gap"]).all())


def describe_congruence(summary: pd.DataFrame) -> str:
    """Sentences from :func:`congruence_summary`: the concept vectors' largest mean gap, its paired tests, what the
    congruent and incongruent questions did, and the null vectors' gaps at that scale."""
    best = _best(summary, "mean_gap")
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


# ------------------------------------------------------------------------------------------------ strength comparison


@dataclass(frozen=True)
class TwoSentencePrompt:
    """Hahami's strength-comparison conversation and the token span ``[start, end)`` of each of its two sentences
    (the tokens overlapping the sentence's characters)."""

    prompt: Prompt
    sentences: tuple[str, str]
    spans: tuple[tuple[int, int], tuple[int, int]]


def strength_prompt(handle: ModelHandle, sentences: Sequence[str], *, system: str | None = None
                    ) -> TwoSentencePrompt:
    """"Which sentence has the stronger injected thought?" over two sentences (``data/prompts.toml``
    [strength_comparison], verbatim from Hahami et al.), prefilled "…is SENTENCE "."""
    sentences = tuple(sentences)
    if len(sentences) != 2 or any(not s.strip() for s in sentences) or sentences[0] == sentences[1]:
        raise ValueError(f"strength comparison needs two distinct non-empty sentences, got {sentences}")
    p = load_prompts()["strength_comparison"]
    heads = [p["sentence_format"].format(index=i + 1, sentence="\0").split("\0")[0] for i in range(2)]
    listing = "\n".join(h + s for h, s in zip(heads, sentences, strict=True))
    content = p["user"].format(sentences=listing)
    prompt = chat_prompt(handle, [{"role": "user", "content": content}], injection_from=content.index(listing),
                         prefill=p["prefill"], kind="strength-comparison", question=content, system=system)
    base = prompt.text.rindex(content) + content.index(listing)
    offsets = handle.tokenizer(prompt.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans, cursor = [], 0
    for head, sentence in zip(heads, sentences, strict=True):
        cursor = listing.index(head + sentence, cursor) + len(head)
        lo, hi = base + cursor, base + cursor + len(sentence)
        tokens = [t for t, (a, b) in enumerate(offsets) if b > lo and a < hi]
        spans.append((tokens[0], tokens[-1] + 1))
    return TwoSentencePrompt(prompt, sentences, (spans[0], spans[1]))


def strength_trial(two: TwoSentencePrompt, vector: ConceptVector | None, first: float, second: float,
                   layer: int | None = None) -> Trial:
    """``vector`` added over sentence 1 at scale ``first`` and over sentence 2 at ``second`` (one weighted-span
    window; the trial's own scale is 1)."""
    (a1, b1), (a2, b2) = two.spans
    if vector is None:
        return Trial(two.prompt)
    return Trial(two.prompt, vector, 1.0, layer=layer, window=((a1, b1, float(first)), (a2, b2, float(second))))


def run_strength_comparison(handle: ModelHandle, concepts: Sequence[str] = DEFAULT_CONCEPTS[:3], *,
                            layers: Sequence[int] | None = None, pairs: Sequence[tuple[float, float]] = ((2.0, 6.0),
                                                                                                      (4.0, 8.0)),
                            n_sets: int = 4, n_random: int = 1, nulls: Sequence[str] = ("isotropic",),
                            seed: int = 0, bank: VectorBank | None = None, results_dir: str | Path | None = None,
                            name: str = "strength_comparison", batch_size: int | None = None,
                            progress: bool = True) -> SweepResult:
    """Two sentences (``n_sets`` seeded pairs from Godet's 100), one vector injected into both at the two scales of
    each ``(weak, strong)`` pair, the stronger first and (counterbalanced) second, at each of ``layers`` (default 4
    spread over the depth); each concept's vector, ``n_random`` null vectors of each kind norm-matched to it, and no
    injection. The answer: the logits of "1" and "2" after the prefill.

    One row per trial: ``model, condition, vector_kind, null_kind, vector_seed, vector_norm, concept, set_index,
    layer, weak, strong, stronger (1 or 2), first_scale, second_scale, effective_strength (strong·‖v‖),
    relative_strength (strong·‖v‖/‖h‖), weak_relative_strength, margin (logit "1" − logit "2"), chosen, correct``.
    No-injection rows have ``stronger`` 1 and 2 (one row each), so they score 50% whatever they answer.
    """
    concepts = list(concepts)
    if not concepts:
        raise ValueError("no concepts given")
    layers = default_layers(handle, layers, n=4) if layers is None else [handle.check_layer(int(x)) for x in layers]
    if not layers:
        raise ValueError("no layers given")
    pairs = [(float(w), float(s)) for w, s in pairs]
    if not pairs or any(not (math.isfinite(w) and math.isfinite(s) and 0 <= w < s) for w, s in pairs):
        raise ValueError(f"pairs {pairs} must be (weak, strong) scales with 0 <= weak < strong")
    _check_common(handle, [s for p in pairs for s in p], n_random)
    check_nulls(nulls)
    if n_sets < 1:
        raise ValueError(f"n_sets must be >= 1, got {n_sets}")
    pool = list(load_list("godet_localization_sentences"))
    rng = np.random.default_rng([int(seed), 17])
    sets = [tuple(pool[i] for i in rng.choice(len(pool), 2, replace=False)) for _ in range(n_sets)]
    bank = bank or concept_vectors(handle, concepts, progress=progress)
    twos = [strength_prompt(handle, s) for s in sets]
    ids = label_token_ids(handle, twos[0].prompt, ["1", "2"])
    trials, info = [], []
    for k, two in enumerate(twos):
        for layer in layers:
            vectors = [bank.get(c, layer) for c in concepts]
            for v in (*vectors, *_null_vectors(handle, vectors, nulls, n_random, seed)):
                for weak, strong in pairs:
                    for stronger in (1, 2):
                        first, second = (strong, weak) if stronger == 1 else (weak, strong)
                        trials.append(strength_trial(two, v, first, second))
                        info.append((k, layer, v, weak, strong, stronger, first, second))
        for stronger in (1, 2):
            trials.append(strength_trial(two, None, 0.0, 0.0))
            info.append((k, None, None, 0.0, 0.0, stronger, 0.0, 0.0))
    logits = answer_logits(handle, trials, ids, batch_size=batch_size)  # [n, 2]: "1", "2"
    margin = (logits[:, 0] - logits[:, 1]).double().numpy()
    h_norm = {k: residual_norms(handle, two.prompt) for k, two in enumerate(twos)}
    df = pd.DataFrame({
        "model": handle.name,
        "condition": [_condition(i[2]) for i in info],
        **_vector_columns([i[2] for i in info]),
        "concept": [i[2].concept if i[2] is not None else "" for i in info],
        "set_index": [i[0] for i in info],
        "layer": pd.array([i[1] for i in info], dtype="Int64"),
        "weak": [i[3] for i in info],
        "strong": [i[4] for i in info],
        "stronger": [i[5] for i in info],
        "first_scale": [i[6] for i in info],
        "second_scale": [i[7] for i in info],
        "effective_strength": [i[4] * i[2].norm if i[2] is not None else 0.0 for i in info],
        "relative_strength": [i[4] * i[2].norm / float(h_norm[i[0]][i[1]]) if i[2] is not None else 0.0
                              for i in info],
        "weak_relative_strength": [i[3] * i[2].norm / float(h_norm[i[0]][i[1]]) if i[2] is not None else 0.0
                                   for i in info],
        "margin": margin,
    })
    df["chosen"] = np.where(df["margin"] > 0, 1, 2)
    df["correct"] = df["chosen"] == df["stronger"]
    spec = {"task": "strength_comparison", "concepts": concepts, "layers": [int(x) for x in layers],
            "pairs": [list(p) for p in pairs], "n_sets": n_sets, "n_random": n_random, "nulls": list(nulls),
            "seed": seed, "sentences": [list(s) for s in sets]}
    return _save(handle, df, spec, [t.prompt for t in twos], results_dir, name)


def strength_summary(df: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """Accuracy against 50% per (condition, null_kind, layer), pairs and both orders pooled: ``n, correct,
    accuracy, chance (0.5), ci_low, ci_high`` (Wilson), ``p_binomial`` (one-sided, above 50%) and ``first_bias``
    (the fraction of answers "1": 0.5 when the model follows the strength, not the position)."""
    rows = []
    for key, g in df.groupby(["condition", "null_kind", "layer"], sort=True, dropna=False):
        n, k = len(g), int(g["correct"].sum())
        low, high = wilson_interval(k, n, z=z_score(level))
        rows.append({"condition": key[0], "null_kind": key[1], "layer": key[2], "n": n, "correct": k,
                     "accuracy": k / n, "chance": 0.5, "ci_low": low, "ci_high": high,
                     "p_binomial": float(stats.binomtest(k, n, 0.5, alternative="greater").pvalue),
                     "first_bias": float((g["chosen"] == 1).mean())})
    return pd.DataFrame(rows)


def strength_found(summary: pd.DataFrame, *, alpha: float = TASK_ALPHA) -> bool:
    """Whether the stronger injection is named (:func:`strength_summary`): at the concept vectors' best layer the
    accuracy's interval lies above 50%, the binomial p < ``alpha``, and every null vector kind there scores below the
    interval's low end."""
    best = _best(summary, "accuracy")
    nulls = summary[(summary["condition"] == "random") & (summary["layer"] == best["layer"])]
    return bool(best["ci_low"] > 0.5 and best["p_binomial"] < alpha and (nulls["accuracy"] < best["ci_low"]).all())


def describe_strength(summary: pd.DataFrame) -> str:
    """Sentences from :func:`strength_summary`: the best layer for the concept vectors against 50%, the null
    vectors at that layer, and the answer bias."""
    best = _best(summary, "accuracy")
    rel = "above" if best["ci_low"] > 0.5 else "below" if best["ci_high"] < 0.5 else "not distinguishable from"
    parts = [f"Strength comparison: the stronger of two injections is named best at layer {int(best['layer'])}, "
             f"{best['accuracy']:.0%} correct (95% CI {best['ci_low']:.0%}–{best['ci_high']:.0%}, n={int(best['n'])}, "
             f"binomial p = {best['p_binomial']:.3g}), {rel} 50%; it answers '1' in {best['first_bias']:.0%} of "
             f"trials."]
    conc = summary[summary["condition"] == "concept"]
    others = conc[conc["layer"] != best["layer"]]
    if len(others):
        parts.append("Other layers: " + ", ".join(f"{int(r.layer)}: {r.accuracy:.0%}" for r in others.itertuples())
                     + ".")
    rand = summary[(summary["condition"] == "random") & (summary["layer"] == best["layer"])]
    for r in rand.itertuples():
        parts.append(f"{r.null_kind} null vectors there: {r.accuracy:.0%} (95% CI {r.ci_low:.0%}–{r.ci_high:.0%}).")
    none = summary[summary["condition"] == "none"]
    if len(none):
        parts.append(f"Without injection it answers '1' in {none['first_bias'].iloc[0]:.0%} of trials.")
    return " ".join(parts)

