"""The one injection pass (:func:`traced_pass`), the only trace that edits the residual stream: injection, ablation,
prefix cache, layer skip; :mod:`.measure`, :mod:`.components`, :mod:`.generation` and the refusal experiment call it."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import nnsight
import torch
from transformers import DynamicCache

from introspection_utils.engine.readout import lens_diff, readout_logits
from introspection_utils.engine.vectors import left_pad

if TYPE_CHECKING:
    from introspection_utils.engine.trials import Trial
    from introspection_utils.models.handle import ModelHandle

# Where a directional ablation sits relative to the injection (see :class:`Ablation`).
AblateAt = Literal["after", "before"]


def project_out(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` without its component along the unit ``direction [D]``."""
    return x - (x @ direction)[..., None] * direction


@dataclass(frozen=True)
class Ablation:
    """A unit ``direction [d_model]`` (on the model's device, in its dtype) projected out of the embeddings and every
    layer's output at every position, in every pass of a call (baselines included).

    ``at="after"``: after the injection, so the stream never carries the direction, the injected vector's own
    component included (Arditi et al.'s directional ablation). ``at="before"``: projected out first and the injection
    added after, at the injection layer and (its component along the direction, which the residual connection
    carries on) at every later layer: only the model's own component is removed.
    """

    direction: torch.Tensor
    at: AblateAt = "after"

    @classmethod
    def of(cls, handle: ModelHandle, direction: torch.Tensor, at: AblateAt = "after") -> Ablation:
        """``direction [d_model]`` checked (finite, non-zero), normalised, on the model's device and dtype."""
        if at not in ("after", "before"):
            raise ValueError(f"ablate_at must be 'after' or 'before', got {at!r}")
        direction = torch.as_tensor(direction).float()
        if direction.shape != (handle.arch.d_model,) or not torch.isfinite(direction).all() or direction.norm() == 0:
            raise ValueError(f"ablate must be a finite non-zero [{handle.arch.d_model}] direction, got shape "
                             f"{tuple(direction.shape)}")
        return cls((direction / direction.norm()).to(handle.device, handle.dtype), at)


@dataclass(frozen=True)
class Injection:
    """What one pass adds: ``add [B, D]`` (each row's ``scale × vector``, model device and dtype) times ``weights
    [B, T]`` (the window rule's multiple at each traced position, 0 on padding) to decoder layer ``layer``'s
    output."""

    layer: int
    add: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def of(cls, handle: ModelHandle, trials: Sequence[Trial], positions: torch.Tensor, *, layer: int | None = None,
           valid: torch.Tensor | None = None) -> Injection | None:
        """The injection of ``trials``, one row each, over the traced tokens at absolute ``positions`` (``[T]``, the
        same for every row, or ``[B, T]``); ``valid [B, T]``: 0 on padding (never injected into).

        ``layer``: by default the injection layer the injected trials share; a row whose trial injects nothing adds
        zeros there. ``None`` when no layer is given and no trial injects.
        """
        if layer is None:
            layers = {t.injection_layer for t in trials if t.injected}
            if not layers:
                return None
            if len(layers) > 1:
                raise ValueError(f"one pass injects at one layer; these trials inject at layers {sorted(layers)}")
            layer = layers.pop()
        zero = torch.zeros(handle.arch.d_model)
        add = torch.stack([t.scale * t.vector.vector if t.injected else zero for t in trials])
        rows = positions.expand(len(trials), -1) if positions.ndim == 1 else positions
        weights = torch.stack([t.weights_at(p) for t, p in zip(trials, rows, strict=True)])
        if valid is not None:
            weights = weights * valid
        return cls(layer, add.to(handle.device, handle.dtype), weights.to(handle.device, handle.dtype))


@dataclass(frozen=True)
class Reads:
    """What leaves a pass (all off by default).

    ``answer_ids [k]`` (the first ``n_yes`` the yes set): their float32 logits at the last position
    (:func:`readout.readout_logits`) and the full softmax's log-partition; ``lens``: the yes−no logit lens of each
    computed layer (needs ``answer_ids`` and ``n_yes``); ``last``: each computed layer's output at the last position;
    ``hidden``: each computed layer's output at every position; ``attention``: the last query's attention weights
    in each computed layer; ``logits``: the model's own full logits at the last position.
    """

    answer_ids: torch.Tensor | None = None
    n_yes: int | None = None
    lens: bool = False
    last: bool = False
    hidden: bool = False
    attention: bool = False
    logits: bool = False


