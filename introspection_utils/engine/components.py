"""The model's components as places to read, patch and ablate: one traced forward that injects, edits component
outputs at chosen rows and positions, and reads them back (with gradients of the yes−no difference if asked).

A *component* is something that adds to the residual stream: the token embedding, the injected vector, each
layer's attention output and MLP output (what is added before the residual add — Gemma-2/3's post-attention and
post-feedforward norms included) and each attention head, whose output is its slice of the output projection's
input (``z [B, T, n_heads × head_dim]``, head ``h`` in columns ``h × head_dim …``). :mod:`attribution`,
:mod:`patching` build on :func:`forward`; the measurement engine (:mod:`inject`) stays the reference for plain
trials and is what the unedited rows here are tested against.

**Prefix cache and layer skip**, both exact, as in the engine. Tokens before ``start`` (the injection window's
start, and no later than any edited or read position) are the same in every row and untouched by the injection and
the edits, so :class:`PromptPass` runs them once (KV cache) and every batch runs only the suffix. With ``skip``, the
suffix's layers below the lowest injected or edited layer are the same in every row too: they are computed once
(uninjected) and skipped (``Envoy.skip``) in the batched trace.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import nnsight
import torch

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

Kind = Literal["attn", "mlp", "head"]


@dataclass(frozen=True, order=True)
class Site:
    """One component output that can be patched or ablated: ``kind`` "attn" / "mlp" (layer ``layer``'s attention or
    MLP output) or "head" (head ``head`` of layer ``layer``)."""

    layer: int
    kind: Kind
    head: int | None = None

    @property
    def label(self) -> str:
        return f"L{self.layer}H{self.head}" if self.kind == "head" else f"L{self.layer} {self.kind}"


def check_heads(handle: ModelHandle, heads: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``heads`` as a list of ``(layer, head)`` pairs of ``handle``, or one ``ValueError`` naming the first that
    does not exist (e.g. Gemma-2-9B's ``(34, 10)`` on the 30-layer SmolLM2)."""
    heads = [tuple(h) for h in heads] if heads is not None else []
    if not heads:
        raise ValueError("no heads given: pass (layer, head) pairs, e.g. heads=[(34, 10), (39, 5)]")
    a = handle.arch
    for pair in heads:
        ok = (len(pair) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
              and 0 <= pair[0] < a.n_layers and 0 <= pair[1] < a.n_heads)
        if not ok:
            raise ValueError(f"head {pair!r} does not exist in {handle.name}: heads are (layer, head) with layer in "
                             f"0..{a.n_layers - 1} and head in 0..{a.n_heads - 1}")
    if len(set(heads)) != len(heads):
        raise ValueError(f"heads {heads} name a head twice")
    return heads


def all_sites(handle: ModelHandle, layers: Sequence[int] | None = None, *, heads: bool = True) -> list[Site]:
    """Every attention and MLP output (and every head if ``heads``) of ``layers`` (default all), in layer order."""
    layers = range(handle.arch.n_layers) if layers is None else [handle.check_layer(i) for i in layers]
    sites = []
    for i in layers:
        sites += [Site(i, "attn"), Site(i, "mlp")]
        if heads:
            sites += [Site(i, "head", h) for h in range(handle.arch.n_heads)]
    return sites


def check_sites(handle: ModelHandle, sites: Sequence[Site]) -> list[Site]:
    """``sites`` checked against ``handle`` (kind, layer, head in range); one ``ValueError`` for the first bad one."""
    sites = list(sites)
    if not sites:
        raise ValueError("no sites given")
    for site in sites:
        if not isinstance(site, Site) or site.kind not in ("attn", "mlp", "head"):
            raise ValueError(f"{site!r} is not a Site('attn' | 'mlp' | 'head')")
        handle.check_layer(site.layer)
        if site.kind == "head":
            check_heads(handle, [(site.layer, site.head)])
        elif site.head is not None:
            raise ValueError(f"{site!r}: only a 'head' site names a head")
    return sites


@dataclass(frozen=True)
class Edit:
    """Replace ``site``'s output in rows ``rows [R]`` at absolute positions ``positions [P]`` by ``values
    [R, P, width]`` (width ``d_model``, or ``head_dim`` for a head)."""

    site: Site
    rows: torch.Tensor
    positions: torch.Tensor
    values: torch.Tensor


