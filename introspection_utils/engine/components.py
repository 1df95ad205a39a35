"""A model's components (embedding, injected vector, attention and MLP outputs, heads) as places to read, patch and
ablate inside the one injection pass; :mod:`attribution` and :mod:`patching` call it."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import nnsight
import torch

from introspection_utils.engine.traced_pass import Injection, PromptRun, Within

if TYPE_CHECKING:
    from introspection_utils.engine.trials import Trial
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


@dataclass(frozen=True)
class ComponentReadout:
    """What one :meth:`PromptPass.forward` of ``R`` rows read, float32 on the CPU (``P``: the read positions;
    ``None`` where not asked; the per-layer lists hold ``None`` for the layers not read).

    * ``logits [R, k]``: the model's final logits of the answer tokens at the last position (yes, no first);
    * with ``read``: ``embed [R, P, D]`` (the residual entering layer 0); per layer ``z [R, P, n_heads × head_dim]``
      (the heads' outputs, the output projection's input), ``attn [R, P, D]`` and ``mlp [R, P, D]`` (what attention
      and the MLP add to the residual stream), all after the edits; ``final_in`` / ``final_out [R, D]``: the final
      norm's input and output at the last position;
    * with ``grad``: ``grad_z``, ``grad_attn``, ``grad_mlp``, shaped like ``z``, ``attn``, ``mlp``: the gradient of
      the summed yes−no logit difference (after any softcap) with respect to those outputs (rows are independent,
      so each row gets its own gradient).
    """

    logits: torch.Tensor
    head_dim: int
    embed: torch.Tensor | None = None
    final_in: torch.Tensor | None = None
    final_out: torch.Tensor | None = None
    z: list[torch.Tensor | None] | None = None
    attn: list[torch.Tensor | None] | None = None
    mlp: list[torch.Tensor | None] | None = None
    grad_z: list[torch.Tensor | None] | None = None
    grad_attn: list[torch.Tensor | None] | None = None
    grad_mlp: list[torch.Tensor | None] | None = None

    def output(self, site: Site, row: int) -> torch.Tensor:
        """``site``'s output in row ``row`` at the read positions: ``[P, width]`` (``head_dim`` for a head, else
        ``d_model``)."""
        return self._at(self.z, self.attn, self.mlp, site, row)

    def gradient(self, site: Site, row: int) -> torch.Tensor:
        """The gradient at ``site``'s output in row ``row``: ``[P, width]`` (a forward with ``grad``)."""
        return self._at(self.grad_z, self.grad_attn, self.grad_mlp, site, row)

    def _at(self, z, attn, mlp, site: Site, row: int) -> torch.Tensor:
        if site.kind == "head":
            return z[site.layer][row, :, site.head * self.head_dim:(site.head + 1) * self.head_dim]
        return (attn if site.kind == "attn" else mlp)[site.layer][row]


class _HeadValues(Within):
    """Heads set to fixed values over every position of a pass (the prefix ablation every row shares)."""

    def __init__(self, heads: dict[tuple[int, int], torch.Tensor], head_dim: int) -> None:
        self.heads, self.head_dim = sorted(heads.items()), head_dim

    def layer(self, handle: ModelHandle, i: int) -> None:
        dh = self.head_dim
        for (layer, head), value in self.heads:
            if layer == i:
                handle.output_projection(layer).input[..., head * dh:(head + 1) * dh] = value


