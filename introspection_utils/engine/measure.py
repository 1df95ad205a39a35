"""The measurement API: trials → yes−no logit differences, answer mass, the logit lens, attention and residuals,
batched through the one injection pass; every experiment calls :func:`measure`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

import torch
from tqdm.auto import tqdm

from introspection_utils.engine.prompts import answer_set, yes_no_ids
from introspection_utils.engine.readout import answer_readout, readout_logits, yes_minus_no
from introspection_utils.engine.traced_pass import AblateAt, Ablation, Injection, PromptRun, Reads
from introspection_utils.engine.trials import Trial, Window, check_trials, trial_grid
from introspection_utils.models.memory import choose_batch_size

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

# Public names defined beside this module and used from here (``from introspection_utils.engine.measure import ...``).
__all__ = ["AblateAt", "Readout", "Strategy", "Trial", "Window", "answer_logits", "attention_to_injection",
           "check_trials", "logit_lens", "measure", "readout_logits", "residuals", "trial_grid", "yes_minus_no",
           "yes_no_logit_diff"]

Strategy = Literal["cached", "full"]
DEFAULT_BATCH = 32

# Tensor shapes in signatures (``typing.get_type_hints(f, include_extras=True)`` shows them; so do IDE hovers).
PerTrial = Annotated[torch.Tensor, "[n_trials]"]
PerTrialLayer = Annotated[torch.Tensor, "[n_trials, n_layers]"]
PerTrialLayerHead = Annotated[torch.Tensor, "[n_trials, n_layers, n_heads]"]
PerTrialToken = Annotated[torch.Tensor, "[n_trials, k]"]  # k answer tokens read
PerTrialResidual = Annotated[torch.Tensor, "[n_trials, len(layers), d_model]"]
Direction = Annotated[torch.Tensor, "[d_model]"]


@dataclass
class Readout:
    """What one batch of trials measured. ``logit_diff [n]``; optional ``lens [n, n_layers]``,
    ``attention_sum``/``attention_max [n, n_layers, n_heads]`` and ``baseline [n]`` (the trial's prompt uninjected).
    ``logits [n, k]``: the raw logits of the k answer tokens read (for :func:`measure` the yes set then the no set,
    :attr:`prompts.AnswerSet.ids`).
    ``residuals [n, len(layers), D]``: the residual stream (decoder-layer outputs) at the last position, for
    :func:`residuals`. ``answer_mass [n]`` / ``baseline_answer_mass [n]``: P(yes) + P(no) under the full softmax at
    the answer position, injected and uninjected, summed over both answer sets — how much of the model's next-token
    probability the answers hold (a yes−no difference read where this is small says little about what the model
    would answer)."""

    logit_diff: PerTrial
    baseline: PerTrial
    answer_mass: PerTrial
    baseline_answer_mass: PerTrial
    lens: PerTrialLayer | None = None
    attention_sum: PerTrialLayerHead | None = None
    attention_max: PerTrialLayerHead | None = None
    logits: PerTrialToken | None = None
    residuals: PerTrialResidual | None = None


def measure(handle: ModelHandle, trials: Sequence[Trial], *, answers: tuple[str, str] | None = None,
            lens: bool = False, attention: bool = False, strategy: Strategy = "cached",
            batch_size: int | None = None, progress: bool = False, ablate: Direction | None = None,
            ablate_at: AblateAt = "after") -> Readout:
    """Run ``trials`` and return their :class:`Readout` (rows in the order of ``trials``).

    ``answers``: the (yes, no) answers, each a word or a list of words (default: the answer sets of
    :func:`prompts.answer_set`, "Yes"/"yes"/"YES" and "No"/"no"/"NO" with and without a leading space, whichever are
    single tokens); the readout is :func:`yes_minus_no` over the sets and the answer mass covers both. ``lens``:
    also the yes−no logit lens ``[n, n_layers]``. ``attention``: also the last position's attention to each trial's
    injected positions, summed and maxed over them, ``[n, n_layers, n_heads]`` (no layer skip then, all layers run).
    ``ablate``: a direction ``[d_model]`` projected out of the residual stream (embeddings and every layer's output,
    at every position, after the injection) in every pass, baselines included — e.g. the refusal direction of
    :mod:`introspection_utils.experiments.refusal`. It is normalised here. ``ablate_at="before"``: the direction is
    projected
    out first and the injection added after, at the injection layer and (its component along the direction, which
    the residual connection carries on) at every later layer — only the model's own component is removed, the
    injected vector's is kept.
    """
    check_trials(handle, trials, weighted=True)
    if ablate_at not in ("after", "before"):
        raise ValueError(f"ablate_at must be 'after' or 'before', got {ablate_at!r}")
    ablation = Ablation.of(handle, ablate, ablate_at) if ablate is not None else None
    sets = answer_set(handle, answers)
    return _run(handle, trials, torch.tensor(sets.ids, device=handle.device), n_yes=len(sets.yes), lens=lens,
                attention=attention, strategy=strategy, batch_size=batch_size, progress=progress, ablation=ablation)


def answer_logits(handle: ModelHandle, trials: Sequence[Trial], token_ids: Sequence[int], *,
                  strategy: Strategy = "cached", batch_size: int | None = None, progress: bool = False
                  ) -> PerTrialToken:
    """Logits of the tokens ``token_ids`` at the last position of each trial: ``[n_trials, k]`` (float32, CPU).

    The general readout behind multiple-choice answers (e.g. the digits "1".."N" of the localization experiment);
    the same batched engine as :func:`measure` (prefix cache, layer skip), rows in the order of ``trials``.
    """
    check_trials(handle, trials, weighted=True)
    ids = list(token_ids)
    vocab = handle.torch_model.get_output_embeddings().weight.shape[0]
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab for i in ids):
        raise ValueError(f"token_ids must be a non-empty list of token ids in 0..{vocab - 1}, got {ids!r}")
    readout = _run(handle, trials, torch.tensor(ids, device=handle.device), n_yes=None, lens=False, attention=False,
                   strategy=strategy, batch_size=batch_size, progress=progress)
    return readout.logits


def _auto_batch_size(handle: ModelHandle, trials: Sequence[Trial]) -> int:
    """On a GPU, the largest batch the memory estimate allows (refusing when one trial can't fit); on a CPU,
    ``DEFAULT_BATCH`` (larger batches buy nothing there and only cost memory)."""
    if handle.remote or handle.device.type != "cuda":
        return DEFAULT_BATCH
    longest = max(trials, key=lambda t: len(t.prompt))
    return choose_batch_size(handle, prompt_tokens=len(longest.prompt),
                             suffix_tokens=len(longest.prompt) - longest.span()[0])


def _run(handle: ModelHandle, trials: Sequence[Trial], answer_ids: torch.Tensor, *, n_yes: int | None, lens: bool,
         attention: bool, strategy: Strategy, batch_size: int | None, progress: bool,
         residual_layers: Sequence[int] | None = None, ablation: Ablation | None = None) -> Readout:
    """The batched engine behind :func:`measure`, :func:`answer_logits` and :func:`residuals` (trials already
    validated): trials grouped by prompt and window start (one :class:`injection.PromptRun` each: the prefix cache)
    and by injection layer (one batched pass per chunk, layers below it skipped). ``answer_ids [k]``: the tokens
    read, the first ``n_yes`` the yes set (``None``: no yes/no pair)."""
    read_residuals = residual_layers is not None  # the last position's layer outputs leave the trace
    batch_size = batch_size or _auto_batch_size(handle, trials)
    if handle.remote:
        strategy = "full"  # NDIF runs traces, not local caches: recompute the whole prompt per batch
    reads = Reads(answer_ids=answer_ids, n_yes=n_yes, lens=lens, last=read_residuals, attention=attention)
    n = len(trials)
    logit_diff, baseline = torch.empty(n), torch.empty(n)
    mass, baseline_mass = torch.empty(n), torch.empty(n)
    logits_out = torch.empty(n, len(answer_ids))
    lens_out = torch.empty(n, handle.arch.n_layers) if lens else None
    att_sum = torch.empty(n, handle.arch.n_layers, handle.arch.n_heads) if attention else None
    att_max = torch.empty_like(att_sum) if attention else None
    res_out = torch.empty(n, len(residual_layers), handle.arch.d_model) if residual_layers is not None else None

    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, trial in enumerate(trials):
        groups[(trial.prompt, trial.span())].append(index)
    bar = tqdm(total=n, desc="trials", disable=not progress)
    for (prompt, (start, _end)), indices in groups.items():
        keys = torch.zeros(len(prompt), dtype=torch.bool)  # [T]: the injected positions
        for index in indices:
            keys |= trials[index].weights() != 0
        run = PromptRun(handle, prompt.input_ids, 0 if strategy == "full" else start, ablation=ablation)
        base = run.baseline(reads, keep_hidden=strategy == "cached", remote=True)
        base_diff, base_mass = answer_readout(base.answer_logits, base.log_partition, n_yes)
        by_layer: dict[int | None, list[int]] = defaultdict(list)
        for index in indices:
            by_layer[trials[index].injection_layer if trials[index].injected else None].append(index)
        for layer, members in by_layer.items():
            for chunk_start in range(0, len(members), batch_size):
                chunk = members[chunk_start:chunk_start + batch_size]
                at = torch.tensor(chunk)  # the chunk's rows in the readout
                if layer is None:  # no injection: the shared pass already measured it
                    out = base.expand(len(chunk))
                    logit_diff[at], mass[at] = base_diff.expand(len(chunk)), base_mass.expand(len(chunk))
                else:
                    injection = Injection.of(handle, [trials[i] for i in chunk], run.positions)
                    out = run.forward(len(chunk), injection=injection, reads=reads,
                                      skip=strategy == "cached" and not attention, remote=True)
                    logit_diff[at], mass[at] = answer_readout(out.answer_logits, out.log_partition, n_yes)
                logits_out[at] = out.answer_logits
                baseline[at] = base_diff.expand(len(chunk))
                baseline_mass[at] = base_mass.expand(len(chunk))
                if lens:
                    lens_out[at] = out.lens
                if res_out is not None:
                    res_out[at] = torch.stack([out.last[i] for i in residual_layers], 1).float().cpu()
                if attention:
                    weights = out.attention[..., keys]  # [B, n_layers, n_heads, n_injected]
                    att_sum[at] = weights.sum(-1)
                    att_max[at] = weights.amax(-1)
                bar.update(len(chunk))
    bar.close()
    return Readout(logit_diff, baseline, mass, baseline_mass, lens_out, att_sum, att_max, logits_out, res_out)


def yes_no_logit_diff(handle: ModelHandle, trials: Sequence[Trial], *, answers: tuple[str, str] | None = None,
                      strategy: Strategy = "cached", batch_size: int | None = None) -> PerTrial:
    """yes − no (:func:`yes_minus_no` over the answer sets) at the first answer position for each trial:
    ``[n_trials]``."""
    return measure(handle, trials, answers=answers, strategy=strategy, batch_size=batch_size).logit_diff


def logit_lens(handle: ModelHandle, trials: Sequence[Trial], *, answers: tuple[str, str] | None = None,
               batch_size: int | None = None) -> PerTrialLayer:
    """The yes−no logit lens: each layer's residual through the final norm (and softcap) onto the answer sets'
    rows of the unembedding, read as :func:`yes_minus_no`, at the answer position. ``[n_trials, n_layers]``; the
    last column is the real yes−no logit difference."""
    return measure(handle, trials, answers=answers, lens=True, batch_size=batch_size).lens


def attention_to_injection(handle: ModelHandle, trials: Sequence[Trial], *, batch_size: int | None = None
                           ) -> tuple[PerTrialLayerHead, PerTrialLayerHead]:
    """Attention weight from the last position (prefill the answer to read the answer token) to each trial's
    injected positions, per layer and head: ``(sum, max)``, each ``[n_trials, n_layers, n_heads]``."""
    readout = measure(handle, trials, attention=True, batch_size=batch_size)
    return readout.attention_sum, readout.attention_max


def residuals(handle: ModelHandle, trials: Sequence[Trial], layers: Sequence[int], *, strategy: Strategy = "cached",
              batch_size: int | None = None, progress: bool = False) -> PerTrialResidual:
    """The residual stream (output of decoder layer ``l`` for each ``l`` in ``layers``) at the last position of each
    trial, with its injection: ``[n_trials, len(layers), d_model]`` (float32, CPU; rows in the order of ``trials``).

    What an SAE at those layers encodes. The same batched engine as :func:`measure`; a layer below the injection
    layer reads the uninjected value (the injection cannot reach it).
    """
    check_trials(handle, trials, weighted=True)
    layers = [handle.check_layer(layer) for layer in layers]
    if not layers:
        raise ValueError("no layers given")
    answer_ids = torch.tensor(yes_no_ids(handle), device=handle.device)
    return _run(handle, trials, answer_ids, n_yes=1, lens=False, attention=False, strategy=strategy,
                batch_size=batch_size, progress=progress, residual_layers=layers).residuals
