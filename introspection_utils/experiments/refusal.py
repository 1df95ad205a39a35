"""The refusal direction by the book (Arditi et al. 2024: difference-of-means candidates chosen by causal scores) and
its ablation while injecting (notebook 08).

Over 400 lines because Arditi et al.'s selection (candidates, three causal scores, the filters) is one procedure,
read in one place."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import nnsight
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from introspection_utils.core.data import load_list
from introspection_utils.core.paths import checkpoint
from introspection_utils.engine.measure import AblateAt, Trial, measure
from introspection_utils.engine.prompts import Prompt, answer_token_id, chat_prompt, question_prompts
from introspection_utils.engine.traced_pass import Ablation, padded_pass
from introspection_utils.engine.vectors import VectorBank, concept_vectors, last_token_activations, left_pad

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

# Arditi et al.'s refusal tokens: the first token of "I cannot …" / "I'm sorry …" and of "As an AI …".
REFUSAL_WORDS = ("I", "As")
TRAIN_FRACTION = 0.8  # the first 80% of each list is the training split, the rest the validation split
KL_THRESHOLD, INDUCE_THRESHOLD, PRUNE_LAYERS = 0.1, 0.0, 0.2  # the paper's filters
SCORE_COLUMNS = ["model", "position", "token", "layer", "norm", "bypass", "induce", "kl", "pruned", "kl_ok",
                 "induce_ok", "baseline_harmful", "baseline_harmless", "n_val"]
ABLATION_COLUMNS = ["model", "concept", "layer", "scale", "cos_direction", "question_kind", "question", "ablation",
                    "logit_diff", "baseline_logit_diff", "delta"]


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


# ------------------------------------------------------------------------------------- by the book: candidates


def instruction_split(name: str, split: Literal["train", "val"], n: int | None = None) -> list[str]:
    """The first ``n`` instructions (all if None) of the ``train`` (first 80% of the file) or ``val`` (the rest)
    split of ``data/<name>.txt`` (``refusal_harmful`` or ``refusal_harmless``)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    items = list(load_list(name))
    cut = int(TRAIN_FRACTION * len(items))
    part = items[:cut] if split == "train" else items[cut:]
    if n is not None and not 1 <= n <= len(part):
        raise ValueError(f"{name} has {len(part)} {split} instructions; asked for {n}")
    return part[:n]


def instruction_prompts(handle: ModelHandle, instructions: Sequence[str]) -> list[Prompt]:
    """Each instruction as a user turn, ``injection_start`` on the first post-instruction token."""
    return [chat_prompt(handle, [{"role": "user", "content": t}], injection_from=len(t), kind="refusal", question=t)
            for t in instructions]


def post_instruction_tokens(handle: ModelHandle, prompts: Sequence[Prompt]) -> list[str]:
    """The tokens after the instruction (the same template tokens for every prompt; ``ValueError`` otherwise)."""
    tails = {tuple(p.input_ids[p.injection_start:]) for p in prompts}
    if len(tails) != 1:
        raise ValueError(f"the prompts end in {len(tails)} different post-instruction token sequences")
    return [handle.tokenizer.decode([i]) for i in tails.pop()]


def _left_padded(handle: ModelHandle, prompts: Sequence[Prompt], batch_size: int, progress: bool, desc: str
                 ) -> Iterator[tuple[slice, dict]]:
    """Batches of ``prompts`` left-padded for a trace: ``(rows, kwargs)`` with ``input_ids``, ``attention_mask``
    and ``position_ids`` (following the mask), each ``[B, T]`` on the model's device."""
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        chunk = prompts[start:start + batch_size]
        ids, mask, positions = left_pad([p.input_ids for p in chunk], handle.tokenizer.pad_token_id)
        yield slice(start, start + len(chunk)), {"input_ids": ids.to(handle.device),
                                                 "attention_mask": mask.to(handle.device),
                                                 "position_ids": positions.to(handle.device)}


