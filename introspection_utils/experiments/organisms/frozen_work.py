"""The work of an organism's training that the adapters never change, done once and served to every step that needs
it (:class:`FrozenWork`): the shared prefix's base-model keys and values, and each distinct row's pass through the
layers below the adapters. Used by :func:`~introspection_utils.experiments.organisms.forward.train_step` and the
behaviour probe.

Why: the layers below the adapters carry no adapter and no gradient, and what a row feeds them (the prefix and the
row's own tokens: its prompt and its taught answer) repeats — a training asks its few dozen questions with a few
answers thousands of times. Run at every step, that pass is most of a step's forward (19 of Qwen2.5-Coder-1.5B's 28
layers with the findings' layers); served from here it runs once per distinct row in a training
(``docs/benchmark.md``: the training's speed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import peft
import torch
from transformers import DynamicCache

if TYPE_CHECKING:
    from introspection_utils.engine.traced_pass import Injection
    from introspection_utils.experiments.organisms.forward import Batch

Keys = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values [rows, kv_heads, tokens, head_dim]


def add_injection(stream: torch.Tensor, injection: Injection, rows: torch.Tensor | slice = slice(None)
                  ) -> torch.Tensor:
    """``stream [B, S, d_model]`` (``injection``'s ``rows``) with the injection added: each row's ``scale × vector``
    times its per-position weights (:meth:`introspection_utils.engine.traced_pass.Injection.of`, 0 on padding)."""
    return stream + injection.add[rows][:, None, :] * injection.weights[rows][:, :, None]


class _Stop(Exception):
    """Raised by a hook to end a forward once the layer it waits for has run."""


class _Served(torch.nn.Module):
    """A decoder layer's stand-in in the gradient pass: passes the stream through, or (the last one below the
    adapters) returns the output computed without gradients."""

    def __init__(self, output: torch.Tensor | None = None) -> None:
        super().__init__()
        self.output = output

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.output is None else self.output


class serving:  # noqa: N801 — a context manager, named for what the layers do inside it
    """Layers below ``first`` as pass-throughs, the last of them returning ``hidden``; put back on exit."""

    def __init__(self, layers: torch.nn.ModuleList, first: int, hidden: torch.Tensor | None) -> None:
        self.layers, self.first, self.hidden = layers, first, hidden

    def __enter__(self) -> None:
        self.originals = [self.layers[i] for i in range(self.first)]
        for i in range(self.first):
            self.layers[i] = _Served(self.hidden if i == self.first - 1 else None)

    def __exit__(self, *exc) -> None:
        for i, original in enumerate(self.originals):
            self.layers[i] = original


def _model_config(model: torch.nn.Module):
    return model.get_base_model().config if isinstance(model, peft.PeftModel) else model.config


def prefix_cache(model: torch.nn.Module, keys: Keys, rows: int) -> DynamicCache:
    """A fresh cache holding the prefix's keys and values for ``rows`` rows (each pass appends its own suffix)."""
    cache = DynamicCache(config=_model_config(model))
    for layer, (k, v) in zip(cache.layers, keys, strict=True):
        layer.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
    return cache


