"""Independent reference implementation of concept-vector injection and read-outs.

This module is the *independent check* that the project's nnsight-based engine is
tested against. It deliberately uses nothing but ``torch`` and ``transformers``
(plain PyTorch forward hooks) and imports nothing from ``introspection_utils``.
Everything here favours being obviously correct over being fast.

Model assumptions (plain Hugging Face causal LMs such as ``LlamaForCausalLM``,
``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``, ``Qwen2ForCausalLM``):

* decoder layers at ``model.model.layers``; in transformers 5.x each layer's
  forward returns a plain ``Tensor [B, T, D]`` (a tuple whose first element is the
  hidden state is handled too, for older versions);
* final norm at ``model.model.norm`` and unembedding at ``model.lm_head``;
* optional ``model.config.final_logit_softcapping`` (Gemma-2):
  ``logits = cap * tanh(logits / cap)``; ``None`` or absent means no cap.

Conventions:

* ``B`` batch, ``T`` sequence length, ``D`` hidden size, ``V`` vocabulary size,
  ``H`` attention heads, ``L`` number of decoder layers.
* Batches must be LEFT padded (``attention_mask[:, -1]`` all ones) so position
  ``-1`` is every row's real last token. Position ids are computed from the mask
  exactly as ``GenerationMixin._prepare_position_ids_for_generation`` does:
  ``cumsum(mask) - 1`` with padding positions set to 0 (equivalently clamped at 0
  for left padding), which makes a padded row reproduce that prompt run alone.
* "Layer ``l`` output" means the residual stream right after decoder layer ``l``
  (before the final norm), i.e. what a forward hook on ``model.model.layers[l]``
  sees. Injection adds ``scales[b] * vectors[b]`` to that output at the positions
  where ``positions_mask[b, t]`` is True, so every later layer sees it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "answer_set_readout",
    "attention_to_positions",
    "greedy_generate_injected",
    "injected_logits",
    "last_token_activations",
    "logit_lens_yes_no",
    "logit_lens_yes_no_sets",
    "position_ids_from_mask",
    "yes_no_logit_diff",
]


# --------------------------------------------------------------------------- helpers


def _layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers ``model.model.layers`` (length ``L``)."""
    return model.model.layers


def _hidden_of(output: Any) -> Tensor:
    """The hidden state ``[B, T, D]`` from a decoder layer's output (tensor or tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_hidden(output: Any, hidden: Tensor) -> Any:
    """Rebuild a decoder layer's output with ``hidden`` replacing its hidden state."""
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids ``[B, T]`` (long) for a left-padded ``attention_mask [B, T]``.

    Same rule as ``generate``: ``cumsum(mask) - 1``, and 0 at padding positions.
    """
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _check_left_padded(attention_mask: Tensor) -> None:
    """Raise unless every row's last position is a real token (left padding)."""
    if not bool(attention_mask[:, -1].bool().all()):
        raise ValueError("reference expects LEFT padding: attention_mask[:, -1] must be all ones")


def _default_mask(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """``attention_mask`` or all-ones ``[B, T]`` when it is None."""
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.long)
    return attention_mask


