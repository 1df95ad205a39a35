"""Answers planted into a real model's forward pass by hooks: each row's yes − no set exactly by a rule of which prompt
it is, which of the given vectors it was injected with and at what scale — how a power computed on a sweep's numbers
(:mod:`introspection_utils.stats.plasmode`) is checked through the model itself (:func:`planted_answers`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from introspection_utils.engine.measure import residuals
from introspection_utils.engine.prompts import answer_set
from introspection_utils.engine.readout import yes_minus_no
from introspection_utils.engine.trials import Trial

if TYPE_CHECKING:
    from introspection_utils.engine.prompts import Prompt
    from introspection_utils.engine.vectors import ConceptVector
    from introspection_utils.models.handle import ModelHandle

UNINJECTED = 1e-4  # a row whose residual differs from its prompt's by less than this (relative) carries no injection
MATCH = 1e-3  # a row carries vector v when its difference is v's multiple to within this (relative)


@dataclass(frozen=True)
class HookedRow:
    """What the hooks know of one row at the answer position: ``prompt`` (its index in the prompts given; None: none
    of them), ``vector`` (the index of the given vector whose injection it carries; None: uninjected, or injected
    with another vector), ``scale`` (that vector's multiple; 0 without one) and ``answer`` (the row's yes − no over
    the answer sets, logits, before the plant)."""

    prompt: int | None
    vector: int | None
    scale: float
    answer: float


Rule = Callable[[HookedRow], float]  # a row → its planted yes − no


def answer_direction(handle: ModelHandle, answer_ids: Sequence[int], n_yes: int) -> torch.Tensor:
    """``u [D]`` (float64): the least-norm vector with W_r·u = +1/2 for each yes row r of the unembedding and −1/2 for
    each no row (the first ``n_yes`` of ``answer_ids`` are the yes set). Added t times to the final norm's output it
    moves every yes logit up and every no logit down by t/2, so yes − no (``logsumexp`` over each set) by exactly t;
    the other tokens' logits move by whatever their rows give (the answer mass is not held)."""
    rows = handle.lm_head.weight[list(answer_ids)].detach().double().cpu()  # [k, D]
    target = torch.full((len(answer_ids), 1), -0.5, dtype=torch.float64)
    target[:n_yes] = 0.5
    u = torch.linalg.lstsq(rows, target, driver="gelsd").solution[:, 0]
    if not torch.allclose(rows @ u, target[:, 0], atol=1e-9):
        raise ValueError(f"{handle.name}'s answer rows are not linearly independent: no exact yes − no direction")
    return u


def _match(seen: tuple[int, ...], prompts: Sequence[tuple[int, ...]]) -> int | None:
    """The prompt a row's token ids belong to: a suffix of it (a pass after the prefix cache), or it a suffix of the
    row (a left-padded pass over whole prompts); None when none (e.g. the prefix pass). Two matches is an error."""
    hits = [i for i, ids in enumerate(prompts)
            if (len(seen) <= len(ids) and ids[len(ids) - len(seen):] == seen)
            or (len(seen) > len(ids) and seen[len(seen) - len(ids):] == ids)]
    if len(hits) > 1:
        raise ValueError(f"the pass's tokens fit prompts {hits} alike: give prompts whose suffixes differ")
    return hits[0] if hits else None