def post_instruction_activations(handle: ModelHandle, prompts: Sequence[Prompt], n_positions: int, *,
                                 batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Residual stream (every decoder layer's output) at the last ``n_positions`` tokens of each prompt:
    ``[n, n_positions, n_layers, d_model]`` (float32, CPU; position ``-n_positions … -1``)."""
    out = torch.empty(len(prompts), n_positions, handle.arch.n_layers, handle.arch.d_model)
    for rows, kwargs in _left_padded(handle, prompts, batch_size, progress, "activations"):
        with torch.no_grad(), handle.model.trace(kwargs.pop("input_ids"), **kwargs):
            acts = nnsight.save([layer.output[:, -n_positions:, :] for layer in handle.layers])
        out[rows] = torch.stack([a.float().cpu() for a in acts], dim=2)
    return out


def candidate_directions(handle: ModelHandle, harmful: Sequence[str], harmless: Sequence[str], *,
                         n_positions: int | None = None, batch_size: int = 16, progress: bool = False
                         ) -> tuple[torch.Tensor, list[str]]:
    """Difference-of-means candidates at the last ``n_positions`` post-instruction tokens (all of them if None) and
    every layer: ``(directions [n_positions, n_layers, d_model], the positions' tokens)``; row ``p`` is position
    ``p − n_positions`` (−1 = the last token, read for the answer)."""
    if not harmful or not harmless:
        raise ValueError("need harmful and harmless instructions")
    bad, good = instruction_prompts(handle, harmful), instruction_prompts(handle, harmless)
    tokens = post_instruction_tokens(handle, bad + good)
    n_positions = len(tokens) if n_positions is None else int(n_positions)
    if not 1 <= n_positions <= len(tokens):
        raise ValueError(f"n_positions must be in 1..{len(tokens)} (the post-instruction tokens {tokens})")
    mean = [post_instruction_activations(handle, p, n_positions, batch_size=batch_size, progress=progress).mean(0)
            for p in (bad, good)]
    return mean[0] - mean[1], tokens[-n_positions:]


# ----------------------------------------------------------------------------------- by the book: causal scores


def unpruned_layers(handle: ModelHandle, n: int | None = None, *, prune: float = PRUNE_LAYERS) -> list[int]:
    """The layers the selection may choose from (all but the last ``prune`` of the depth), or ``n`` of them evenly
    spread (first to last unpruned), to score fewer candidates on a slow machine."""
    cutoff = int(handle.arch.n_layers * (1 - prune))
    if n is None:
        return list(range(cutoff))
    if not 1 <= n <= cutoff:
        raise ValueError(f"n must be in 1..{cutoff} (the unpruned layers of {handle.name}), got {n}")
    return sorted({int(round(x)) for x in np.linspace(0, cutoff - 1, n)})


def last_logits(handle: ModelHandle, prompts: Sequence[Prompt], *, ablate: torch.Tensor | None = None,
                add: torch.Tensor | None = None, layer: int | None = None, batch_size: int = 16,
                progress: bool = False) -> torch.Tensor:
    """Next-token logits at each prompt's last position: ``[n, vocab]`` (float32, CPU).

    ``ablate``: a direction ``[d_model]`` (normalised here) projected out of the embeddings and every layer's
    output at every position. ``add``: a vector ``[d_model]`` added to decoder layer ``layer``'s output at every
    position (Arditi's activation addition). Prompts are left-padded into batches; each batch is the one injection
    pass (:func:`introspection_utils.engine.traced_pass.padded_pass`).
    """
    if (add is None) != (layer is None):
        raise ValueError("add and layer go together")
    if layer is not None:
        handle.check_layer(layer)
    ablation = None if ablate is None else Ablation.of(handle, ablate)
    # Activation addition is a trial like any other: ``add`` at ``layer`` over the whole prompt (window "all").
    trials = [Trial(p, add, 1.0, layer=layer, window="all") if add is not None else Trial(p) for p in prompts]
    out = []
    for start in tqdm(range(0, len(trials), batch_size), desc="logits", disable=not progress):
        out.append(padded_pass(handle, trials[start:start + batch_size], ablation=ablation).logits)
    return torch.cat(out)


def refusal_token_ids(handle: ModelHandle, words: Sequence[str] = REFUSAL_WORDS) -> list[int]:
    """The first token of each refusal word as the start of the answer (duplicates dropped)."""
    return list(dict.fromkeys(answer_token_id(handle, w, allow_first_token=True) for w in words))


def refusal_score(logits: torch.Tensor, token_ids: Sequence[int], eps: float = 1e-8) -> torch.Tensor:
    """``log P(R) − log(1 − P(R))`` per row, with ``P(R)`` the probability of the tokens ``token_ids`` under the
    softmax of ``logits [n, vocab]`` (float64, the paper's epsilon): ``[n]``."""
    probs = logits.double().softmax(-1)[:, list(token_ids)].sum(-1)
    return torch.log(probs + eps) - torch.log(1 - probs + eps)


def kl_divergence(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(reference) ‖ softmax(logits))`` per row (float64): ``[n]``."""
    ref_logp, logp = reference.double().log_softmax(-1), logits.double().log_softmax(-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def direction_scores(handle: ModelHandle, directions: torch.Tensor, harmful: Sequence[str], harmless: Sequence[str],
                     *, tokens: Sequence[str] | None = None, layers: Sequence[int] | None = None,
                     refusal_words: Sequence[str] = REFUSAL_WORDS, prune: float = PRUNE_LAYERS,
                     kl_threshold: float = KL_THRESHOLD, induce_threshold: float = INDUCE_THRESHOLD,
                     batch_size: int = 16, progress: bool = True, checkpoints: str | Path | None = None
                     ) -> pd.DataFrame:
    """The causal scores of each candidate ``directions[p, l]`` (``[n_positions, n_layers, d_model]``) on the
    validation instructions ``harmful``/``harmless`` (see the module docstring), for ``layers`` (all if None).

    A tidy table, one row per (position, layer): :data:`SCORE_COLUMNS` — ``position`` (−1 = last token) and its
    ``token``, ``norm`` of the raw direction, ``bypass``/``induce``/``kl``, the filters (``pruned``: in the last
    ``prune`` of the layers; ``kl_ok``: KL < ``kl_threshold``; ``induce_ok``: induce > ``induce_threshold``) and the
    unablated refusal scores ``baseline_harmful``/``baseline_harmless`` (means).
    """
    n_positions, n_layers, d_model = directions.shape
    if n_layers != handle.arch.n_layers or d_model != handle.arch.d_model:
        raise ValueError(f"directions have shape {tuple(directions.shape)}; {handle.name} needs [P, "
                         f"{handle.arch.n_layers}, {handle.arch.d_model}]")
    layers = list(range(n_layers)) if layers is None else [handle.check_layer(int(x)) for x in layers]
    if not harmful or not harmless:
        raise ValueError("need harmful and harmless validation instructions")
    tokens = list(tokens) if tokens is not None else [""] * n_positions
    ids = refusal_token_ids(handle, refusal_words)
    bad, good = instruction_prompts(handle, harmful), instruction_prompts(handle, harmless)
    base_bad = refusal_score(last_logits(handle, bad, batch_size=batch_size), ids).mean()
    base_good_logits = last_logits(handle, good, batch_size=batch_size)
    base_good = refusal_score(base_good_logits, ids).mean()
    cutoff = int(n_layers * (1 - prune))  # the paper's rule: layer >= cutoff is pruned
    rows = []
    grid = [(p, layer) for layer in layers for p in range(n_positions)]
    # each candidate's three scores are kept as they finish (``checkpoints``: a results folder; resumable)
    key = {"model": handle.name, "revision": handle.revision, "dtype": str(handle.dtype), "harmful": list(harmful),
           "harmless": list(harmless), "refusal_words": list(refusal_words), "batch_size": batch_size}

    def scores(direction: torch.Tensor, layer: int) -> tuple[float, float, float]:
        kw = dict(batch_size=batch_size)
        bypass = refusal_score(last_logits(handle, bad, ablate=direction, **kw), ids).mean()
        kl = kl_divergence(base_good_logits, last_logits(handle, good, ablate=direction, **kw)).mean()
        induce = refusal_score(last_logits(handle, good, add=direction, layer=layer, **kw), ids).mean()
        return float(bypass), float(kl), float(induce)

    for p, layer in tqdm(grid, desc="candidate directions", disable=not progress):
        direction = directions[p, layer].float()
        digest = hashlib.sha256(direction.numpy().tobytes()).hexdigest()[:16]
        bypass, kl, induce = checkpoint(checkpoints, "refusal-candidate", {**key, "layer": layer, "direction": digest},
                                        lambda direction=direction, layer=layer: scores(direction, layer))
        rows.append({"model": handle.name, "position": p - n_positions, "token": tokens[p], "layer": layer,
                     "norm": float(direction.norm()), "bypass": float(bypass), "induce": float(induce),
                     "kl": float(kl), "pruned": layer >= cutoff, "kl_ok": float(kl) < kl_threshold,
                     "induce_ok": float(induce) > induce_threshold, "baseline_harmful": float(base_bad),
                     "baseline_harmless": float(base_good), "n_val": min(len(harmful), len(harmless))})
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def select_direction(table: pd.DataFrame) -> tuple[pd.Series, str]:
    """The paper's choice from a :func:`direction_scores` table: among unpruned candidates with KL below the
    threshold and induce above it, the lowest bypass score. Returns ``(row, why)``.

    Fallback, stated in ``why``: if no candidate passes every filter, the induce filter is relaxed to "adding it
    raises the harmless refusal score above its baseline", then dropped, then the KL filter is dropped too.
    """
    unpruned = table[~table["pruned"]]
    if unpruned.empty:
        raise ValueError("every scored candidate is in the pruned last layers: score earlier layers")
    raises = unpruned["induce"] > unpruned["baseline_harmless"]
    steps = [(unpruned["kl_ok"] & unpruned["induce_ok"], "it passes every filter (not in the last layers, KL "
                                                         "below the threshold, induce above it)"),
             (unpruned["kl_ok"] & raises, "fallback, as no candidate induces refusal past the threshold: KL below "
                                         "the threshold and adding it raises the harmless refusal score"),
             (unpruned["kl_ok"], "fallback, as no candidate with a small KL raises the harmless refusal score: "
                                 "KL below the threshold only"),
             (pd.Series(True, index=unpruned.index), "fallback, as no candidate has KL below the threshold: not in "
                                                     "the last layers only")]
    for keep, reason in steps:
        if keep.any():
            chosen = unpruned[keep].sort_values(["bypass", "layer", "position"]).iloc[0]
            return chosen, (f"position {int(chosen.position)} ({chosen.token!r}), layer {int(chosen.layer)}, the "
                            f"lowest bypass score among {int(keep.sum())} of {len(table)} candidates ({reason})")
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class RefusalDirection:
    """The selected direction: ``direction [d_model]`` (raw difference of means; ablation normalises it),
    its ``position``/``layer``, the score ``table`` of every candidate and ``why`` it was chosen."""

    direction: torch.Tensor
    position: int
    layer: int
    table: pd.DataFrame
    why: str

    @property
    def unit(self) -> torch.Tensor:
        return torch.nn.functional.normalize(self.direction.float(), dim=-1)


def refusal_direction(handle: ModelHandle, *, n_train: int | None = None, n_val: int | None = None,
                      n_positions: int | None = None, layers: Sequence[int] | None = None,
                      refusal_words: Sequence[str] = REFUSAL_WORDS, batch_size: int = 16, progress: bool = True,
                      checkpoints: str | Path | None = None) -> RefusalDirection:
    """The refusal direction by the book (module docstring): candidates from the first ``n_train`` training
    instructions of each list, scored on the first ``n_val`` validation ones (None: all), at the last
    ``n_positions`` post-instruction tokens (None: all) and ``layers`` (None: all), then selected. ``checkpoints``:
    a results folder where each candidate's scores are kept as they finish (an interrupted run resumes)."""
    harmful, harmless = (instruction_split(n, "train", n_train) for n in ("refusal_harmful", "refusal_harmless"))
    val_bad, val_good = (instruction_split(n, "val", n_val) for n in ("refusal_harmful", "refusal_harmless"))
    if layers is not None:
        layers = [handle.check_layer(int(x)) for x in layers]
    directions, tokens = candidate_directions(handle, harmful, harmless, n_positions=n_positions,
                                              batch_size=batch_size, progress=progress)
    table = direction_scores(handle, directions, val_bad, val_good, tokens=tokens, layers=layers,
                             refusal_words=refusal_words, batch_size=batch_size, progress=progress,
                             checkpoints=checkpoints)
    chosen, why = select_direction(table)
    p = int(chosen.position) + directions.shape[0]
    table.attrs.update(n_train=min(len(harmful), len(harmless)), refusal_words=list(refusal_words))
    return RefusalDirection(directions[p, int(chosen.layer)].clone(), int(chosen.position), int(chosen.layer),
                            table, why)


def describe_direction(selected: RefusalDirection | pd.DataFrame) -> str:
    """A computed reading of the selection: the chosen candidate's three scores against the baselines.
    ``selected``: the direction, or its score table (saved as ``refusal_direction_scores.csv``; the selection is
    recomputed from it, :func:`select_direction` being a function of the table alone)."""
    t = selected.table if isinstance(selected, RefusalDirection) else selected
    row, why = select_direction(t)
    base_bad, base_good = float(t["baseline_harmful"].iloc[0]), float(t["baseline_harmless"].iloc[0])
    return (f"{len(t)} candidates scored on {int(t['n_val'].iloc[0])} validation prompts per list. Chosen: "
            f"{why}. Ablating it moves the harmful prompts' refusal score from {base_bad:+.2f} to "
            f"{row.bypass:+.2f} (log-odds of {', '.join(map(repr, t.attrs.get('refusal_words', REFUSAL_WORDS)))}); "
            f"adding it moves the harmless prompts' from {base_good:+.2f} to {row.induce:+.2f}; KL on harmless "
            f"prompts {row.kl:.3f}. {int(t['kl_ok'].sum())} candidates have KL < {KL_THRESHOLD}, "
            f"{int(t['induce_ok'].sum())} induce refusal (score > {INDUCE_THRESHOLD:g}), "
            f"{int(t['pruned'].sum())} are in the last {PRUNE_LAYERS:.0%} of the layers.")


# ---------------------------------------------------------------------------- ablation before vs after injection


def ablation_points(handle: ModelHandle, concepts: Sequence[str], scales: float | Mapping[str, float],
                    direction: torch.Tensor, *, layer: int, n_controls: int = 2, bank: VectorBank | None = None,
                    ablate_at: Sequence[AblateAt] = ("after", "before")) -> pd.DataFrame:
    """Each concept injected at ``layer`` × its scale on the introspection question and ``n_controls`` control
    questions, without ablation and with ``direction`` ablated at each point of ``ablate_at``.

    Tidy: :data:`ABLATION_COLUMNS`, ``ablation`` ∈ {"none", "after", "before"}; ``baseline_logit_diff`` is the
    same prompt uninjected under the same ablation (before and after coincide there) and ``delta`` the difference;
    ``cos_direction``: the cosine of the concept vector with ``direction`` (what "after" strips and "before" keeps).
    """
    handle.check_layer(layer)
    scale_of = dict(scales) if isinstance(scales, Mapping) else {c: float(scales) for c in concepts}
    missing = [c for c in concepts if c not in scale_of]
    if missing:
        raise ValueError(f"no scale for concept(s) {missing}")
    bank = bank or concept_vectors(handle, concepts, progress=False)
    prompts = question_prompts(handle, n_controls)
    trials, info = [], []
    for concept in concepts:
        vector = bank.get(concept, layer)
        cos = float(torch.nn.functional.cosine_similarity(vector.vector.float(), direction.float().cpu(), dim=0))
        for prompt in prompts:
            trials.append(Trial(prompt, vector, float(scale_of[concept])))
            info.append({"model": handle.name, "concept": concept, "layer": layer,
                         "scale": float(scale_of[concept]), "cos_direction": cos, "question_kind": prompt.kind,
                         "question": prompt.question})
    frames = []
    for point in ("none", *ablate_at):
        readout = (measure(handle, trials) if point == "none"
                   else measure(handle, trials, ablate=direction, ablate_at=point))
        frame = pd.DataFrame(info).assign(ablation=point, logit_diff=readout.logit_diff.numpy(),
                                          baseline_logit_diff=readout.baseline.numpy())
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)
    df["delta"] = df["logit_diff"] - df["baseline_logit_diff"]
    return df[ABLATION_COLUMNS]


def describe_ablation_points(df: pd.DataFrame, concept: str) -> str:
    """Sentences on :func:`ablation_points` for ``concept``: the introspection and control mean under each
    ablation point, and what keeping the injected vector's own component (before − after) changes."""
    sel = df[df["concept"] == concept]
    if sel.empty:
        raise ValueError(f"concept {concept!r} is not in the table ({', '.join(df['concept'].unique())})")
    mean = sel.groupby(["ablation", "question_kind"])["logit_diff"].mean()
    parts = []
    for point in [p for p in ("none", "after", "before") if p in mean.index.get_level_values(0)]:
        intro, ctrl = mean[point].get("introspection", np.nan), mean[point].get("control", np.nan)
        parts.append(f"{point}: introspection {intro:+.2f}, control mean {ctrl:+.2f}")
    text = f"{concept} × {sel['scale'].iloc[0]:g} at layer {int(sel['layer'].iloc[0])} — " + "; ".join(parts) + "."
    if {"after", "before"} <= set(sel["ablation"]):
        gap = mean["before"].get("introspection", np.nan) - mean["after"].get("introspection", np.nan)
        text += (f" Keeping the injected vector's own component along the direction (cosine "
                 f"{sel['cos_direction'].iloc[0]:+.2f}; before − after) moves the introspection answer by {gap:+.2f}.")
    return text