class _Sites(Within):
    """The edits, reads and gradients of one :meth:`PromptPass.forward`, inside the pass's layers."""

    reads_logits = True

    def __init__(self, handle: ModelHandle, start: int, edits: Sequence[Edit], answer_ids: torch.Tensor,
                 read: torch.Tensor | None, read_layers: Sequence[int] | None, grad: bool) -> None:
        self.offset, self.answer_ids, self.grad = start, answer_ids, grad  # offset: the suffix's first position
        self.at: dict[tuple[int, str], list[Edit]] = {}
        for e in edits:
            self.at.setdefault((e.site.layer, e.site.kind), []).append(e)
        self.lowest_layer = min((e.site.layer for e in edits), default=None)
        self.rel = read - start if read is not None else None
        self.wanted = set(range(handle.arch.n_layers) if read_layers is None else read_layers)
        self.n_layers, self.head_dim = handle.arch.n_layers, handle.head_dim
        self.outputs: dict[int, tuple] = {}  # layer -> (z, attn, mlp) over the suffix, inside the trace

    def context(self, handle: ModelHandle):
        return _activation_grads(handle) if self.grad else torch.no_grad()

    def start(self, handle: ModelHandle) -> None:
        if self.grad:  # everything downstream of the embeddings gets a gradient; the weights get none
            handle.embeddings.output.requires_grad_(True)
        if self.rel is not None:
            self.embed = handle.layers[0].input[:, self.rel].save()

    def layer(self, handle: ModelHandle, i: int) -> None:
        dh, start = self.head_dim, self.offset
        z = handle.output_projection(i).input
        for e in self.at.get((i, "head"), []):
            cols = slice(e.site.head * dh, (e.site.head + 1) * dh)
            z[e.rows[:, None], (e.positions - start)[None], cols] = e.values
        attn = _hidden(handle.attention_out(i).output)
        for e in self.at.get((i, "attn"), []):
            attn[e.rows[:, None], (e.positions - start)[None]] = e.values
        mlp = handle.mlp_out(i).output
        for e in self.at.get((i, "mlp"), []):
            mlp[e.rows[:, None], (e.positions - start)[None]] = e.values
        if self.rel is not None and i in self.wanted:
            self.outputs[i] = (z, attn, mlp)

    def after_layers(self, handle: ModelHandle) -> None:
        if self.rel is not None:
            rel = self.rel
            self.final_in = handle.final_norm.input[:, -1].save()
            self.final_out = handle.final_norm.output[:, -1].save()
            self.reads = nnsight.save([tuple(x[:, rel] for x in self.outputs[i]) if i in self.outputs else None
                                       for i in range(self.n_layers)])

    def logits(self, handle: ModelHandle, final: torch.Tensor) -> None:
        answer_ids = self.answer_ids
        self.logits_read = final[:, answer_ids].save()
        if self.grad:
            rel, grads = self.rel, nnsight.save([])
            metric = (final[:, answer_ids[0]] - final[:, answer_ids[1]]).float().sum()
            with metric.backward():
                for i in reversed(range(self.n_layers)):  # gradients arrive last layer first
                    if i not in self.outputs:
                        grads.append(None)
                    else:
                        z, attn, mlp = self.outputs[i]
                        grads.append((mlp.grad[:, rel], attn.grad[:, rel], z.grad[:, rel]))
            self.grads = grads

    def readout(self) -> ComponentReadout:
        """The reads as float32 CPU tensors, after the pass."""
        out = {"logits": self.logits_read.detach().float().cpu()}
        if self.rel is not None:
            reads = self.reads
            out.update(embed=_cpu(self.embed), final_in=_cpu(self.final_in), final_out=_cpu(self.final_out),
                       z=[_cpu(r, 0) for r in reads], attn=[_cpu(r, 1) for r in reads],
                       mlp=[_cpu(r, 2) for r in reads])
        if self.grad:
            grads = self.grads[::-1]
            out.update(grad_mlp=[_cpu(g, 0) for g in grads], grad_attn=[_cpu(g, 1) for g in grads],
                       grad_z=[_cpu(g, 2) for g in grads])
        return ComponentReadout(head_dim=self.head_dim, **out)


class PromptPass:
    """One prompt with the tokens before ``start`` run once (KV cache, uninjected and unedited); :meth:`forward`
    runs the suffix for a batch of rows. ``start=0`` recomputes everything (edits before the window need it)."""

    def __init__(self, handle: ModelHandle, input_ids: Sequence[int], start: int,
                 prefix_heads: dict[tuple[int, int], torch.Tensor] | None = None) -> None:
        """``prefix_heads``: ``{(layer, head): value [head_dim]}`` heads set to ``value`` over the whole prefix (an
        ablation shared by every row; the rows must then set them over the suffix too)."""
        self.handle, self.start = handle, start
        self.head_dim = handle.head_dim
        prefix = _HeadValues(prefix_heads, self.head_dim) if prefix_heads else None
        self.run = PromptRun(handle, input_ids, start, prefix=prefix)

    def injection(self, trials: Sequence[Trial], *, layer: int | None = None) -> Injection | None:
        """The injection of ``trials`` (one row each, on this prompt) over the suffix, by the window rule; ``layer``:
        where (default: the injected trials' layer; rows that inject nothing add zeros there). ``None`` when nothing
        is injected and no layer is given."""
        return Injection.of(self.handle, trials, self.run.positions, layer=layer)

    def forward(self, rows: int, *, answer_ids: torch.Tensor, injection: Injection | None = None,
                edits: Sequence[Edit] = (), read: torch.Tensor | None = None, read_layers: Sequence[int] | None = None,
                grad: bool = False, skip: bool = False) -> ComponentReadout:
        """Run the suffix for ``rows`` rows: inject ``injection`` (:meth:`injection`), apply ``edits`` and read the
        answer tokens' logits, plus the sites at absolute positions ``read [P]`` (``read_layers``: only those
        layers) and, with ``grad``, their gradients: a :class:`ComponentReadout`.

        ``skip`` (no ``read``, no ``grad``): layers below the lowest injected or edited layer come from the shared
        uninjected pass instead of being recomputed.
        """
        start = self.start
        if skip and (read is not None or grad):
            raise ValueError("skip needs every layer's output from the shared pass: no read or grad with it")
        if read is not None and int(read.min()) < start or any(int(e.positions.min()) < start for e in edits):
            raise ValueError(f"positions before the cached prefix ({start}) cannot be read or edited")
        sites = _Sites(self.handle, start, edits, answer_ids, read, read_layers, grad)
        self.run.forward(rows, injection=injection, within=sites, skip=skip)
        return sites.readout()


def _cpu(value, index: int | None = None) -> torch.Tensor | None:
    """``value`` (or its element ``index``) as a float32 CPU tensor; ``None`` stays ``None``."""
    if value is None:
        return None
    value = value[index] if index is not None else value
    return value.detach().float().cpu()
