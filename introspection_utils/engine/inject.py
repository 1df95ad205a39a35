"""The measurement engine: trials of (prompt, vector, scale, layer, window) → yes−no logit differences, the logit
lens, attention to the injected positions, residuals (generation under injection is :mod:`generation`).

Injection adds ``scale × vector`` to the residual stream (decoder-layer ``layer``'s output) at the window's
positions. Two levers make a batch of trials on one prompt cheap, both exact:

* **prefix cache**: tokens before the window are the same in every trial and untouched by the injection, so
  they run once (KV cache) and each trial runs only the suffix;
* **layer skip**: the suffix's hidden states below the injection layer are the same in every trial too, so they
  are computed once and layers ``< layer`` are skipped (``Envoy.skip``) in the batched trace.

``strategy="full"`` recomputes the whole prompt per batch instead (the reference the levers are tested against,
and the only form that runs on NDIF).

Shapes: a tensor in a public signature is annotated with its shape (``PerTrialLayerHead`` is a tensor
``[n_trials, n_layers, n_heads]``; see the aliases below), and docstrings write shapes in brackets after the name.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

import nnsight
import torch
from tqdm.auto import tqdm

from introspection_utils.engine.prompts import Prompt, answer_set, yes_no_ids
from introspection_utils.engine.vectors import ConceptVector
from introspection_utils.models.memory import choose_batch_size

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

# "suffix": from the prompt's injection start to the end, generated tokens included (the paper's window);
# "last": the last prompt token only; "all": every token; (start, end): positions start <= t < end (end None = on);
# ((start, end, weight), ...): weighted spans, scale × weight × vector added over each span (e.g. two sentences
# injected at two strengths in one prompt).
Window = Literal["suffix", "last", "all"] | tuple[int, int | None] | tuple[tuple[int, int, float], ...]
Strategy = Literal["cached", "full"]
# Where a directional ablation sits relative to the injection (see :func:`measure`).
AblateAt = Literal["after", "before"]
DEFAULT_BATCH = 32

# Tensor shapes in signatures (``typing.get_type_hints(f, include_extras=True)`` shows them; so do IDE hovers).
PerTrial = Annotated[torch.Tensor, "[n_trials]"]
PerTrialLayer = Annotated[torch.Tensor, "[n_trials, n_layers]"]
PerTrialLayerHead = Annotated[torch.Tensor, "[n_trials, n_layers, n_heads]"]
PerTrialToken = Annotated[torch.Tensor, "[n_trials, k]"]  # k answer tokens read
PerTrialResidual = Annotated[torch.Tensor, "[n_trials, len(layers), d_model]"]
Direction = Annotated[torch.Tensor, "[d_model]"]


@dataclass(frozen=True)
class Trial:
    """One measurement: ``prompt`` with ``scale × vector`` added at ``layer`` over ``window``.

    ``vector=None`` or ``scale=0`` is the no-injection baseline. ``layer=None`` takes the vector's own layer.
    ``vector`` may also be your own ``[d_model]`` tensor, with ``layer`` given: it is wrapped in a
    :class:`ConceptVector` of kind ``"user"`` (``Trial(prompt, my_tensor, 4.0, layer=20)``).
    """

    prompt: Prompt
    vector: ConceptVector | torch.Tensor | None = None
    scale: float = 0.0
    layer: int | None = None
    window: Window = "suffix"

    def __post_init__(self) -> None:
        if isinstance(self.vector, torch.Tensor):
            if self.layer is None:
                raise TypeError(f"Trial got a raw tensor of shape {tuple(self.vector.shape)} without a layer: pass "
                                f"layer=L (Trial(prompt, tensor, scale, layer=L)), or wrap it yourself as "
                                f"ConceptVector('name', L, tensor, kind='user')")
            wrapped = ConceptVector("user", self.layer if isinstance(self.layer, int) else -1,
                                    self.vector.detach(), kind="user")
            object.__setattr__(self, "vector", wrapped)
        elif self.vector is not None and not isinstance(self.vector, ConceptVector):
            raise TypeError(f"Trial's vector must be a ConceptVector (concept_vectors(...).get(word, layer)), a "
                            f"[d_model] torch.Tensor with layer=L, or None; got {type(self.vector).__name__}")

    @property
    def injection_layer(self) -> int | None:
        if self.layer is not None:
            return self.layer
        return self.vector.layer if self.vector is not None else None

    @property
    def injected(self) -> bool:
        return self.vector is not None and self.scale != 0

    def span(self) -> tuple[int, int | None]:
        """The window as ``(start, end)`` token positions; ``end=None`` runs on through generated tokens (weighted
        spans: from the first span's start to the last one's end)."""
        n = len(self.prompt)
        if _weighted(self.window):
            return min(s for s, _, _ in self.window), max(e for _, e, _ in self.window)
        if self.window == "suffix":
            return self.prompt.injection_start, None
        if self.window == "last":
            return n - 1, n
        if self.window == "all":
            return 0, None
        start, end = self.window
        return start, end

    def weights(self) -> torch.Tensor:
        """``[len(prompt)]`` float32: the multiple of ``scale × vector`` added at each prompt position (1 inside
        the window, 0 outside; each span's weight for weighted spans)."""
        out = torch.zeros(len(self.prompt))
        if _weighted(self.window):
            for start, end, weight in self.window:
                out[start:end] += float(weight)
        else:
            start, end = self.span()
            out[start:end] = 1.0
        return out


def _weighted(window) -> bool:
    return isinstance(window, tuple) and len(window) > 0 and all(isinstance(w, tuple) for w in window)


def trial_grid(vectors: Sequence[ConceptVector], prompts: Sequence[Prompt], scales: Sequence[float]) -> list[Trial]:
    """Every vector × prompt × scale, in that order, injected at each vector's own layer over the suffix: the
    trials of a sweep (``len(vectors) * len(prompts) * len(scales)`` of them)."""
    return [Trial(prompt, vector, float(scale)) for vector in vectors for prompt in prompts for scale in scales]


def check_trials(handle: ModelHandle, trials: Sequence[Trial], *, weighted: bool = False) -> None:
    """Validate ``trials`` before any compute: one ``ValueError`` naming the first bad value. ``weighted``: the
    caller reads weighted-span windows (the batched engine does; readouts that inject one contiguous window —
    generation, patching, attribution — refuse them)."""
    if not trials:
        raise ValueError("no trials given")
    for trial in trials:
        scale = trial.scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale {scale!r} must be a finite number")
        if trial.vector is not None:
            v = trial.vector.vector
            if v.ndim != 1 or v.shape[0] != handle.arch.d_model:
                raise ValueError(f"vector {trial.vector!r} has shape {tuple(v.shape)}; {handle.name} needs "
                                 f"[{handle.arch.d_model}]")
            if not torch.isfinite(v).all():
                raise ValueError(f"vector {trial.vector!r} has non-finite values")
            handle.check_layer(trial.injection_layer)
        elif trial.layer is not None:
            handle.check_layer(trial.layer)
        window = trial.window
        if _weighted(window):
            if not weighted:
                raise ValueError(f"window {window!r}: weighted spans are read by inject.measure, answer_logits and "
                                 f"residuals only; this readout injects one contiguous window")
            n = len(trial.prompt)
            for piece in window:
                if not (len(piece) == 3 and _is_index(piece[0]) and _is_index(piece[1]) and 0 <= piece[0] < piece[1]
                        <= n and isinstance(piece[2], (int, float)) and not isinstance(piece[2], bool)
                        and math.isfinite(piece[2])):
                    raise ValueError(f"weighted span {piece!r} must be (start, end, weight) with 0 <= start < end "
                                     f"<= {n} token positions and a finite weight")
            continue
        if not (window in ("suffix", "last", "all") or (
                isinstance(window, tuple) and len(window) == 2 and _is_index(window[0])
                and (window[1] is None or _is_index(window[1])))):
            raise ValueError(f"window {window!r} must be 'suffix', 'last', 'all', a (start, end) tuple of "
                             f"token positions (end None = on through generated tokens) or weighted spans "
                             f"((start, end, weight), ...)")
        start, end = trial.span()
        n = len(trial.prompt)
        if not (0 <= start < n and (end is None or start < end <= n)):
            raise ValueError(f"window {trial.window!r} is outside the prompt (0..{n}) or empty")


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


@dataclass
class _Pass:
    """What one traced forward of ``B`` rows read (CPU, float32, except ``hidden``).

    ``logit_diff [B]``, ``logits [B, k]``, ``answer_mass [B]``; ``hidden``: each layer's output over the suffix
    ``[B, S, D]`` (kept on the device, only for the uninjected pass the layer skip serves from); ``last``: each
    layer's output at the last position ``[B, D]``; ``lens [B, n_layers]``; ``attention [B, n_layers, n_heads, T]``
    (the last query's weights over all ``T`` key positions).
    """

    logit_diff: torch.Tensor
    logits: torch.Tensor
    answer_mass: torch.Tensor
    hidden: list[torch.Tensor]
    last: list[torch.Tensor] | None = None
    lens: torch.Tensor | None = None
    attention: torch.Tensor | None = None

    def expand(self, batch: int) -> _Pass:
        """This one-row pass as ``batch`` identical rows (an uninjected trial measures what the shared pass did)."""
        return _Pass(self.logit_diff.expand(batch), self.logits.expand(batch, -1), self.answer_mass.expand(batch),
                     self.hidden,
                     [r.expand(batch, -1) for r in self.last] if self.last is not None else None,
                     self.lens.expand(batch, -1) if self.lens is not None else None,
                     self.attention.expand(batch, -1, -1, -1) if self.attention is not None else None)

    def below(self, skipped: _Pass, first: int) -> _Pass:
        """This pass with layers ``< first`` (skipped: identical in every trial) read from the uninjected pass."""
        below = skipped.expand(len(self.logit_diff))
        if self.last is not None:
            self.last = [*below.last[:first], *self.last]
        if self.lens is not None:
            self.lens = torch.cat([below.lens[:, :first], self.lens], dim=1)
        if self.attention is not None:
            self.attention = torch.cat([below.attention[:, :first], self.attention], dim=1)
        return self


class _PromptRun:
    """Everything shared by the trials of one prompt and window start: computed once per call.

    ``cache``: KV cache of the tokens before the window; ``baseline``: the uninjected pass over the suffix (its
    ``hidden[i]``, layer i's output ``[1, S, D]``, serves the layer skip; its readouts are the baselines).
    """

    def __init__(self, handle: ModelHandle, prompt: Prompt, start: int, answer_ids: torch.Tensor,
                 *, n_yes: int | None, attention_keys: torch.Tensor | None, strategy: Strategy,
                 ablate: torch.Tensor | None,
                 lens: bool, read_residuals: bool, ablate_at: AblateAt = "after") -> None:
        self.handle, self.prompt, self.start, self.ablate, self.ablate_at = handle, prompt, start, ablate, ablate_at
        ids = torch.tensor([prompt.input_ids], device=handle.device)
        self.full_ids = ids
        if strategy == "full":
            self.start = start = 0  # recompute every position, no cache
        self.suffix = ids[:, start:]
        self.cache = handle.prefix_cache(ids[:, :start], lambda: _ablate(handle, ablate)) if start > 0 else None
        self.baseline = _trace(handle, self, batch=1, layer=None, add=None, mask=None, answer_ids=answer_ids,
                               n_yes=n_yes, lens=lens, read_residuals=read_residuals, attention_keys=attention_keys,
                               keep_hidden=strategy == "cached")


def _project_out(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``x [..., D]`` without its component along the unit ``direction [D]``."""
    return x - (x @ direction)[..., None] * direction


def _ablate(handle: ModelHandle, direction: torch.Tensor | None) -> None:
    """Inside a trace: project ``direction`` (unit ``[D]``) out of the embeddings and every layer's output."""
    if direction is None:
        return
    handle.embeddings.output = _project_out(handle.embeddings.output, direction)
    for layer in handle.layers:
        layer.output = _project_out(layer.output, direction)


def yes_minus_no(logits: torch.Tensor, n_yes: int) -> torch.Tensor:
    """The readout of an answer: ``logsumexp`` over the yes set minus ``logsumexp`` over the no set.

    ``logits [..., k]``: the logits of :attr:`prompts.AnswerSet.ids` (the first ``n_yes`` the yes set, the rest the
    no set) → ``[...]``. With one token per set it is logit(yes) − logit(no). Pure tensor code (runs in a trace).
    """
    return logits[..., :n_yes].logsumexp(-1) - logits[..., n_yes:].logsumexp(-1)


def _answer_readout(logits: torch.Tensor, log_partition: torch.Tensor, n_yes: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(yes − no [B], answer mass [B])`` from the answer tokens' final logits ``[B, k]`` and the full softmax's
    log-partition ``[B]`` (float32, CPU). The mass is the probability of every token of both sets; ``n_yes=None``
    (tokens that are not a yes/no pair, e.g. digits): the difference is NaN and the mass covers all ``k``."""
    logits, log_partition = logits.float().cpu(), log_partition.float().cpu()
    mass = (logits - log_partition[:, None]).exp().sum(-1)
    if n_yes is None:
        return torch.full_like(logits[:, 0], float("nan")), mass
    return yes_minus_no(logits, n_yes), mass


def readout_logits(handle: ModelHandle, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Inside a trace (or on plain tensors): the logits of the unembedding rows ``rows [k]`` for residuals
    ``hidden [..., D]`` (decoder-layer outputs, before the final norm) → ``[..., k]``, always float32.

    The float32 readout boundary, the one place the choice is made: a bfloat16 model computes its residual stream
    in bfloat16, and the numerically delicate last steps — the final norm, the answer rows of the unembedding and
    Gemma-2's softcap — are computed here in float32 from those bf16 activations (the norm module promotes a
    float32 input to a float32 output; the ``k`` rows are upcast, never the whole unembedding). For a float32 model
    this is the model's own final step (equal to its logits up to float32 summation order). The log-partition of
    the answer mass is the float32 ``logsumexp`` of the model's own full-vocabulary logits (one bf16 rounding per
    logit in a bf16 model: ≤ 2⁻⁹ relative); the agreement with float32 is tested in ``tests/test_bfloat16.py``.
    """
    logits = handle.final_norm(hidden.float()) @ handle.lm_head.weight[rows].float().T
    cap = handle.arch.final_logit_softcap
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits


def _lens_diff(handle: ModelHandle, last: list[torch.Tensor], answer_ids: torch.Tensor, n_yes: int) -> torch.Tensor:
    """Inside a trace: the yes−no logit lens ``[B, len(last)]`` of the last-position residuals ``last`` (each
    ``[B, D]``) through :func:`readout_logits` (final norm, the answer sets' rows, the softcap; float32), then
    :func:`yes_minus_no`."""
    return yes_minus_no(readout_logits(handle, torch.stack(last, dim=1), answer_ids), n_yes)


def _trace(handle: ModelHandle, run: _PromptRun, *, batch: int, layer: int | None, add: torch.Tensor | None,
           mask: torch.Tensor | None, answer_ids: torch.Tensor, n_yes: int | None, lens: bool,
           attention_keys: torch.Tensor | None, read_residuals: bool = False, keep_hidden: bool = False,
           skip: bool = False) -> _Pass:
    """One traced forward of ``run``'s suffix for ``batch`` rows, injecting ``add [B, D] × mask [B, S]`` at ``layer``.

    Reads, in forward order: attention weights of the last query (if ``attention_keys``), the layer outputs at the
    last position (if ``read_residuals`` or ``lens``), the yes−no logit lens (if ``lens``) and the final logits of
    the answer tokens (``answer_ids [k]``: the first ``n_yes`` the yes set, the rest the no set; see
    :func:`_answer_readout`). ``skip``: layers
    below ``layer`` are served from ``run.baseline`` (identical in every trial) instead of being computed.
    """
    n_layers, total = handle.arch.n_layers, run.full_ids.shape[1]
    suffix = run.suffix.expand(batch, -1)
    kwargs = handle.suffix_inputs(run.cache, run.start, total, batch, suffix.device)
    if handle.remote:
        kwargs["remote"] = handle.remote
    first = layer if (skip and layer is not None) else 0
    ablate = run.ablate
    before = ablate is not None and run.ablate_at == "before"
    # "before": the injection's own component along the direction, carried by the residual past its layer.
    kept = (add @ ablate)[:, None] * ablate if before and layer is not None else None  # [B, D]
    with torch.no_grad(), handle.model.trace(suffix, logits_to_keep=1, **kwargs):
        if first == 0 and ablate is not None:
            handle.embeddings.output = _project_out(handle.embeddings.output, ablate)
        for i in range(first):  # identical in every trial: served from the uninjected pass
            handle.layers[i].skip(run.baseline.hidden[i].expand(batch, -1, -1))
        attention, hidden, last = nnsight.save([]), nnsight.save([]), nnsight.save([])
        for i in range(first, n_layers):
            if attention_keys is not None:
                attention.append(handle.attention(i).output[1][:, :, -1, :])
            if before:  # the model's own component only: the injection (added next) keeps its component
                handle.layers[i].output = _project_out(handle.layers[i].output, ablate)
            if i == layer:
                handle.layers[i].output += add[:, None, :] * mask[:, :, None]
            elif kept is not None and i > layer:
                handle.layers[i].output += kept[:, None, :] * mask[:, :, None]
            if ablate is not None and not before:  # after the injection: the stream never carries the direction
                handle.layers[i].output = _project_out(handle.layers[i].output, ablate)
            if keep_hidden:
                hidden.append(handle.layers[i].output)
            if lens or read_residuals:
                last.append(handle.layers[i].output[:, -1, :])
            if i == n_layers - 1:
                top = handle.layers[i].output[:, -1, :]  # [B, D]: what the final norm reads
        if lens:
            lens_diff = _lens_diff(handle, last, answer_ids, n_yes).save()  # [B, n_layers - first]
        logits = readout_logits(handle, top, answer_ids).save()  # [B, k] float32 whatever the model's dtype
        final = handle.model.output.logits[:, -1, :]
        log_partition = final.float().logsumexp(-1).save()  # [B]: normalises the answer logits to probabilities
    diff, mass = _answer_readout(logits, log_partition, n_yes)
    out = _Pass(logit_diff=diff, logits=logits.float().cpu(), answer_mass=mass, hidden=list(hidden),
                last=list(last) if read_residuals else None,
                lens=lens_diff.float().cpu() if lens else None,
                attention=_weights_over_keys(attention, total) if attention_keys is not None else None)
    return out.below(run.baseline, first) if first else out


def _weights_over_keys(attention: list[torch.Tensor], total: int) -> torch.Tensor:
    """Per-layer attention weights ``[B, n_heads, keys]`` as one ``[B, n_layers, n_heads, total]`` tensor.
    Sliding-window layers keep only the window's keys; they are the last ones, the rest get zero weight."""
    return torch.stack([torch.nn.functional.pad(a.float(), (total - a.shape[-1], 0)) for a in attention], dim=1).cpu()


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
    if ablate is not None:
        ablate = torch.as_tensor(ablate).float()
        if ablate.shape != (handle.arch.d_model,) or not torch.isfinite(ablate).all() or ablate.norm() == 0:
            raise ValueError(f"ablate must be a finite non-zero [{handle.arch.d_model}] direction, got shape "
                             f"{tuple(ablate.shape)}")
        ablate = (ablate / ablate.norm()).to(handle.device, handle.dtype)
    sets = answer_set(handle, answers)
    return _run(handle, trials, torch.tensor(sets.ids, device=handle.device), n_yes=len(sets.yes), lens=lens,
                attention=attention, strategy=strategy, batch_size=batch_size, progress=progress, ablate=ablate,
                ablate_at=ablate_at)


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
         attention: bool,
         strategy: Strategy, batch_size: int | None, progress: bool,
         residual_layers: Sequence[int] | None = None, ablate: torch.Tensor | None = None,
         ablate_at: AblateAt = "after") -> Readout:
    """The batched engine behind :func:`measure`, :func:`answer_logits` and :func:`residuals` (trials already
    validated). ``answer_ids [k]``: the tokens read, the first ``n_yes`` the yes set (``None``: no yes/no pair)."""
    read_residuals = residual_layers is not None  # the last position's layer outputs leave the trace
    batch_size = batch_size or _auto_batch_size(handle, trials)
    if handle.remote:
        strategy = "full"  # NDIF runs traces, not local caches: recompute the whole prompt per batch
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
        run = _PromptRun(handle, prompt, start, answer_ids, n_yes=n_yes, attention_keys=keys if attention else None,
                         strategy=strategy, ablate=ablate, lens=lens, read_residuals=read_residuals,
                         ablate_at=ablate_at)
        base = run.baseline
        by_layer: dict[int | None, list[int]] = defaultdict(list)
        for index in indices:
            by_layer[trials[index].injection_layer if trials[index].injected else None].append(index)
        for layer, members in by_layer.items():
            for chunk_start in range(0, len(members), batch_size):
                chunk = members[chunk_start:chunk_start + batch_size]
                if layer is None:  # no injection: the shared pass already measured it
                    out = base.expand(len(chunk))
                else:
                    add = torch.stack([trials[i].scale * trials[i].vector.vector for i in chunk])
                    mask = torch.stack([trials[i].weights()[run.start:] for i in chunk])  # [B, S]
                    out = _trace(handle, run, batch=len(chunk), layer=layer,
                                 add=add.to(handle.device, handle.dtype), mask=mask.to(handle.device, handle.dtype),
                                 answer_ids=answer_ids, n_yes=n_yes, lens=lens, read_residuals=read_residuals,
                                 attention_keys=keys if attention else None,
                                 skip=strategy == "cached" and not attention)
                at = torch.tensor(chunk)  # the chunk's rows in the readout
                logit_diff[at] = out.logit_diff
                logits_out[at] = out.logits
                baseline[at] = base.logit_diff.expand(len(chunk))
                mass[at] = out.answer_mass
                baseline_mass[at] = base.answer_mass.expand(len(chunk))
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