@contextmanager
def _injection(
    model: nn.Module,
    layer: int | None,
    vectors: Tensor | None,
    scales: Tensor | float | None,
    positions_mask: Tensor | None,
) -> Iterator[None]:
    """Context manager: while active, layer ``layer``'s output gets the injection.

    Args:
        layer: decoder layer index, or None for no injection.
        vectors: ``[B, D]`` (or ``[D]``, broadcast over the batch).
        scales: ``[B]`` (or a scalar, broadcast over the batch).
        positions_mask: ``[B, T]`` bool; True where the vector is added.

    The hook adds ``scales[b] * vectors[b]`` to ``output[b, t]`` for every
    ``(b, t)`` with ``positions_mask[b, t]``; other positions are untouched.
    """
    if layer is None:
        yield
        return
    if vectors is None or scales is None or positions_mask is None:
        raise ValueError("layer given: vectors, scales and positions_mask are all required")

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = _hidden_of(output)  # [B, T, D]
        B, T, D = hidden.shape
        vec = vectors.to(device=hidden.device, dtype=hidden.dtype)
        vec = vec.expand(B, D) if vec.dim() == 1 else vec  # [B, D]
        sc = torch.as_tensor(scales, device=hidden.device, dtype=hidden.dtype)
        sc = sc.expand(B) if sc.dim() == 0 else sc  # [B]
        pm = positions_mask.to(device=hidden.device, dtype=torch.bool)  # [B, T]
        if pm.shape != (B, T) or vec.shape != (B, D) or sc.shape != (B,):
            raise ValueError(
                f"shape mismatch: hidden {tuple(hidden.shape)}, positions_mask {tuple(pm.shape)}, "
                f"vectors {tuple(vec.shape)}, scales {tuple(sc.shape)}"
            )
        delta = (sc[:, None] * vec)[:, None, :] * pm[:, :, None].to(hidden.dtype)  # [B, T, D]
        return _with_hidden(output, hidden + delta)

    handle = _layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _capture_layer_outputs(model: nn.Module, store: list[Tensor | None]) -> Iterator[None]:
    """Context manager: ``store[l]`` receives layer ``l``'s output ``[B, T, D]``.

    Must be entered AFTER ``_injection`` so that (forward hooks run in registration
    order) the captured output of the injected layer includes the injection.
    """
    handles = []
    for idx, lyr in enumerate(_layers(model)):

        def hook(module: nn.Module, args: Any, output: Any, idx: int = idx) -> None:
            store[idx] = _hidden_of(output).detach()

        handles.append(lyr.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _softcap(model: nn.Module, logits: Tensor) -> Tensor:
    """Apply Gemma-2 style ``cap * tanh(logits / cap)`` if the config has a cap."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def _forward(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Any:
    """Plain forward with position ids from the mask and no KV cache."""
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **kwargs,
    )


# --------------------------------------------------------------------------- API


@torch.no_grad()
def injected_logits(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    *,
    layer: int | None,
    vectors: Tensor | None,
    scales: Tensor | float | None,
    positions_mask: Tensor | None,
) -> Tensor:
    """Full-sequence logits with a concept vector injected after one decoder layer.

    Args:
        input_ids: ``[B, T]`` long, left padded.
        attention_mask: ``[B, T]`` (1 = real token, 0 = pad), or None for all ones.
        layer: decoder layer whose OUTPUT is modified; None = no injection.
        vectors: ``[B, D]`` concept vectors (or ``[D]``).
        scales: ``[B]`` per-row scales (or a scalar); 0 = no effect.
        positions_mask: ``[B, T]`` bool, True where ``scales[b] * vectors[b]`` is added.

    Returns:
        ``[B, T, V]`` logits (float, softcap included as the model applies it).
    """
    attention_mask = _default_mask(input_ids, attention_mask)
    with _injection(model, layer, vectors, scales, positions_mask):
        return _forward(model, input_ids, attention_mask).logits


@torch.no_grad()
def yes_no_logit_diff(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    *,
    yes_id: int,
    no_id: int,
    layer: int | None = None,
    vectors: Tensor | None = None,
    scales: Tensor | float | None = None,
    positions_mask: Tensor | None = None,
) -> Tensor:
    """``logits[:, -1, yes_id] - logits[:, -1, no_id]`` with optional injection.

    Args: as :func:`injected_logits` (batch must be left padded).

    Returns:
        ``[B]`` yes-minus-no logit difference at each row's last (real) token.
    """
    attention_mask = _default_mask(input_ids, attention_mask)
    _check_left_padded(attention_mask)
    logits = injected_logits(
        model,
        input_ids,
        attention_mask,
        layer=layer,
        vectors=vectors,
        scales=scales,
        positions_mask=positions_mask,
    )
    last = logits[:, -1, :]  # [B, V]
    return last[:, yes_id] - last[:, no_id]


@torch.no_grad()
def logit_lens_yes_no(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    *,
    yes_id: int,
    no_id: int,
    layer: int | None = None,
    vectors: Tensor | None = None,
    scales: Tensor | float | None = None,
    positions_mask: Tensor | None = None,
) -> Tensor:
    """Logit-lens yes-minus-no difference after every decoder layer.

    For each layer ``l``: take its output at the last position (including the
    injection if ``l == layer``), apply ``model.model.norm``, ``model.lm_head`` and
    the final-logit softcap if configured, and return ``yes - no``.

    Args: as :func:`yes_no_logit_diff`.

    Returns:
        ``[B, L]``; column ``L - 1`` equals :func:`yes_no_logit_diff`.
    """
    attention_mask = _default_mask(input_ids, attention_mask)
    _check_left_padded(attention_mask)
    n_layers = len(_layers(model))
    store: list[Tensor | None] = [None] * n_layers
    with _injection(model, layer, vectors, scales, positions_mask), _capture_layer_outputs(model, store):
        _forward(model, input_ids, attention_mask)
    resid = torch.stack([s[:, -1, :] for s in store], dim=1)  # [B, L, D]
    logits = _softcap(model, model.lm_head(model.model.norm(resid)))  # [B, L, V]
    return logits[..., yes_id] - logits[..., no_id]


def _set_diff(logits: Tensor, yes_ids: list[int], no_ids: list[int]) -> Tensor:
    """``log(sum_yes exp(logits)) - log(sum_no exp(logits))`` over the last dim, written from its definition (the
    max subtracted first for stability); ``[..., V] -> [...]``."""
    yes, no = logits[..., yes_ids].double(), logits[..., no_ids].double()
    top_yes, top_no = yes.max(-1, keepdim=True).values, no.max(-1, keepdim=True).values
    log_yes = top_yes[..., 0] + torch.log(torch.exp(yes - top_yes).sum(-1))
    log_no = top_no[..., 0] + torch.log(torch.exp(no - top_no).sum(-1))
    return (log_yes - log_no).float()


@torch.no_grad()
def answer_set_readout(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    *,
    yes_ids: list[int],
    no_ids: list[int],
    layer: int | None = None,
    vectors: Tensor | None = None,
    scales: Tensor | float | None = None,
    positions_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """The yes/no answer read as two SETS of tokens at the last position, with optional injection.

    Args: as :func:`yes_no_logit_diff`, with ``yes_ids`` / ``no_ids`` lists of token ids.

    Returns:
        ``{"diff": [B], "mass": [B]}``: ``log sum_{yes} exp(logit) - log sum_{no} exp(logit)`` and the softmax
        probability of all the yes and no tokens together. With one id per set ``diff`` is
        :func:`yes_no_logit_diff`.
    """
    attention_mask = _default_mask(input_ids, attention_mask)
    _check_left_padded(attention_mask)
    last = injected_logits(model, input_ids, attention_mask, layer=layer, vectors=vectors, scales=scales,
                           positions_mask=positions_mask)[:, -1, :]  # [B, V]
    probs = torch.softmax(last.double(), dim=-1)
    return {"diff": _set_diff(last, yes_ids, no_ids), "mass": (probs[:, yes_ids].sum(-1)
                                                              + probs[:, no_ids].sum(-1)).float()}


@torch.no_grad()
def logit_lens_yes_no_sets(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    *,
    yes_ids: list[int],
    no_ids: list[int],
    layer: int | None = None,
    vectors: Tensor | None = None,
    scales: Tensor | float | None = None,
    positions_mask: Tensor | None = None,
) -> Tensor:
    """:func:`logit_lens_yes_no` with the answer read as sets: each layer's last-position output through the final
    norm, ``lm_head`` and softcap, then ``log sum_yes exp - log sum_no exp``. ``[B, L]``."""
    attention_mask = _default_mask(input_ids, attention_mask)
    _check_left_padded(attention_mask)
    n_layers = len(_layers(model))
    store: list[Tensor | None] = [None] * n_layers
    with _injection(model, layer, vectors, scales, positions_mask), _capture_layer_outputs(model, store):
        _forward(model, input_ids, attention_mask)
    resid = torch.stack([s[:, -1, :] for s in store], dim=1)  # [B, L, D]
    logits = _softcap(model, model.lm_head(model.model.norm(resid)))  # [B, L, V]
    return _set_diff(logits, yes_ids, no_ids)


@torch.no_grad()
def attention_to_positions(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    *,
    key_mask: Tensor,
    layer: int | None = None,
    vectors: Tensor | None = None,
    scales: Tensor | float | None = None,
    positions_mask: Tensor | None = None,
) -> dict[str, Any]:
    """Attention paid by the LAST query position to a set of key positions.

    Requires eager attention (``attn_implementation="eager"``) so that
    ``output_attentions=True`` returns the post-softmax weights.

    Args:
        key_mask: ``[B, T]`` bool, True at the key positions of interest.
        others: as :func:`yes_no_logit_diff` (left padded; optional injection).

    Returns:
        dict with
          ``"sum"``: ``[B, L, H]`` sum over selected keys of ``weights[b, h, -1, k]``;
          ``"max"``: ``[B, L, H]`` max over selected keys (0 for a row with no key);
          ``"weights"``: list of ``L`` tensors ``[B, H, T, T]`` (query, key).
    """
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "eager":
        raise ValueError(f"attention_to_positions needs eager attention, model uses {impl!r}")
    attention_mask = _default_mask(input_ids, attention_mask)
    _check_left_padded(attention_mask)
    with _injection(model, layer, vectors, scales, positions_mask):
        out = _forward(model, input_ids, attention_mask, output_attentions=True)
    weights = [w.detach() for w in out.attentions]  # L x [B, H, T, T]
    if len(weights) != len(_layers(model)) or any(w is None for w in weights):
        raise RuntimeError("model did not return one attention tensor per layer")
    last_q = torch.stack([w[:, :, -1, :] for w in weights], dim=1)  # [B, L, H, T]
    km = key_mask.to(device=last_q.device, dtype=torch.bool)[:, None, None, :]  # [B, 1, 1, T]
    total = (last_q * km.to(last_q.dtype)).sum(-1)  # [B, L, H]
    mx = last_q.masked_fill(~km, float("-inf")).amax(-1)  # [B, L, H]
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    return {"sum": total, "max": mx, "weights": weights}


@torch.no_grad()
def last_token_activations(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
) -> Tensor:
    """Every decoder layer's output at the last (real) position, no injection.

    This is what concept vectors are built from:
    ``activation(word) - mean(activation(baseline words))``.

    Args:
        input_ids: ``[B, T]`` left padded; attention_mask ``[B, T]`` or None.

    Returns:
        ``[B, L, D]`` residual stream after each layer (before the final norm).
    """
    attention_mask = _default_mask(input_ids, attention_mask)
    _check_left_padded(attention_mask)
    n_layers = len(_layers(model))
    store: list[Tensor | None] = [None] * n_layers
    with _capture_layer_outputs(model, store):
        _forward(model, input_ids, attention_mask)
    return torch.stack([s[:, -1, :] for s in store], dim=1)


@torch.no_grad()
def greedy_generate_injected(
    model: nn.Module,
    input_ids: Tensor,
    *,
    layer: int | None,
    vector: Tensor | None,
    scale: float,
    start: int,
    max_new_tokens: int,
    eos_token_id: int | None = None,
) -> list[int]:
    """Greedy decoding with injection, recomputing the whole sequence every step.

    No KV cache: at step ``i`` the model runs on prompt + the ``i`` tokens generated
    so far, with ``scale * vector`` added to layer ``layer``'s output at every
    position ``>= start`` (prompt positions from ``start`` on AND all generated
    tokens; the Anthropic introspection protocol), and takes the argmax of the last
    position's logits.

    Args:
        input_ids: ``[1, T]`` or ``[T]`` single prompt, no padding.
        layer: injection layer (None = plain greedy decoding).
        vector: ``[D]`` concept vector.
        scale: injection strength.
        start: first injected position (0-based index into the full sequence).
        max_new_tokens: number of tokens to generate.
        eos_token_id: if given, stop after producing this token (it is included).

    Returns:
        The NEW token ids only (length ``<= max_new_tokens``), as Python ints.
    """
    ids = input_ids.reshape(1, -1).clone()
    new: list[int] = []
    for _ in range(max_new_tokens):
        T = ids.shape[1]
        mask = torch.ones_like(ids)
        if layer is None:
            logits = injected_logits(
                model, ids, mask, layer=None, vectors=None, scales=None, positions_mask=None
            )
        else:
            pos = (torch.arange(T, device=ids.device) >= start)[None, :]  # [1, T]
            logits = injected_logits(
                model,
                ids,
                mask,
                layer=layer,
                vectors=vector.reshape(1, -1),
                scales=torch.tensor([float(scale)]),
                positions_mask=pos,
            )
        nxt = int(logits[0, -1].argmax())
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=ids.device, dtype=ids.dtype)], dim=1)
        if eos_token_id is not None and nxt == eos_token_id:
            break
    return new


@contextmanager
def directional_ablation(model: nn.Module, direction: Tensor) -> Iterator[None]:
    """Context manager: project the unit ``direction [D]`` out of the token embeddings and of every decoder
    layer's output (all positions). Enter it AFTER ``_injection`` so the projection follows the injection."""
    unit = direction / direction.norm()

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = _hidden_of(output)
        u = unit.to(hidden.device, hidden.dtype)
        return _with_hidden(output, hidden - (hidden @ u)[..., None] * u)

    modules = [model.get_input_embeddings(), *_layers(model)]
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def ablated_yes_no_logit_diff(
    model: nn.Module,
    input_ids: Tensor,
    *,
    yes_id: int,
    no_id: int,
    direction: Tensor,
    layer: int | None = None,
    vectors: Tensor | None = None,
    scales: Tensor | float | None = None,
    positions_mask: Tensor | None = None,
) -> Tensor:
    """``[B]`` yes−no logit difference with the injection and then the directional ablation (unpadded batch)."""
    mask = torch.ones_like(input_ids)
    with _injection(model, layer, vectors, scales, positions_mask), directional_ablation(model, direction):
        logits = _forward(model, input_ids, mask).logits
    return logits[:, -1, yes_id] - logits[:, -1, no_id]


# ------------------------------------------------------------- components: attribution, patching, ablation
#
# "Sandwich" families (Gemma-2/3: a layer with ``pre_feedforward_layernorm``) norm the attention output with
# ``post_attention_layernorm`` and the MLP output with ``post_feedforward_layernorm`` before each residual add;
# elsewhere ``post_attention_layernorm`` is the norm *before* the MLP and the sublayer outputs are added as they are.


def _sandwich(layer: nn.Module) -> bool:
    return hasattr(layer, "pre_feedforward_layernorm")


def _attn_out_module(layer: nn.Module) -> nn.Module:
    """The module whose output (a tensor, or a tuple led by one) is what attention adds to the residual."""
    return layer.post_attention_layernorm if _sandwich(layer) else layer.self_attn


def _mlp_out_module(layer: nn.Module) -> nn.Module:
    return layer.post_feedforward_layernorm if _sandwich(layer) else layer.mlp


def _rms_parts(norm: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(1 / rms(x) [...], gain [D])`` of an RMS norm from its epsilon and weight (Gemma: ``1 + w``)."""
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    gain = norm.weight.float() + (1.0 if type(norm).__name__.startswith("Gemma") else 0.0)
    return torch.rsqrt(x.float().pow(2).mean(-1) + eps), gain


@torch.no_grad()
def logit_attribution(
    model: nn.Module,
    input_ids: Tensor,
    *,
    yes_id: int,
    no_id: int,
    layer: int | None = None,
    vectors: Tensor | None = None,
    scales: Tensor | float | None = None,
    positions_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Direct logit attribution at the last position of a single unpadded sequence ``input_ids [1, T]``.

    Each residual piece is carried through the final norm with ``1 / rms`` computed from the run's final residual
    (frozen), onto the unembedding rows of yes and no (no softcap: the shares of the raw logits). Heads: the
    output projection's input split into heads times the matching columns of W_O, through the frozen
    post-attention norm for sandwich families.

    Returns (each ``[..., 2]``, yes then no): ``"embed" [2]``, ``"injection" [2]`` (zeros if none at the last
    position), ``"attn" [L, 2]``, ``"mlp" [L, 2]``, ``"heads" [L, H, 2]``, and ``"raw" [2]`` the raw logits
    recomputed by the model's own final norm and unembedding.
    """
    layers = _layers(model)
    store: dict[str, Any] = {"attn": {}, "mlp": {}, "z": {}, "o": {}}
    hooks = []

    def keep(kind: str, idx: int, pre: bool = False):
        def hook(module, args, output=None):
            value = args[0] if pre else _hidden_of(output)
            store[kind][idx] = value[0, -1].detach().float()
        return hook

    def embed_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        store["embed"] = hidden[0, -1].detach().float()

    def final_hook(module, args):
        store["final"] = args[0][0, -1].detach().float()

    with _injection(model, layer, vectors, scales, positions_mask):
        hooks.append(layers[0].register_forward_pre_hook(embed_hook, with_kwargs=True))
        for idx, lyr in enumerate(layers):
            hooks.append(lyr.self_attn.o_proj.register_forward_pre_hook(keep("z", idx, pre=True)))
            hooks.append(lyr.self_attn.o_proj.register_forward_hook(keep("o", idx)))
            hooks.append(_attn_out_module(lyr).register_forward_hook(keep("attn", idx)))
            hooks.append(_mlp_out_module(lyr).register_forward_hook(keep("mlp", idx)))
        hooks.append(model.model.norm.register_forward_pre_hook(final_hook))
        try:
            _forward(model, input_ids, torch.ones_like(input_ids))
        finally:
            for h in hooks:
                h.remove()
    inv_rms, gain = _rms_parts(model.model.norm, store["final"])
    w_u = model.lm_head.weight[[yes_id, no_id]].float()  # [2, D]

    def share(x: Tensor) -> Tensor:
        return (x * inv_rms * gain) @ w_u.T

    n_heads = model.config.num_attention_heads
    attn, mlp, heads = [], [], []
    for idx, lyr in enumerate(layers):
        attn.append(share(store["attn"][idx]))
        mlp.append(share(store["mlp"][idx]))
        w_o = lyr.self_attn.o_proj.weight.float()  # [D, H * dh]
        dh = w_o.shape[1] // n_heads
        per_head = torch.stack([store["z"][idx][h * dh:(h + 1) * dh] @ w_o[:, h * dh:(h + 1) * dh].T
                                for h in range(n_heads)])  # [H, D]
        if _sandwich(lyr):
            post_inv_rms, post_gain = _rms_parts(lyr.post_attention_layernorm, store["o"][idx])
            per_head = per_head * post_inv_rms * post_gain
        heads.append(share(per_head))
    injection = torch.zeros(2)
    if layer is not None and bool(positions_mask[0, -1]):
        injection = share(torch.as_tensor(scales).reshape(-1)[0].float() * vectors.reshape(-1).float())
    raw = model.lm_head(model.model.norm(store["final"][None]))[0, [yes_id, no_id]].float()
    return {"embed": share(store["embed"]), "injection": injection, "attn": torch.stack(attn),
            "mlp": torch.stack(mlp), "heads": torch.stack(heads), "raw": raw}


def _site_hook(model: nn.Module, site: tuple[str, int, int | None], fn) -> Any:
    """Register ``fn(tensor) -> tensor | None`` on a component's output: "attn" / "mlp" of a layer, or "head"
    (the output projection's input, whole ``[B, T, H * dh]``; ``fn`` handles the head's columns)."""
    kind, idx, _ = site
    lyr = _layers(model)[idx]
    if kind == "head":
        def pre(module, args):
            new = fn(args[0])
            return None if new is None else (new,) + tuple(args[1:])
        return lyr.self_attn.o_proj.register_forward_pre_hook(pre)
    module = _attn_out_module(lyr) if kind == "attn" else _mlp_out_module(lyr)

    def post(module, args, output):
        new = fn(_hidden_of(output))
        return None if new is None else _with_hidden(output, new)
    return module.register_forward_hook(post)


def _head_cols(model: nn.Module, head: int) -> slice:
    dh = _layers(model)[0].self_attn.o_proj.weight.shape[1] // model.config.num_attention_heads
    return slice(head * dh, (head + 1) * dh)


def _hooked_run(model: nn.Module, input_ids: Tensor, injection: dict, edits: list[tuple[tuple, Any]]) -> Tensor:
    """The logits ``[1, T, vocab]`` of one unpadded run with ``injection`` (kwargs of ``_injection``) and each
    ``(site, fn)`` of ``edits`` hooked on its site's output (see ``_site_hook``); the hooks are removed after."""
    handles = [_site_hook(model, site, fn) for site, fn in edits]
    try:
        with _injection(model, **injection):
            return _forward(model, input_ids, torch.ones_like(input_ids)).logits
    finally:
        for handle in handles:
            handle.remove()


def _site_cols(model: nn.Module, site: tuple[str, int, int | None]) -> slice:
    """The columns of a site's hooked tensor that belong to it: a head's slice, or all of an attn / mlp output."""
    return _head_cols(model, site[2]) if site[0] == "head" else slice(None)


def _yes_minus_no(logits: Tensor, yes_id: int, no_id: int) -> Tensor:
    return logits[0, -1, yes_id] - logits[0, -1, no_id]


def _capture(model: nn.Module, input_ids: Tensor, site, positions: Tensor, injection: dict) -> Tensor:
    """The site's output ``[P, width]`` at ``positions`` in a run with ``injection`` (kwargs of ``_injection``)."""
    kept = {}
    cols = _site_cols(model, site)

    def fn(t):
        kept["v"] = t[0, positions][:, cols].detach().clone()
    _hooked_run(model, input_ids, injection, [(site, fn)])
    return kept["v"]


@torch.no_grad()
def patched_yes_no_logit_diff(
    model: nn.Module,
    input_ids: Tensor,
    *,
    yes_id: int,
    no_id: int,
    site: tuple[str, int, int | None],
    positions: Tensor,
    source: dict,
    target: dict,
) -> float:
    """Activation patching on one unpadded sequence ``[1, T]``: the yes−no difference of the ``target`` run with
    ``site``'s output (``("attn" | "mlp", layer, None)`` or ``("head", layer, head)``) at ``positions [P]`` replaced
    by its value in the ``source`` run. ``source`` / ``target``: keyword arguments of the injection (``layer``,
    ``vectors``, ``scales``, ``positions_mask``; ``layer=None`` for no injection)."""
    value = _capture(model, input_ids, site, positions, source)
    cols = _site_cols(model, site)

    def fn(t):
        t = t.clone()
        rows = t[0, positions]
        rows[:, cols] = value.to(t.dtype)
        t[0, positions] = rows
        return t
    return float(_yes_minus_no(_hooked_run(model, input_ids, target, [(site, fn)]), yes_id, no_id))


def attribution_patching_estimate(
    model: nn.Module,
    input_ids: Tensor,
    *,
    yes_id: int,
    no_id: int,
    site: tuple[str, int, int | None],
    positions: Tensor,
    source: dict,
    target: dict,
) -> float:
    """``Σ (source − target) · ∂(yes − no)/∂output`` over ``positions`` and the site's width, the gradient taken in
    the ``target`` run by autograd (weights untouched: only the captured activation is differentiated)."""
    value = _capture(model, input_ids, site, positions, source)
    cols = _site_cols(model, site)
    kept = {}

    def fn(t):
        leaf = t.detach().clone().requires_grad_(True)
        kept["t"] = leaf
        return leaf
    with torch.enable_grad():
        metric = _yes_minus_no(_hooked_run(model, input_ids, target, [(site, fn)]), yes_id, no_id)
        (grad,) = torch.autograd.grad(metric, kept["t"])
    here = kept["t"].detach()[0, positions][:, cols]
    return float(((value - here) * grad[0, positions][:, cols]).sum())


@torch.no_grad()
def head_ablated_yes_no_logit_diff(
    model: nn.Module,
    input_ids: Tensor,
    *,
    yes_id: int,
    no_id: int,
    heads: list[tuple[int, int]],
    values: list[Tensor] | None = None,
    injection: dict,
) -> float:
    """The yes−no difference with each ``(layer, head)`` of ``heads`` set, at every position, to zero or to
    ``values[k] [head_dim]`` (its slice of the output projection's input)."""
    edits = []
    for k, (idx, head) in enumerate(heads):
        cols = _head_cols(model, head)
        value = None if values is None else values[k]

        def fn(t, cols=cols, value=value):
            t = t.clone()
            t[..., cols] = 0.0 if value is None else value.to(t.dtype)
            return t
        edits.append((("head", idx, head), fn))
    return float(_yes_minus_no(_hooked_run(model, input_ids, injection, edits), yes_id, no_id))


@torch.no_grad()
def head_outputs(model: nn.Module, input_ids: Tensor, heads: list[tuple[int, int]]) -> list[Tensor]:
    """Each head's slice of the output projection's input at every position, ``[T, head_dim]``, no injection."""
    return [_capture(model, input_ids, ("head", idx, head), torch.arange(input_ids.shape[1]),
                     {"layer": None, "vectors": None, "scales": None, "positions_mask": None})
            for idx, head in heads]