@contextmanager
def planted_answers(handle: ModelHandle, layer: int, prompts: Sequence[Prompt], vectors: Sequence[ConceptVector],
                    rule: Rule, *, answers: tuple | None = None) -> Iterator[None]:
    """While open, every forward pass of ``handle`` sets each row's yes − no at the last position to ``rule(row)``
    (:class:`HookedRow`), exactly (to float rounding): an effect planted into the real model, read back by
    :func:`measure.measure` like any other.

    Three hooks on the plain PyTorch modules: the embeddings' input names each row's prompt (among ``prompts``); the
    residual entering layer ``layer + 1`` at the last position, minus the prompt's own uninjected residual there
    (measured once on entry), names the injected vector (one of ``vectors`` at ``layer``, the injection layer of the
    trials) and its scale; the final norm's output at the last position then gets (rule(row) − yes − no) ×
    :func:`answer_direction` — the readout's own call of the norm and the model's (the answer mass) alike. A window
    that does not reach the last position reads as uninjected. ``answers``: the answer sets read (as
    :func:`measure.measure`'s). Refused for a model with a final logit softcap (the shift would not be exact), at
    the last layer (no layer reads its output before the final norm) and below float32. Rows of no given prompt are
    left alone."""
    layer = handle.check_layer(layer)
    if handle.dtype not in (torch.float32, torch.float64):
        # its rounding (2^-8 of the residual in bfloat16) exceeds MATCH: no row would be named, nothing planted
        raise ValueError(f"{handle.name} runs in {handle.dtype}: the hooks name each row's vector and plant its "
                         f"answer to float32 rounding; load the model with dtype='float32'")
    if handle.arch.final_logit_softcap:
        raise ValueError(f"{handle.name} caps its logits: a planted shift before the cap is not exact")
    if layer >= handle.arch.n_layers - 1:
        raise ValueError(f"the plant reads the injection entering layer {layer + 1}; {handle.name} has layers "
                         f"0..{handle.arch.n_layers - 1}: inject below the last")
    sets = answer_set(handle, answers)
    ids = torch.tensor(sets.ids)
    n_yes = len(sets.yes)
    u = answer_direction(handle, sets.ids, n_yes)
    reference = residuals(handle, [Trial(p) for p in prompts], [layer])[:, 0].double()  # [P, D]
    units = torch.stack([torch.as_tensor(v.vector).double().cpu() for v in vectors]) if vectors else None  # [V, D]
    prompt_ids = [tuple(p.input_ids) for p in prompts]
    state: dict[str, list] = {"prompt": [], "rows": []}

    def name_prompts(module, args, kwargs):
        tokens = args[0] if args else kwargs["input"]
        state["prompt"] = [_match(tuple(row.tolist()), prompt_ids) for row in tokens]
        state["rows"] = []

    def name_vectors(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"])[:, -1, :].detach().double().cpu()  # [B, D]
        rows = []
        for b, which in enumerate(state["prompt"]):
            vector, scale = None, 0.0
            if which is not None and units is not None:
                diff = hidden[b] - reference[which]
                size = float(diff.norm())
                if size > UNINJECTED * float(reference[which].norm()):
                    scales = units @ diff / (units * units).sum(1)  # [V]: each vector's best multiple
                    misses = (diff[None] - scales[:, None] * units).norm(dim=1) / size
                    best = int(misses.argmin())
                    if float(misses[best]) <= MATCH:
                        vector, scale = best, float(scales[best])
            rows.append((which, vector, scale))
        state["rows"] = rows

    def plant(module, args, output):
        rows = state["rows"]
        if not rows or output.shape[0] != len(rows):
            return None
        last = output if output.ndim == 2 else output[:, -1, :]  # the readout's [B, D] or the model's [B, T, D]
        before = yes_minus_no(last.detach().float() @ handle.lm_head.weight[ids].detach().float().T, n_yes)
        shift = torch.tensor([0.0 if which is None else rule(HookedRow(which, vector, scale, float(y))) - float(y)
                              for (which, vector, scale), y in zip(rows, before.cpu(), strict=True)])
        moved = output.clone()
        push = (shift.double()[:, None] * u[None]).to(output.device, output.dtype)
        if output.ndim == 2:
            moved += push
        else:
            moved[:, -1, :] += push
        return moved

    torch_layers = handle.layers
    hooks = [handle.embeddings._module.register_forward_pre_hook(name_prompts, with_kwargs=True),
             torch_layers[layer + 1]._module.register_forward_pre_hook(name_vectors, with_kwargs=True),
             handle.final_norm._module.register_forward_hook(plant)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