@dataclass
class PassResult:
    """What one pass of ``B`` rows read (``None`` where not asked). Float32 on the CPU: ``answer_logits [B, k]``,
    ``log_partition [B]``, ``logits [B, vocab]``, ``lens [B, n]``, ``attention [B, n, n_heads, T_keys]``; on the
    device, in the model's dtype: ``hidden`` (per layer ``[B, T, D]``) and ``last`` (per layer ``[B, D]``). The
    per-layer reads cover the computed layers, or all of them once :meth:`PromptRun.forward` has put the skipped ones
    back from the baseline."""

    answer_logits: torch.Tensor | None = None
    log_partition: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden: list[torch.Tensor] | None = None
    last: list[torch.Tensor] | None = None
    lens: torch.Tensor | None = None
    attention: torch.Tensor | None = None

    def expand(self, rows: int) -> PassResult:
        """This one-row pass as ``rows`` identical rows (what an uninjected trial measures)."""
        def grow(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.expand(rows, *t.shape[1:])
        return PassResult(grow(self.answer_logits), grow(self.log_partition), grow(self.logits), self.hidden,
                          None if self.last is None else [grow(r) for r in self.last], grow(self.lens),
                          grow(self.attention))

    def below(self, baseline: PassResult, first: int, rows: int) -> PassResult:
        """This pass with the per-layer reads of layers ``< first`` (skipped: the same in every row) taken from the
        uninjected ``baseline``, which must have read them."""
        shared = baseline.expand(rows)
        missing = [name for name in ("last", "lens", "attention")
                   if getattr(self, name) is not None and getattr(shared, name) is None]
        if missing:
            raise ValueError(f"the baseline did not read {missing}: compute it with the same reads to skip layers")
        if self.last is not None:
            self.last = [*shared.last[:first], *self.last]
        if self.lens is not None:
            self.lens = torch.cat([shared.lens[:, :first], self.lens], dim=1)
        if self.attention is not None:
            self.attention = torch.cat([shared.attention[:, :first], self.attention], dim=1)
        return self


class Within:
    """Reads and edits inside the layers that ride along with a pass (component sites: :mod:`components`). Each
    method runs inside the trace, in forward order; this base class reads and edits nothing."""

    lowest_layer: int | None = None  # the lowest layer edited: the layer skip stops below it
    reads_logits = False  # whether :meth:`logits` wants the final logits (the pass reads them only if asked)

    def context(self, handle: ModelHandle) -> AbstractContextManager:
        """The autograd context of the pass (no gradients unless a subclass reads them)."""
        return torch.no_grad()

    def start(self, handle: ModelHandle) -> None:
        """After the embeddings (and their ablation), before the first layer."""

    def layer(self, handle: ModelHandle, i: int) -> None:
        """Inside layer ``i``, before its output (and so before the injection and ablation there)."""

    def after_layers(self, handle: ModelHandle) -> None:
        """After the last layer, before the final logits."""

    def logits(self, handle: ModelHandle, final: torch.Tensor) -> None:
        """With the model's final logits at the last position ``final [B, vocab]``."""


def traced_pass(handle: ModelHandle, ids: torch.Tensor, inputs: dict, *, injection: Injection | None = None,
                ablation: Ablation | None = None, reads: Reads = Reads(), within: Within | None = None,
                skip: Sequence[torch.Tensor] = (), remote: bool = False) -> PassResult:
    """One traced forward of ``ids [B, T]`` (``inputs``: the trace's keyword arguments: attention mask, position ids,
    cache), injecting ``injection`` and ablating ``ablation``; returns what ``reads`` asks for.

    In forward order: the ablation of the embeddings; ``within.start``; layers ``< len(skip)`` served from ``skip``
    (their outputs ``[1 or B, T, D]``, the same in every row); then in each computed layer its attention weights,
    ``within.layer``, the ablation "before", the injection (and, ablating "before", the injection's component along
    the direction at every later layer), the ablation "after" and the layer reads; then ``within.after_layers``, the
    lens, the answer logits, the final logits and ``within.logits``. ``remote``: run on NDIF when the handle is remote
    (the measurement engine's passes; the others keep a local cache or gradients).
    """
    if within is not None and reads.attention:
        raise ValueError("attention weights are read before a layer's sites: read them in a pass without sites")
    n_layers, rows, first = handle.arch.n_layers, ids.shape[0], len(skip)
    if remote and handle.remote:
        inputs = {**inputs, "remote": handle.remote}
    layer = injection.layer if injection is not None else None
    add = injection.add if injection is not None else None
    weights = injection.weights if injection is not None else None
    direction = ablation.direction if ablation is not None else None
    before = ablation is not None and ablation.at == "before"
    # "before": the injection's own component along the direction, carried by the residual past its layer.
    kept = (add @ direction)[:, None] * direction if before and add is not None else None  # [B, D]
    answer_ids, n_yes = reads.answer_ids, reads.n_yes
    read_lens, read_attention, read_hidden, read_logits = reads.lens, reads.attention, reads.hidden, reads.logits
    read_last = reads.last or reads.lens
    final_needed = answer_ids is not None or read_logits or (within is not None and within.reads_logits)
    context = within.context(handle) if within is not None else torch.no_grad()
    with context, handle.model.trace(ids, **inputs):
        if first == 0 and direction is not None:
            handle.embeddings.output = project_out(handle.embeddings.output, direction)
        if within is not None:
            within.start(handle)
        for i in range(first):  # the same in every row: served from the shared pass
            handle.layers[i].skip(skip[i].expand(rows, -1, -1))
        attention, hidden, last = nnsight.save([]), nnsight.save([]), nnsight.save([])
        for i in range(first, n_layers):
            if read_attention:
                attention.append(handle.attention(i).output[1][:, :, -1, :])
            if within is not None:
                within.layer(handle, i)
            if before:  # the model's own component only: the injection (added next) keeps its component
                handle.layers[i].output = project_out(handle.layers[i].output, direction)
            if i == layer:
                handle.layers[i].output += add[:, None, :] * weights[:, :, None]
            elif kept is not None and i > layer:
                handle.layers[i].output += kept[:, None, :] * weights[:, :, None]
            if direction is not None and not before:  # after the injection: the stream never carries the direction
                handle.layers[i].output = project_out(handle.layers[i].output, direction)
            if read_hidden:
                hidden.append(handle.layers[i].output)
            if read_last:
                last.append(handle.layers[i].output[:, -1, :])
            if i == n_layers - 1 and answer_ids is not None:
                top = handle.layers[i].output[:, -1, :]  # [B, D]: what the final norm reads
        if within is not None:
            within.after_layers(handle)
        if read_lens:
            lens = lens_diff(handle, last, answer_ids, n_yes).save()  # [B, n_layers - first]
        if answer_ids is not None:
            answer = readout_logits(handle, top, answer_ids).save()  # [B, k] float32 whatever the model's dtype
        if final_needed:
            final = handle.model.output.logits[:, -1, :]
            if answer_ids is not None:
                log_partition = final.float().logsumexp(-1).save()  # [B]: normalises the answer logits
            if read_logits:
                logits = final.save()
            if within is not None and within.reads_logits:
                within.logits(handle, final)
    keys = inputs["attention_mask"].shape[1] if "attention_mask" in inputs else ids.shape[1]
    return PassResult(answer_logits=answer.float().cpu() if answer_ids is not None else None,
                      log_partition=log_partition.float().cpu() if answer_ids is not None else None,
                      logits=logits.float().cpu() if read_logits else None,
                      hidden=list(hidden) if read_hidden else None,
                      last=list(last) if reads.last else None,
                      lens=lens.float().cpu() if read_lens else None,
                      attention=_weights_over_keys(attention, keys) if read_attention else None)


def _weights_over_keys(attention: list[torch.Tensor], total: int) -> torch.Tensor:
    """Per-layer attention weights ``[B, n_heads, keys]`` as one ``[B, n_layers, n_heads, total]`` tensor.
    Sliding-window layers keep only the window's keys; they are the last ones, the rest get zero weight."""
    return torch.stack([torch.nn.functional.pad(a.float(), (total - a.shape[-1], 0)) for a in attention], dim=1).cpu()


class PromptRun:
    """One prompt's shared work, done once for every batch of rows over it.

    ``start``: the first position that may differ between rows (the window's start, or the first edited or read
    position). Tokens before it run once, uninjected, with ``ablation`` and the ``prefix`` hooks (an edit every row
    shares, e.g. heads set over the prefix) into a KV cache; every batch runs only the suffix ``[start, T)``.
    :meth:`baseline` is the uninjected pass over the suffix: its layer outputs serve the layer skip.
    """

    def __init__(self, handle: ModelHandle, input_ids: Sequence[int], start: int, *, ablation: Ablation | None = None,
                 prefix: Within | None = None) -> None:
        self.handle, self.start, self.ablation = handle, start, ablation
        self.ids = torch.tensor([list(input_ids)], device=handle.device)
        self.cache: DynamicCache | None = None
        self._baseline: PassResult | None = None
        if start > 0:
            cache = DynamicCache(config=handle.torch_model.config)  # filled in place by the forward
            traced_pass(handle, self.ids[:, :start], {"cache": cache, "use_cache": True, "logits_to_keep": 1},
                        ablation=ablation, within=prefix)
            self.cache = cache

    @property
    def positions(self) -> torch.Tensor:
        """The suffix's absolute token positions ``[T − start]`` (what :meth:`Injection.of` weighs)."""
        return torch.arange(self.start, self.ids.shape[1])

    def inputs(self, rows: int) -> dict:
        """Keyword arguments of a trace over the suffix ``[rows, T − start]``: the attention mask ``[rows, T]``,
        position ids from ``start``, and a private copy of the prefix cache for ``rows`` rows (the forward appends
        the suffix to it in place), or no cache when there is no prefix."""
        total, device = self.ids.shape[1], self.ids.device
        inputs = {"attention_mask": torch.ones(rows, total, dtype=torch.long, device=device),
                  "position_ids": torch.arange(self.start, total, device=device)[None].expand(rows, -1),
                  "use_cache": False, "logits_to_keep": 1}
        if self.cache is not None:
            cache = copy.deepcopy(self.cache)
            if rows > 1:
                cache.batch_repeat_interleave(rows)
            inputs.update(cache=cache, use_cache=True)
        return inputs

    def baseline(self, reads: Reads = Reads(), *, keep_hidden: bool = True, remote: bool = False) -> PassResult:
        """The uninjected pass over the suffix, one row, computed on the first call (later calls return it):
        ``reads`` plus, with ``keep_hidden``, each layer's output ``[1, T − start, D]`` for the layer skip."""
        if self._baseline is None:
            self._baseline = self.forward(1, reads=replace(reads, hidden=keep_hidden), remote=remote)
        return self._baseline

    def forward(self, rows: int, *, injection: Injection | None = None, reads: Reads = Reads(),
                within: Within | None = None, skip: bool = False, remote: bool = False) -> PassResult:
        """``rows`` rows over the suffix (:func:`traced_pass`). ``skip``: layers below the lowest injected or edited
        layer come from :meth:`baseline` (computed first if needed), their per-layer reads too."""
        first = 0
        if skip:
            lowest = [self.handle.arch.n_layers]
            lowest += [injection.layer] if injection is not None else []
            lowest += [within.lowest_layer] if within is not None and within.lowest_layer is not None else []
            first = min(lowest)
        if first and self.baseline(remote=remote).hidden is None:
            raise ValueError("the baseline kept no layer outputs (keep_hidden=False): the layer skip has none to serve")
        below = self._baseline.hidden[:first] if first else ()
        result = traced_pass(self.handle, self.ids[:, self.start:].expand(rows, -1), self.inputs(rows),
                             injection=injection, ablation=self.ablation, reads=reads, within=within, skip=below,
                             remote=remote)
        return result.below(self._baseline, first, rows) if first else result


def padded_pass(handle: ModelHandle, trials: Sequence[Trial], *, ablation: Ablation | None = None,
                reads: Reads = Reads(logits=True)) -> PassResult:
    """``trials`` on different prompts in one pass: left-padded to one width, recomputed whole (the prompts share no
    prefix), each row injected by its trial over its window (never on padding) with ``ablation`` everywhere."""
    ids, mask, positions = left_pad([t.prompt.input_ids for t in trials], handle.tokenizer.pad_token_id)
    injection = Injection.of(handle, trials, positions, valid=mask)
    inputs = {"attention_mask": mask.to(handle.device), "position_ids": positions.to(handle.device)}
    return traced_pass(handle, ids.to(handle.device), inputs, injection=injection, ablation=ablation, reads=reads)