def _output_of(layers: torch.nn.ModuleList, index: int, *, stop: bool):
    """A hook on ``layers[index]`` that keeps its output (the stream) in the returned dict, ending the forward
    there when ``stop``; and its handle."""
    captured: dict[str, torch.Tensor] = {}

    def capture(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        if stop:
            raise _Stop
    return captured, layers[index].register_forward_hook(capture)


class FrozenWork:
    """What a training computes once with weights the adapters never touch: the shared prefix's base-model keys and
    values at every layer (what the adapters-off pass attends to) with the stream after the last layer below the
    adapters (where each step's adapted prefix pass starts) — :meth:`base`; and each row's stream after that layer
    — :meth:`lower`. Keyed by the tokens and the first adapted layer, so one instance serves a whole training."""

    def __init__(self) -> None:
        self._prefix: dict[tuple, tuple[Keys, torch.Tensor]] = {}
        self._rows: dict[tuple, torch.Tensor] = {}  # the training's rows
        self._apart: dict[tuple, torch.Tensor] = {}  # rows kept apart from them (the behaviour probe's)

    def base(self, model: peft.PeftModel, layers: torch.nn.ModuleList, batch: Batch, first: int
             ) -> tuple[Keys, torch.Tensor]:
        key = (tuple(batch.prefix[0].tolist()), first)
        if key not in self._prefix:
            captured, hook = _output_of(layers, max(first - 1, 0), stop=False)
            cache = DynamicCache(config=_model_config(model))
            try:
                with torch.no_grad(), model.disable_adapter():
                    model(input_ids=batch.prefix, cache=cache, use_cache=True, logits_to_keep=1)
            finally:
                hook.remove()
            self._prefix[key] = ([(layer.keys, layer.values) for layer in cache.layers], captured["h"])
        return self._prefix[key]

    def adapted(self, model: peft.PeftModel, layers: torch.nn.ModuleList, batch: Batch, first: int) -> Keys:
        """The prefix's keys and values with the adapters on: the layers below ``first`` from :meth:`base`, the
        others computed now (with gradients)."""
        keys, hidden = self.base(model, layers, batch, first)
        cache = DynamicCache(config=_model_config(model))
        with serving(layers, first, hidden):
            model(input_ids=batch.prefix, cache=cache, use_cache=True, logits_to_keep=1)
        return keys[:first] + [(layer.keys, layer.values) for layer in cache.layers[first:]]

    def lower(self, model: peft.PeftModel, layers: torch.nn.ModuleList, batch: Batch, first: int, *,
              apart: bool = False) -> torch.Tensor:
        """``batch``'s stream after layer ``first - 1`` ``[B, S, d_model]`` (0 at padding), without gradients, the
        batch's injection added when it sits at that layer (the only layer below the adapters an injection can sit
        at: ``OrganismConfig.first_adapted`` is the lowest injection layer + 1).

        Each row runs alone (its tokens at its own positions after the prefix), so its numbers do not depend on the
        rows beside it, and once per training: a row whose tokens (prompt and taught answer) an earlier row had is
        served from here. ``apart`` (the behaviour probe): the rows are kept apart from the training's, so the
        training's own passes below the adapters stay the ones
        :func:`~introspection_utils.experiments.organisms.flops.training_flops` replays."""
        layer = batch.injection.layer
        if first < 1 or layer < first - 1:
            raise ValueError(f"the layers below the adapters ({first}) must hold at most the injection's layer "
                             f"({layer}) as their last")
        shared = batch.prefix.shape[1]
        prefix = tuple(batch.prefix[0].tolist())
        keys = self.base(model, layers, batch, first)[0] if shared else None
        kept = self._apart if apart else self._rows
        rows = []
        for tokens in batch.suffix_ids():
            key = (prefix, tokens, first)
            if key not in kept:  # a row repeated in the batch runs once
                kept[key] = self._run(model, layers, tokens, keys, shared, first, batch.ids.device)
            rows.append(kept[key])
        width = batch.ids.shape[1]
        hidden = rows[0].new_zeros(len(rows), width, rows[0].shape[-1])
        for r, stream in enumerate(rows):
            hidden[r, width - len(stream):] = stream
        return add_injection(hidden, batch.injection) if layer == first - 1 else hidden

    @staticmethod
    def _run(model: peft.PeftModel, layers: torch.nn.ModuleList, tokens: tuple[int, ...], keys: Keys | None,
             shared: int, first: int, device: torch.device) -> torch.Tensor:
        """One row's stream ``[L, d_model]`` after layer ``first - 1``: its ``tokens`` (L of them) at the positions
        after the prefix, attending to the prefix's base keys and values (``keys``, ``shared`` tokens), the forward
        ended there."""
        captured, hook = _output_of(layers, first - 1, stop=True)
        cache = {"cache": prefix_cache(model, keys, 1), "use_cache": True} if keys is not None else \
            {"use_cache": False}
        ids = torch.tensor([tokens], device=device)
        positions = torch.arange(shared, shared + len(tokens), device=device)[None]
        mask = torch.ones(1, shared + len(tokens), dtype=torch.long, device=device)
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache)
        except _Stop:
            pass
        finally:
            hook.remove()
        return captured["h"][0]
