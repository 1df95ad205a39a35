"""Causal tests of where the injected "yes" is made: activation patching, attribution patching and head ablation;
:mod:`.mechanisms` (notebooks 05 and 12) calls them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from introspection_utils.core.deprecation import renamed
from introspection_utils.engine.components import Edit, PromptPass, Site, all_sites, check_heads, check_sites
from introspection_utils.engine.measure import DEFAULT_BATCH, Trial, check_trials, measure
from introspection_utils.engine.prompts import paper_answers, question_prompts, yes_no_ids
from introspection_utils.engine.vectors import ConceptVector, concept_vectors
from introspection_utils.experiments.attribution import TRIAL_COLUMNS, trial_metadata
from introspection_utils.stats.shifts import question_contrast

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

Direction = Literal["sufficiency", "necessity"]
DIRECTIONS: tuple[Direction, ...] = ("sufficiency", "necessity")
Span = Literal["answer"] | tuple[int, int]
SITE_COLUMNS = ["kind", "comp_layer", "head", "site"]
PATCH_COLUMNS = [*[c for c in TRIAL_COLUMNS if c != "injected"], "direction", "span", *SITE_COLUMNS, "source",
                 "target", "patched", "effect", "fraction"]


# ------------------------------------------------------------------------------------------------- shared plumbing


def _positions(trial: Trial, span: Span) -> torch.Tensor:
    """The absolute positions ``[P]`` a patch covers: the answer position (the last token) or ``(start, end)``."""
    n = len(trial.prompt)
    if span == "answer":
        return torch.tensor([n - 1])
    if not (isinstance(span, tuple) and len(span) == 2 and all(isinstance(x, int) for x in span)
            and 0 <= span[0] < span[1] <= n):
        raise ValueError(f"span {span!r} must be 'answer' or a (start, end) token range inside the prompt (0..{n})")
    return torch.arange(span[0], span[1])


def _check(handle: ModelHandle, trials: Sequence[Trial], sites: Sequence[Site], span: Span,
           directions: Sequence[str]) -> list[Site]:
    check_trials(handle, trials)
    if not all(t.injected for t in trials):
        raise ValueError("every trial must be injected (a vector and a non-zero scale): patching compares it with "
                         "the same prompt uninjected")
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown or not directions:
        raise ValueError(f"directions {list(directions)!r}: choose from {DIRECTIONS}")
    for trial in trials:
        _positions(trial, span)
    return check_sites(handle, sites)


def _pass_and_pair(handle: ModelHandle, trial: Trial, positions: torch.Tensor) -> tuple[PromptPass, list[Trial]]:
    """The prompt's prefix pass (cached up to the window or the span, whichever starts first) and the trial's two
    rows: injected, and the same trial uninjected (scale 0)."""
    start, _ = trial.span()
    last = len(trial.prompt) - 1
    run = PromptPass(handle, trial.prompt.input_ids, min(start, int(positions.min()), last))
    return run, [trial, replace(trial, scale=0.0)]


def _site_columns(site: Site) -> dict:
    return {"kind": site.kind, "comp_layer": site.layer, "head": site.head, "site": site.label}


def default_sites(handle: ModelHandle, layer: int, *, heads: bool = True) -> list[Site]:
    """Every attention and MLP output (and head) above the injection layer ``layer``; those at or below it cannot
    differ between the injected and uninjected runs."""
    return all_sites(handle, range(layer + 1, handle.arch.n_layers), heads=heads)


def _finish(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for column in ("comp_layer", "head", "vector_seed"):
        df[column] = df[column].astype("Int64")
    return df


# ------------------------------------------------------------------------------------------------ activation patching


def activation_patching(handle: ModelHandle, trials: Sequence[Trial], sites: Sequence[Site] | None = None, *,
                        span: Span = "answer", directions: Sequence[Direction] = DIRECTIONS,
                        answers: tuple[str, str] | None = None, batch_size: int | None = None,
                        progress: bool = False) -> pd.DataFrame:
    """Patch each site of ``sites`` (default :func:`default_sites` of each trial's layer) at ``span`` between each
    injected trial and the same prompt uninjected, in each direction; one row per trial × direction × site.

    Columns :data:`PATCH_COLUMNS`: ``source`` / ``target`` are the yes−no differences of the run the values come
    from and the run they go into, ``patched`` the target's with the patch, ``effect = patched − target`` and
    ``fraction = effect / (source − target)`` (1: this site alone carries the whole difference).
    """
    _check(handle, trials, sites or [Site(0, "attn")], span, directions)
    answer_ids = torch.tensor(yes_no_ids(handle, *(answers or (None, None))), device=handle.device)
    batch_size = batch_size or DEFAULT_BATCH
    rows = []
    bar = tqdm(total=len(trials), desc="patching", disable=not progress)
    for trial in trials:
        trial_sites = check_sites(handle, sites) if sites is not None else default_sites(handle,
                                                                                          trial.injection_layer)
        positions = _positions(trial, span)
        run, pair = _pass_and_pair(handle, trial, positions)
        layer = trial.injection_layer
        both = run.forward(2, answer_ids=answer_ids, injection=run.injection(pair, layer=layer), read=positions)
        diff = both.logits[:, 0] - both.logits[:, 1]  # injected, uninjected
        meta = trial_metadata(handle, trial)
        meta.pop("injected")
        for direction in directions:
            source, target = (0, 1) if direction == "sufficiency" else (1, 0)
            for chunk_start in range(0, len(trial_sites), batch_size):
                chunk = trial_sites[chunk_start:chunk_start + batch_size]
                edits = [Edit(site, torch.tensor([r]), positions,
                              both.output(site, source)[None].to(handle.device, handle.dtype))
                         for r, site in enumerate(chunk)]
                out = run.forward(len(chunk), answer_ids=answer_ids, edits=edits, skip=True,
                                  injection=run.injection([pair[target]] * len(chunk), layer=layer))
                patched = out.logits[:, 0] - out.logits[:, 1]
                for site, value in zip(chunk, patched.tolist(), strict=True):
                    rows.append({**meta, "direction": direction, "span": _span_label(span), **_site_columns(site),
                                 "source": float(diff[source]), "target": float(diff[target]), "patched": value})
        bar.update(1)
    bar.close()
    df = _finish(rows)
    df["effect"] = df["patched"] - df["target"]
    df["fraction"] = df["effect"] / (df["source"] - df["target"])
    return df[PATCH_COLUMNS]


def _span_label(span: Span) -> str:
    return span if span == "answer" else f"{span[0]}:{span[1]}"


# --------------------------------------------------------------------------------------------- attribution patching


def attribution_patching(handle: ModelHandle, trials: Sequence[Trial], sites: Sequence[Site] | None = None, *,
                         span: Span = "answer", directions: Sequence[Direction] = DIRECTIONS,
                         answers: tuple[str, str] | None = None, progress: bool = False) -> pd.DataFrame:
    """The first-order estimate of :func:`activation_patching`'s ``effect`` for every site at once:
    ``estimate = Σ_positions (source − target) · ∂(yes − no)/∂output`` with the gradient taken at the target run
    (the uninjected run for sufficiency, the injected one for necessity; the yes−no difference after any softcap).

    One forward and backward of two rows (injected, uninjected) per trial. Columns as :data:`PATCH_COLUMNS` with
    ``estimate`` in place of ``patched / effect / fraction``.
    """
    _check(handle, trials, sites or [Site(0, "attn")], span, directions)
    answer_ids = torch.tensor(yes_no_ids(handle, *(answers or (None, None))), device=handle.device)
    rows = []
    for trial in tqdm(trials, desc="attribution patching", disable=not progress):
        trial_sites = check_sites(handle, sites) if sites is not None else default_sites(handle,
                                                                                          trial.injection_layer)
        positions = _positions(trial, span)
        run, pair = _pass_and_pair(handle, trial, positions)
        out = run.forward(2, answer_ids=answer_ids, injection=run.injection(pair, layer=trial.injection_layer),
                          read=positions, read_layers=sorted({s.layer for s in trial_sites}), grad=True)
        diff = out.logits[:, 0] - out.logits[:, 1]
        meta = trial_metadata(handle, trial)
        meta.pop("injected")
        for direction in directions:
            source, target = (0, 1) if direction == "sufficiency" else (1, 0)
            for site in trial_sites:
                delta = out.output(site, source) - out.output(site, target)  # [P, width]
                g = out.gradient(site, target)
                rows.append({**meta, "direction": direction, "span": _span_label(span), **_site_columns(site),
                             "source": float(diff[source]), "target": float(diff[target]),
                             "estimate": float((delta * g).sum())})
    columns = [c for c in PATCH_COLUMNS if c not in ("patched", "effect", "fraction")] + ["estimate"]
    return _finish(rows)[columns]


def attribution_agreement(patched: pd.DataFrame, estimated: pd.DataFrame) -> dict:
    """How well attribution patching agrees with activation patching over the components both tables hold:
    Pearson and Spearman correlations of ``estimate`` against ``effect``, and their number ``n``."""
    keys = ["question", "concept", "scale", "direction", "span", "site"]
    both = patched.merge(estimated[[*keys, "estimate"]], on=keys, how="inner")
    if len(both) < 3:
        raise ValueError(f"only {len(both)} components in both tables; agreement needs at least 3")
    pearson = float(np.corrcoef(both["effect"], both["estimate"])[0, 1])
    spearman = float(np.corrcoef(both["effect"].rank(), both["estimate"].rank())[0, 1])
    return {"pearson": pearson, "spearman": spearman, "n": len(both)}


def introspection_specific(df: pd.DataFrame, value: str = "effect") -> pd.DataFrame:
    """Per direction and site: ``value`` on the introspection question, its mean over the control questions, and
    their difference ``specific = introspection − control`` (sorted by ``|specific|``, largest first)."""
    table = question_contrast(df, value, ["direction", "span", *SITE_COLUMNS]).reset_index()
    return table.reindex(table["specific"].abs().sort_values(ascending=False).index).reset_index(drop=True)


def concept_trials(handle: ModelHandle, concept: str | ConceptVector, scale: float, *, layer: int | None = None,
                   n_controls: int = 4) -> list[Trial]:
    """The injected trials of one concept: the introspection question and ``n_controls`` control questions
    (paper frame), ``scale ×`` the concept's vector at ``layer`` (default two thirds of the depth)."""
    if isinstance(concept, ConceptVector):
        vector = concept
    else:
        layer = 2 * handle.arch.n_layers // 3 if layer is None else handle.check_layer(layer)
        vector = concept_vectors(handle, [concept], progress=False).get(concept, layer)
    return [Trial(p, vector, float(scale)) for p in question_prompts(handle, n_controls)]


# ------------------------------------------------------------------------------------------------------ head ablation


AblationMode = Literal["zero", "mean"]


def head_means(handle: ModelHandle, prompts: Sequence, heads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Each head's mean output ``[len(heads), head_dim]`` over every position of the uninjected ``prompts``
    (pooled), the value mean ablation puts in its place."""
    dh = handle.head_dim
    layers = sorted({layer for layer, _ in heads})
    sums, count = torch.zeros(len(heads), dh), 0
    answer_ids = torch.tensor(yes_no_ids(handle), device=handle.device)
    for prompt in dict.fromkeys(prompts):
        out = PromptPass(handle, prompt.input_ids, 0).forward(1, answer_ids=answer_ids,
                                                                read=torch.arange(len(prompt)), read_layers=layers)
        for k, (layer, head) in enumerate(heads):
            sums[k] += out.z[layer][0, :, head * dh:(head + 1) * dh].sum(0)
        count += len(prompt)
    return sums / count


def ablated_logit_diff(handle: ModelHandle, trials: Sequence[Trial], heads: Sequence[tuple[int, int]], *,
                       mode: AblationMode = "zero", answers: tuple[str, str] | None = None,
                       means: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`introspection_utils.engine.measure.measure` with ``heads`` (``(layer, head)`` pairs) ablated at every
    position: ``(logit_diff [n], baseline [n])``, the baseline being each trial's prompt uninjected with the same
    heads ablated. ``mode``: "zero", or "mean" (``means [len(heads), head_dim]``, default :func:`head_means` over
    the trials' prompts).
    """
    check_trials(handle, trials)
    heads = check_heads(handle, heads)
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode {mode!r}: use 'zero' or 'mean'")
    dh = handle.head_dim
    if mode == "mean" and means is None:
        means = head_means(handle, [t.prompt for t in trials], heads)
    if means is not None and tuple(means.shape) != (len(heads), dh):
        raise ValueError(f"means must be [{len(heads)}, {dh}], got {tuple(means.shape)}")
    answer_ids = torch.tensor(yes_no_ids(handle, *(answers or (None, None))), device=handle.device)
    logit_diff, baseline = torch.empty(len(trials)), torch.empty(len(trials))
    groups: dict[tuple, list[int]] = {}
    for index, trial in enumerate(trials):
        groups.setdefault((trial.prompt, trial.injection_layer if trial.injected else None, trial.span()),
                          []).append(index)
    for (prompt, layer, (start, _end)), members in groups.items():
        n = len(members) + 1  # row 0: the prompt uninjected, ablated
        values = {pair: (torch.zeros(dh) if mode == "zero" else means[k]).to(handle.device, handle.dtype)
                  for k, pair in enumerate(heads)}
        # The prefix is ablated once for every row (the same heads, the same values); the rows ablate the suffix.
        cached = min(start, len(prompt) - 1)
        run = PromptPass(handle, prompt.input_ids, cached, prefix_heads=values)
        suffix = torch.arange(cached, len(prompt))
        edits = [Edit(Site(hl, "head", hh), torch.arange(n), suffix, value.expand(n, len(suffix), dh))
                 for (hl, hh), value in values.items()]
        injection = run.injection([Trial(prompt)] + [trials[i] for i in members], layer=layer)
        out = run.forward(n, answer_ids=answer_ids, injection=injection, edits=edits,
                          skip=True)  # layers below the first ablated or injected one: shared
        diff = out.logits[:, 0] - out.logits[:, 1]
        logit_diff[torch.tensor(members)] = diff[1:]
        baseline[torch.tensor(members)] = diff[0]
    return logit_diff, baseline


def head_ablation(handle: ModelHandle, concept: str | ConceptVector, scale: float, heads: Sequence[tuple[int, int]],
                  *, layer: int | None = None, n_controls: int = 4, modes: Sequence[str] = ("none", "zero", "mean"),
                  answers: tuple[str, str] | None = None) -> pd.DataFrame:
    """Does the introspection-specific shift survive without ``heads``? The concept injected at ``scale`` on the
    introspection question and ``n_controls`` controls, with the heads intact ("none") and zero- / mean-ablated.

    E.g. the write-up's heads on Gemma-2-9B: ``head_ablation(h, "Sandwich", 4, [(34, 10), (39, 5)])`` (heads that
    do not exist in the model are a ``ValueError`` before any compute). One row per mode × question: ``logit_diff``,
    ``baseline`` (the question uninjected, same ablation), ``shift = logit_diff − baseline``; see
    :func:`specific_shift`.
    """
    heads = check_heads(handle, heads)
    unknown = [m for m in modes if m not in ("none", "zero", "mean")]
    if unknown or not modes:
        raise ValueError(f"modes {list(modes)!r}: choose from 'none', 'zero', 'mean'")
    trials = concept_trials(handle, concept, scale, layer=layer, n_controls=n_controls)
    rows = []
    label = ", ".join(f"L{a}H{b}" for a, b in heads)
    for mode in modes:
        if mode == "none":
            readout = measure(handle, trials, answers=answers or paper_answers())  # the pair the ablations read
            diff, base = readout.logit_diff, readout.baseline
        else:
            diff, base = ablated_logit_diff(handle, trials, heads, mode=mode, answers=answers)
        for trial, d, b in zip(trials, diff.tolist(), base.tolist(), strict=True):
            meta = trial_metadata(handle, trial)
            meta.pop("injected")
            rows.append({**meta, "ablation": mode, "heads": label if mode != "none" else "", "logit_diff": d,
                         "baseline": b, "shift": d - b})
    df = pd.DataFrame(rows)
    df["vector_seed"] = df["vector_seed"].astype("Int64")
    return df


def specific_shift(df: pd.DataFrame) -> pd.DataFrame:
    """Per ablation mode of :func:`head_ablation`: the introspection shift, the control questions' mean shift, and
    ``specific = introspection − control`` (the introspection-specific part of the injection's push)."""
    return question_contrast(df, "shift", ["ablation"], sort=False).reset_index()


# the old name, one release
__getattr__ = renamed(__name__, globals(), {"agreement": "attribution_agreement"})