def rms_gain(norm: torch.nn.Module, d_model: int, device: torch.device) -> torch.Tensor:
    """The per-dimension gain ``g [D]`` of an RMS norm ``y = x / rms(x) ⊙ g`` (``w`` or Gemma's ``1 + w``), read off
    the module itself on a constant input of rms 1000 (where its epsilon is ~1e-12 relative), in float32."""
    with torch.no_grad():
        return norm(torch.full((1, d_model), 1000.0, device=device)).float()[0] / 1000.0


def frozen_scale(x: torch.Tensor, y: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """The RMS norm's scale ``1 / rms(x)`` as it was in the run, ``[...]``: the ``s`` with ``y = s · x ⊙ gain``
    (least squares over the last dimension; exact for an RMS norm), from its input ``x`` and output ``y [..., D]``."""
    xg = x.float() * gain
    return (y.float() * xg).sum(-1) / (xg * xg).sum(-1)


def _hidden(output):
    """The tensor of a module output that is a tensor or a tuple whose first element is one (self-attention)."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _activation_grads(handle: ModelHandle):
    """Gradients for activations only: the weights stop requiring grad (no ``.grad`` left on them) meanwhile."""
    params = [p for p in handle.torch_model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p in params:
            p.requires_grad_(True)


class PromptPass:
    """One prompt with the tokens before ``start`` run once (KV cache, uninjected and unedited); :meth:`forward`
    runs the suffix for a batch of rows. ``start=0`` recomputes everything (edits before the window need it)."""

    def __init__(self, handle: ModelHandle, input_ids: Sequence[int], start: int,
                 prefix_heads: dict[tuple[int, int], torch.Tensor] | None = None) -> None:
        """``prefix_heads``: ``{(layer, head): value [head_dim]}`` heads set to ``value`` over the whole prefix (an
        ablation shared by every row; the rows must then set them over the suffix too)."""
        self.handle, self.start = handle, start
        self.ids = torch.tensor([list(input_ids)], device=handle.device)
        self._hidden: list[torch.Tensor] | None = None
        self.head_dim = handle.head_dim
        self.cache = handle.prefix_cache(self.ids[:, :start], lambda: self._set_heads(prefix_heads)) \
            if start > 0 else None

    def _set_heads(self, heads: dict[tuple[int, int], torch.Tensor] | None) -> None:
        dh = self.head_dim
        for (layer, head), value in sorted((heads or {}).items()):
            self.handle.output_projection(layer).input[..., head * dh:(head + 1) * dh] = value

    def _kwargs(self, rows: int) -> dict:
        return self.handle.suffix_inputs(self.cache, self.start, self.ids.shape[1], rows, self.ids.device)

    def hidden(self) -> list[torch.Tensor]:
        """Each layer's output over the suffix without injection or edits, ``[1, S, D]`` per layer (computed once)."""
        if self._hidden is None:
            layers = self.handle.layers
            with torch.no_grad(), self.handle.model.trace(self.ids[:, self.start:], logits_to_keep=1,
                                                          **self._kwargs(1)):
                hidden = nnsight.save([layer.output for layer in layers])
            self._hidden = list(hidden)
        return self._hidden

    def forward(self, rows: int, *, answer_ids: torch.Tensor, layer: int | None = None,
                add: torch.Tensor | None = None, mask: torch.Tensor | None = None, edits: Sequence[Edit] = (),
                read: torch.Tensor | None = None, read_layers: Sequence[int] | None = None, grad: bool = False,
                skip: bool = False) -> dict:
        """Run the suffix for ``rows`` rows: inject ``add [rows, D] × mask [T]`` at ``layer``'s output, apply
        ``edits``, and return float32 CPU tensors:

        * ``logits [rows, k]``: the final logits of ``answer_ids`` at the last position (yes, no first);
        * with ``read`` (absolute positions ``[P]``): ``z``, ``attn``, ``mlp`` — lists over layers of
          ``[rows, P, n_heads × head_dim]``, ``[rows, P, D]``, ``[rows, P, D]`` (outputs after the edits); ``embed
          [rows, P, D]`` (the residual entering layer 0), ``final_in`` / ``final_out [rows, D]`` (the final norm's
          input and output at the last position); ``read_layers`` limits the layers read (the others are ``None``);
        * with ``grad``: ``grad_z``, ``grad_attn``, ``grad_mlp`` at ``read``: the gradient of the summed yes−no
          logit difference (after any softcap) with respect to those outputs, layer order (rows are independent,
          so each row gets its own gradient).

        ``skip`` (no ``read``, no ``grad``): layers below the lowest injected or edited layer come from
        :meth:`hidden` instead of being recomputed.
        """
        handle, n_layers, start = self.handle, self.handle.arch.n_layers, self.start
        suffix = self.ids[:, start:].expand(rows, -1)
        kwargs = self._kwargs(rows)
        if skip and (read is not None or grad):
            raise ValueError("skip needs every layer's output from the shared pass: no read or grad with it")
        first = min([layer if add is not None else n_layers] + [e.site.layer for e in edits]) if skip else 0
        below = self.hidden()[:first] if first else []
        if read is not None and int(read.min()) < start or any(int(e.positions.min()) < start for e in edits):
            raise ValueError(f"positions before the cached prefix ({start}) cannot be read or edited")
        at = {(e.site.layer, e.site.kind): [] for e in edits}
        for e in edits:
            at[(e.site.layer, e.site.kind)].append(e)
        rel = read - start if read is not None else None
        wanted = set(range(n_layers) if read_layers is None else read_layers)
        dh = handle.head_dim
        context = _activation_grads(handle) if grad else torch.no_grad()
        with context, handle.model.trace(suffix, logits_to_keep=1, **kwargs):
            if grad:  # everything downstream of the embeddings gets a gradient; the weights get none
                handle.embeddings.output.requires_grad_(True)
            if rel is not None:
                embed = handle.layers[0].input[:, rel].save()
            for i in range(first):  # identical in every row: served from the shared pass
                handle.layers[i].skip(below[i].expand(rows, -1, -1))
            z_all, attn_all, mlp_all = [None] * first, [None] * first, [None] * first
            for i in range(first, n_layers):
                z = handle.output_projection(i).input
                for e in at.get((i, "head"), []):
                    cols = slice(e.site.head * dh, (e.site.head + 1) * dh)
                    z[e.rows[:, None], (e.positions - start)[None], cols] = e.values
                attn = _hidden(handle.attention_out(i).output)
                for e in at.get((i, "attn"), []):
                    attn[e.rows[:, None], (e.positions - start)[None]] = e.values
                mlp = handle.mlp_out(i).output
                for e in at.get((i, "mlp"), []):
                    mlp[e.rows[:, None], (e.positions - start)[None]] = e.values
                if i == layer and add is not None:
                    handle.layers[i].output += add[:, None, :] * mask[start:, None].to(add.dtype)
                if rel is not None and i in wanted:
                    z_all.append(z), attn_all.append(attn), mlp_all.append(mlp)
                else:
                    z_all.append(None), attn_all.append(None), mlp_all.append(None)
            if rel is not None:
                final_in = handle.final_norm.input[:, -1].save()
                final_out = handle.final_norm.output[:, -1].save()
                reads = nnsight.save([(z[:, rel], a[:, rel], m[:, rel]) if z is not None else None
                                      for z, a, m in zip(z_all, attn_all, mlp_all, strict=True)])
            final = handle.model.output.logits[:, -1, :]
            logits = final[:, answer_ids].save()
            if grad:
                grads = nnsight.save([])
                metric = (final[:, answer_ids[0]] - final[:, answer_ids[1]]).float().sum()
                with metric.backward():
                    for i in reversed(range(n_layers)):  # gradients arrive last layer first
                        if z_all[i] is None:
                            grads.append(None)
                        else:
                            grads.append((mlp_all[i].grad[:, rel], attn_all[i].grad[:, rel], z_all[i].grad[:, rel]))
        out = {"logits": logits.detach().float().cpu()}
        if rel is not None:
            out.update(embed=_cpu(embed), final_in=_cpu(final_in), final_out=_cpu(final_out),
                       z=[_cpu(r, 0) for r in reads], attn=[_cpu(r, 1) for r in reads],
                       mlp=[_cpu(r, 2) for r in reads])
        if grad:
            grads = grads[::-1]
            out.update(grad_mlp=[_cpu(g, 0) for g in grads], grad_attn=[_cpu(g, 1) for g in grads],
                       grad_z=[_cpu(g, 2) for g in grads])
        return out


def _cpu(value, index: int | None = None) -> torch.Tensor | None:
    """``value`` (or its element ``index``) as a float32 CPU tensor; ``None`` stays ``None``."""
    if value is None:
        return None
    value = value[index] if index is not None else value
    return value.detach().float().cpu()
