"""Trials and the window rule (:meth:`Trial.weights_at`): what one measurement injects, where, and how strongly at
each position; every injecting pass builds its weights from it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from introspection_utils.engine.prompts import Prompt
from introspection_utils.engine.vectors import ConceptVector

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

# "suffix": from the prompt's injection start to the end, generated tokens included (the paper's window);
# "last": the last prompt token only; "all": every token; (start, end): positions start <= t < end (end None = on);
# ((start, end, weight), ...): weighted spans, scale × weight × vector added over each span (e.g. two sentences
# injected at two strengths in one prompt).
Window = Literal["suffix", "last", "all"] | tuple[int, int | None] | tuple[tuple[int, int, float], ...]


@dataclass(frozen=True)
class Trial:
    """One measurement: ``prompt`` with ``scale × vector`` added at ``layer`` over ``window``.

    ``vector=None`` or ``scale=0`` is the no-injection baseline; a negative ``scale`` is accepted on purpose and
    injects the vector's opposite (−|scale|·vector, steering away from the concept). ``layer=None`` takes the vector's
    own layer.
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
        return self.weights_at(torch.arange(len(self.prompt)))

    def weights_at(self, positions: torch.Tensor) -> torch.Tensor:
        """The window rule: the multiple of ``scale × vector`` added at the absolute token ``positions`` (an integer
        tensor of any shape, e.g. ``[T]`` or one generation step's ``[1]``) → float32 of the same shape.

        1 inside the window and 0 outside it (a weighted window: the sum of the weights of the spans holding the
        position). Positions at or past ``len(prompt)`` are generated tokens: inside the window only when it runs
        on (``end`` None: ``"suffix"``, ``"all"``, ``(start, None)``). Padding is the caller's to mask.
        """
        spans = self.window if _weighted(self.window) else ((*self.span(), 1.0),)
        out = torch.zeros(positions.shape)
        for start, end, weight in spans:
            inside = positions >= start
            if end is not None:
                inside &= positions < end
            out += inside.float() * float(weight)
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
                raise ValueError(f"window {window!r}: weighted spans are read by measure.measure, answer_logits and "
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
