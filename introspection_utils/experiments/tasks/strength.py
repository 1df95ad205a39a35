"""Strength comparison (Hahami et al., arXiv 2512.12411), one of the tasks a yes-bias cannot score
(:mod:`introspection_utils.experiments.tasks`): the same vector injected into two sentences of one prompt at two
strengths; "which sentence has the stronger injected thought?" read from the logits of "1" and "2". Both orders are
measured (counterbalanced), so a preference for either answer scores exactly 50%; the two strengths are weighted
spans of one injection through the engine."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from introspection_utils.core.data import load_list, load_prompts
from introspection_utils.core.results import SweepResult
from introspection_utils.engine.measure import Trial, answer_logits
from introspection_utils.engine.prompts import Prompt, chat_prompt
from introspection_utils.engine.vectors import (
    ConceptVector,
    VectorBank,
    check_nulls,
    concept_vectors,
    default_layers,
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
    readout_moved,
    unmoved_sentence,
)

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle


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
    check_task_inputs(handle, [s for p in pairs for s in p], n_random)
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
            for v in (*vectors, *task_null_vectors(handle, vectors, nulls, n_random, seed)):
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
        "condition": [condition_name(i[2]) for i in info],
        **vector_columns([i[2] for i in info]),
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
    return save_task_table(handle, df, spec, [t.prompt for t in twos], results_dir, name)



def strength_summary(df: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """Accuracy against 50% per (condition, null_kind, layer), pairs and both orders pooled: ``n, correct,
    accuracy, chance (0.5), ci_low, ci_high`` (Wilson), ``p_binomial`` (one-sided, above 50%), ``mde``
    (:func:`stats.accuracy.accuracy_summary`), ``first_bias`` (the fraction of answers "1": 0.5 when the model
    follows the strength, not the position), ``position_chance`` (the accuracy of a responder answering "1" as often
    as no injection does, or as each null kind does at that layer — the largest;
    :func:`stats.accuracy.position_matched_chance`: 50% exactly when both orders are measured), ``balanced`` (the
    stronger sentence first as often as second), ``margin_shift`` (the median |margin − the same sentence pair's
    margin without injection|, logits) and ``moved`` (:func:`stats.accuracy.readout_moved`)."""
    df = df.reset_index(drop=True)  # positions below are row numbers
    target = (df["stronger"].astype(int) - 1).to_numpy()
    answer = (df["chosen"].astype(int) - 1).to_numpy()
    none_rows = df["condition"] == "none"
    none_margin = (df[none_rows].groupby("set_index")["margin"].mean() if "margin" in df and none_rows.any()
                   else pd.Series(dtype=float))
    rows = []
    for key, g in df.groupby(["condition", "null_kind", "layer"], sort=True, dropna=False):
        at = df.index.get_indexer(g.index)
        refs = [answer[none_rows.to_numpy()]] + [
            answer[df.index.get_indexer(r.index)] for _, r in
            df[(df["condition"] == "random") & (df["layer"] == key[2])].groupby("null_kind", sort=True)]
        position_chance = max((position_matched_chance(target[at], r, 2) for r in refs if len(r)), default=0.5)
        shift = (float((g["margin"] - g["set_index"].map(none_margin)).abs().median())
                 if len(none_margin) and key[0] != "none" else float("nan"))
        acc = accuracy_summary(int(g["correct"].sum()), len(g), 0.5, level=level)
        rows.append({"condition": key[0], "null_kind": key[1], "layer": key[2], "n": acc.n, "correct": acc.correct,
                     "accuracy": acc.accuracy, "chance": 0.5, "position_chance": position_chance,
                     "balanced": positions_balanced(target[at], 2), "ci_low": acc.ci_low, "ci_high": acc.ci_high,
                     "p_binomial": acc.p_binomial, "mde": acc.mde, "first_bias": float((g["chosen"] == 1).mean()),
                     "margin_shift": shift,
                     "moved": key[0] != "none" and bool(np.isnan(shift) or readout_moved(shift))})
    return pd.DataFrame(rows)



def strength_found(summary: pd.DataFrame, *, alpha: float = TASK_ALPHA) -> bool:
    """Whether the stronger injection is named (:func:`strength_summary`): at the concept vectors' best layer the
    injection moves the readout (``moved``), the accuracy's interval lies above 50% and above the position-matched
    chance (:func:`stats.accuracy.chance_bar`), the binomial p < ``alpha``, and every null vector kind there scores
    below the interval's low end."""
    best = best_row(summary)
    nulls = summary[(summary["condition"] == "random") & (summary["layer"] == best["layer"])]
    return bool(best.get("moved", True) and best["ci_low"] > chance_bar(best) and best["p_binomial"] < alpha
                and (nulls["accuracy"] < best["ci_low"]).all())



def describe_strength(summary: pd.DataFrame) -> str:
    """Sentences from :func:`strength_summary`: the best layer for the concept vectors against 50%, the null
    vectors at that layer, and the answer bias."""
    best = best_row(summary)
    parts = [f"Strength comparison: the stronger of two injections is named most often at layer {int(best['layer'])}, "
             f"{chance_sentence(best)}, binomial p = {best['p_binomial']:.3g}; it answers '1' in "
             f"{best['first_bias']:.0%} of trials."]
    if not best.get("moved", True):
        # the accuracy is still stated, with its MDE: every "not found" says what it could have found
        parts = ["Strength comparison: " + unmoved_sentence(f"layer {int(best['layer'])} (the concept vectors' best "
                                                            f"by accuracy)", best["margin_shift"])
                 + f" There: {chance_sentence(best)}."]
    if not pd.isna(best.get("position_chance", float("nan"))):
        parts.append(position_sentence(best, "trials", "the stronger injection in each sentence"))
    conc = summary[summary["condition"] == "concept"]
    others = conc[conc["layer"] != best["layer"]]
    if len(others):
        parts.append("Other layers: " + ", ".join(
            f"{int(r.layer)}: {r.accuracy:.0%}" + ("" if getattr(r, "moved", True) else " (readout not moved)")
            for r in others.itertuples()) + ".")
    rand = summary[(summary["condition"] == "random") & (summary["layer"] == best["layer"])]
    for r in rand.itertuples():
        parts.append(f"{r.null_kind} null vectors there: {r.accuracy:.0%} (95% CI {r.ci_low:.0%}–{r.ci_high:.0%}).")
    none = summary[summary["condition"] == "none"]
    if len(none):
        parts.append(f"Without injection it answers '1' in {none['first_bias'].iloc[0]:.0%} of trials.")
    return " ".join(parts)

