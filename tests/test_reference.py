"""Self-tests for ``tests/reference.py`` on tiny randomly initialised models.

The reference is the independent check for the nnsight engine, so it must itself
be right: these tests pin its behaviour against plain ``transformers`` forwards,
``output_hidden_states`` / ``output_attentions`` and ``model.generate``.
Architectures: Llama, Gemma-2 (final + attention logit softcapping, sliding
window 4 on alternating layers), Gemma-3 text (sliding/full layers, per-type
RoPE) and Qwen2. Everything is CPU-only and tiny.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference as ref

VOCAB = 128
YES, NO = 5, 7
SEQ = 9  # > sliding window (4) so the sliding layers really slide

_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
    "bos_token_id": 2,
    "eos_token_id": 1,
}


def _build(arch: str) -> transformers.PreTrainedModel:
    """A tiny eager-attention model of the given architecture, seeded."""
    torch.manual_seed({"llama": 0, "gemma2": 1, "gemma3": 2, "qwen2": 3}[arch])
    if arch == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=2, **_COMMON)
        cls = transformers.LlamaForCausalLM
    elif arch == "gemma2":
        cfg = transformers.Gemma2Config(
            num_hidden_layers=4,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"] * 2,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            **_COMMON,
        )
        cls = transformers.Gemma2ForCausalLM
    elif arch == "gemma3":
        cfg = transformers.Gemma3TextConfig(
            num_hidden_layers=4,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"] * 2,
            **_COMMON,
        )
        cls = transformers.Gemma3ForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(num_hidden_layers=2, **_COMMON)
        cls = transformers.Qwen2ForCausalLM
    else:
        raise KeyError(arch)
    cfg._attn_implementation = "eager"
    model = cls(cfg).eval()
    with torch.no_grad():
        # Fresh RMSNorm weights are 1 (Gemma: 0, used as 1 + w), which makes
        # norm(norm(x)) == norm(x) and hides double-norm bugs: randomise them.
        for name, p in model.named_parameters():
            if "norm" in name.split(".")[-2]:
                p.add_(0.3 * torch.randn_like(p))
        if arch == "gemma2":
            # Random tiny models give |logits| << 30, where the softcap is ~identity;
            # a big final-norm gain pushes logits into the cap's nonlinear range.
            model.model.norm.weight.add_(300.0)
    assert model.config._attn_implementation == "eager"
    return model


ARCHS = ["llama", "gemma2", "gemma3", "qwen2"]


@pytest.fixture(scope="module", params=ARCHS)
def model(request: Any) -> transformers.PreTrainedModel:
    return _build(request.param)


def _ids(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, shape, generator=g)


def _vec(model: Any, seed: int, n: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, model.config.hidden_size, generator=g)


def _n_layers(model: Any) -> int:
    return len(model.model.layers)


def _left_pad(prompts: list[torch.Tensor], pad_value: int = 99) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D prompts with a (deliberately non-pad-id) token; returns ids, mask."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_value, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = p
        mask[b, T - len(p) :] = 1
    return ids, mask


def _assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """assert_close with atol = tol * max(1, max|expected|): float32 rounding grows with
    magnitude, and the Gemma-2 fixture's logits are deliberately ~30 (see ``_build``).
    For unit-scale values this is plain ``atol=tol``."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol)


# ----------------------------------------------------------------- basic facts


def test_layer_output_is_plain_tensor(model: Any) -> None:
    """transformers 5.x decoder layers return a bare [B, T, D] tensor (not a tuple)."""
    seen: list[Any] = []
    h = model.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        with torch.no_grad():
            model(_ids(0, 1, SEQ))
    finally:
        h.remove()
    assert isinstance(seen[0], torch.Tensor) and seen[0].shape == (1, SEQ, model.config.hidden_size)


def test_softcap_config(model: Any) -> None:
    cap = getattr(model.config, "final_logit_softcapping", None)
    if isinstance(model, transformers.Gemma2ForCausalLM):
        assert cap == 30.0
        with torch.no_grad():
            logits = model(_ids(0, 2, SEQ)).logits
        # the cap is really exercised: logits are large but bounded by 30
        assert 20.0 < float(logits.abs().max()) < 30.0
    else:
        assert cap is None


# ----------------------------------------------------------------- injection


def test_scale_zero_and_no_layer_equal_plain_logits(model: Any) -> None:
    ids = _ids(1, 2, SEQ)
    with torch.no_grad():
        plain = model(ids).logits
    for layer in range(_n_layers(model)):
        got = ref.injected_logits(
            model,
            ids,
            None,
            layer=layer,
            vectors=_vec(model, 2, 2),
            scales=torch.zeros(2),
            positions_mask=torch.ones(2, SEQ, dtype=torch.bool),
        )
        assert torch.equal(got, plain)
    got = ref.injected_logits(model, ids, None, layer=None, vectors=None, scales=None, positions_mask=None)
    assert torch.equal(got, plain)


def test_injection_only_touches_masked_positions(model: Any) -> None:
    """Positions before the first injected one are unaffected (causal attention);
    the injected layer's output changes by exactly scale*vector at masked positions."""
    ids = _ids(3, 2, SEQ)
    first = 4
    pm = torch.zeros(2, SEQ, dtype=torch.bool)
    pm[0, first:] = True
    pm[1, first + 2 :] = True
    vec = _vec(model, 4, 2)
    scales = torch.tensor([8.0, -5.0])
    for layer in range(_n_layers(model)):
        plain = ref.injected_logits(
            model, ids, None, layer=None, vectors=None, scales=None, positions_mask=None
        )
        inj = ref.injected_logits(
            model, ids, None, layer=layer, vectors=vec, scales=scales, positions_mask=pm
        )
        assert torch.equal(inj[0, :first], plain[0, :first])
        assert torch.equal(inj[1, : first + 2], plain[1, : first + 2])
        assert not torch.allclose(inj[0, first:], plain[0, first:])
        assert not torch.allclose(inj[1, first + 2 :], plain[1, first + 2 :])

        # exact arithmetic at the injected layer's output
        store0: list[Any] = [None] * _n_layers(model)
        store1: list[Any] = [None] * _n_layers(model)
        mask = torch.ones_like(ids)
        with torch.no_grad(), ref._capture_layer_outputs(model, store0):
            ref._forward(model, ids, mask)
        with (
            torch.no_grad(),
            ref._injection(model, layer, vec, scales, pm),
            ref._capture_layer_outputs(model, store1),
        ):
            ref._forward(model, ids, mask)
        delta = store1[layer] - store0[layer]
        expected = scales[:, None, None] * vec[:, None, :] * pm[:, :, None]
        torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-5)
        for earlier in range(layer):
            assert torch.equal(store1[earlier], store0[earlier])


def test_injection_at_last_layer_matches_hand_computation(model: Any) -> None:
    """Inject at the last layer: last-position logits = softcap(lm_head(norm(h + s*v)))."""
    ids = _ids(5, 2, SEQ)
    L = _n_layers(model)
    vec = _vec(model, 6, 2)
    scales = torch.tensor([3.0, 0.5])
    pm = torch.ones(2, SEQ, dtype=torch.bool)
    acts = ref.last_token_activations(model, ids, None)  # [B, L, D]
    with torch.no_grad():
        h = acts[:, -1] + scales[:, None] * vec
        logits = model.lm_head(model.model.norm(h))
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
    got = ref.injected_logits(model, ids, None, layer=L - 1, vectors=vec, scales=scales, positions_mask=pm)
    torch.testing.assert_close(got[:, -1], logits, atol=1e-5, rtol=1e-5)


def test_row_with_zero_scale_is_unchanged_in_batch(model: Any) -> None:
    ids = _ids(7, 3, SEQ)
    pm = torch.ones(3, SEQ, dtype=torch.bool)
    plain = ref.yes_no_logit_diff(model, ids, None, yes_id=YES, no_id=NO)
    got = ref.yes_no_logit_diff(
        model,
        ids,
        None,
        yes_id=YES,
        no_id=NO,
        layer=1,
        vectors=_vec(model, 8, 3),
        scales=torch.tensor([0.0, 10.0, 0.0]),
        positions_mask=pm,
    )
    assert got.shape == (3,)
    assert torch.equal(got[[0, 2]], plain[[0, 2]])
    assert not torch.allclose(got[1], plain[1])


# ----------------------------------------------------------------- left padding


def test_position_ids_match_generate(model: Any) -> None:
    ids, mask = _left_pad([_ids(9, 6), _ids(10, 3), _ids(11, 8)])
    ours = ref.position_ids_from_mask(mask)
    assert ours.tolist()[1] == [0, 0, 0, 0, 0, 0, 1, 2]
    theirs = model._prepare_position_ids_for_generation(ids, {"attention_mask": mask})
    assert torch.equal(ours, theirs)


def test_left_padded_batch_rows_equal_prompts_alone(model: Any) -> None:
    prompts = [_ids(12, SEQ), _ids(13, 6), _ids(14, 4)]
    ids, mask = _left_pad(prompts)
    T = ids.shape[1]
    vec = _vec(model, 15, 1).expand(3, -1)
    scales = torch.tensor([4.0, 4.0, 4.0])
    inj_from = 2  # inject from real-token index 2 on
    pm = torch.zeros(3, T, dtype=torch.bool)
    for b, p in enumerate(prompts):
        pm[b, T - len(p) + inj_from :] = True
    kw = {"layer": 1, "vectors": vec, "scales": scales, "positions_mask": pm}

    batch_plain = ref.injected_logits(
        model, ids, mask, layer=None, vectors=None, scales=None, positions_mask=None
    )
    batch_inj = ref.injected_logits(model, ids, mask, **kw)
    batch_diff = ref.yes_no_logit_diff(model, ids, mask, yes_id=YES, no_id=NO, **kw)
    batch_lens = ref.logit_lens_yes_no(model, ids, mask, yes_id=YES, no_id=NO, **kw)
    batch_acts = ref.last_token_activations(model, ids, mask)
    batch_att = ref.attention_to_positions(model, ids, mask, key_mask=pm, **kw)

    for b, p in enumerate(prompts):
        n = len(p)
        one = p[None]
        one_pm = torch.zeros(1, n, dtype=torch.bool)
        one_pm[0, inj_from:] = True
        one_kw = {
            "layer": 1,
            "vectors": vec[b : b + 1],
            "scales": scales[b : b + 1],
            "positions_mask": one_pm,
        }
        with torch.no_grad():
            alone_plain = model(one).logits[0]
        _assert_close_scaled(batch_plain[b, T - n :], alone_plain)
        alone_inj = ref.injected_logits(model, one, None, **one_kw)[0]
        _assert_close_scaled(batch_inj[b, T - n :], alone_inj)
        _assert_close_scaled(
            batch_diff[b], ref.yes_no_logit_diff(model, one, None, yes_id=YES, no_id=NO, **one_kw)[0]
        )
        _assert_close_scaled(
            batch_lens[b], ref.logit_lens_yes_no(model, one, None, yes_id=YES, no_id=NO, **one_kw)[0]
        )
        torch.testing.assert_close(
            batch_acts[b], ref.last_token_activations(model, one, None)[0], atol=1e-5, rtol=1e-5
        )
        alone_att = ref.attention_to_positions(model, one, None, key_mask=one_pm, **one_kw)
        torch.testing.assert_close(batch_att["sum"][b], alone_att["sum"][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch_att["max"][b], alone_att["max"][0], atol=1e-5, rtol=1e-5)


def test_pad_token_values_do_not_matter(model: Any) -> None:
    prompts = [_ids(16, 7), _ids(17, 3)]
    a_ids, mask = _left_pad(prompts, pad_value=0)
    b_ids, _ = _left_pad(prompts, pad_value=111)
    a = ref.yes_no_logit_diff(model, a_ids, mask, yes_id=YES, no_id=NO)
    b = ref.yes_no_logit_diff(model, b_ids, mask, yes_id=YES, no_id=NO)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_right_padding_rejected(model: Any) -> None:
    ids = _ids(18, 1, 5)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    with pytest.raises(ValueError):
        ref.yes_no_logit_diff(model, ids, mask, yes_id=YES, no_id=NO)


# ----------------------------------------------------------------- logit lens


def test_lens_last_column_equals_logit_diff(model: Any) -> None:
    ids, mask = _left_pad([_ids(19, SEQ), _ids(20, 5)])
    T = ids.shape[1]
    pm = torch.zeros(2, T, dtype=torch.bool)
    pm[:, -3:] = True
    for kw in (
        {},
        {
            "layer": 0,
            "vectors": _vec(model, 21, 2),
            "scales": torch.tensor([6.0, -2.0]),
            "positions_mask": pm,
        },
        {
            "layer": _n_layers(model) - 1,
            "vectors": _vec(model, 22, 2),
            "scales": torch.tensor([1.0, 3.0]),
            "positions_mask": pm,
        },
    ):
        lens = ref.logit_lens_yes_no(model, ids, mask, yes_id=YES, no_id=NO, **kw)
        diff = ref.yes_no_logit_diff(model, ids, mask, yes_id=YES, no_id=NO, **kw)
        assert lens.shape == (2, _n_layers(model))
        torch.testing.assert_close(lens[:, -1], diff, atol=1e-5, rtol=1e-5)


def test_answer_sets_reduce_to_the_pair_and_match_a_hand_computation(model: Any) -> None:
    ids, mask = _left_pad([_ids(23, SEQ), _ids(24, 5)])
    kw = {"layer": 0, "vectors": _vec(model, 25, 2), "scales": torch.tensor([5.0, -3.0]),
          "positions_mask": torch.ones(ids.shape, dtype=torch.bool)}
    pair = ref.answer_set_readout(model, ids, mask, yes_ids=[YES], no_ids=[NO], **kw)
    torch.testing.assert_close(pair["diff"], ref.yes_no_logit_diff(model, ids, mask, yes_id=YES, no_id=NO, **kw),
                               atol=1e-5, rtol=1e-5)
    yes_ids, no_ids = [YES, 9, 11], [NO, 13]
    got = ref.answer_set_readout(model, ids, mask, yes_ids=yes_ids, no_ids=no_ids, **kw)
    last = ref.injected_logits(model, ids, mask, **kw)[:, -1, :].double()
    probs = last.softmax(-1)
    # log(P(yes set) / P(no set)) is the same number as the log-sum-exp difference of the logits
    expected = torch.log(probs[:, yes_ids].sum(-1) / probs[:, no_ids].sum(-1)).float()
    torch.testing.assert_close(got["diff"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["mass"], probs[:, yes_ids + no_ids].sum(-1).float(), atol=1e-6, rtol=1e-5)
    lens = ref.logit_lens_yes_no_sets(model, ids, mask, yes_ids=yes_ids, no_ids=no_ids, **kw)
    assert lens.shape == (2, _n_layers(model))
    torch.testing.assert_close(lens[:, -1], got["diff"], atol=1e-4, rtol=1e-4)
    single = ref.logit_lens_yes_no_sets(model, ids, mask, yes_ids=[YES], no_ids=[NO], **kw)
    torch.testing.assert_close(single, ref.logit_lens_yes_no(model, ids, mask, yes_id=YES, no_id=NO, **kw),
                               atol=1e-5, rtol=1e-5)


def test_lens_matches_output_hidden_states(model: Any) -> None:
    """Independent capture: in transformers 5.x ``hidden_states[l + 1]`` is layer l's
    output for l < L-1, but ``hidden_states[-1]`` is already final-normed."""
    ids = _ids(23, 2, SEQ)
    L = _n_layers(model)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        hs = out.hidden_states
        assert len(hs) == L + 1
        acts = ref.last_token_activations(model, ids, None)
        for layer in range(L - 1):
            torch.testing.assert_close(acts[:, layer], hs[layer + 1][:, -1], atol=0, rtol=0)
        torch.testing.assert_close(model.model.norm(acts[:, -1]), hs[-1][:, -1], atol=1e-6, rtol=1e-6)
        resid = torch.stack([hs[layer + 1][:, -1] for layer in range(L - 1)], 1)
        logits = model.lm_head(model.model.norm(resid))
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        expected = logits[..., YES] - logits[..., NO]
    lens = ref.logit_lens_yes_no(model, ids, None, yes_id=YES, no_id=NO)
    torch.testing.assert_close(lens[:, :-1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        lens[:, -1], out.logits[:, -1, YES] - out.logits[:, -1, NO], atol=1e-5, rtol=1e-5
    )


def test_activation_shape(model: Any) -> None:
    ids, mask = _left_pad([_ids(24, 6), _ids(25, 4), _ids(26, 2)])
    acts = ref.last_token_activations(model, ids, mask)
    assert acts.shape == (3, _n_layers(model), model.config.hidden_size)


# ----------------------------------------------------------------- attention


def test_attention_rows_sum_to_one(model: Any) -> None:
    ids, mask = _left_pad([_ids(27, SEQ), _ids(28, 5)])
    T = ids.shape[1]
    L, H = _n_layers(model), model.config.num_attention_heads
    all_keys = torch.ones(2, T, dtype=torch.bool)
    out = ref.attention_to_positions(model, ids, mask, key_mask=all_keys)
    assert out["sum"].shape == (2, L, H) and out["max"].shape == (2, L, H)
    assert len(out["weights"]) == L and out["weights"][0].shape == (2, H, T, T)
    torch.testing.assert_close(out["sum"], torch.ones(2, L, H), atol=1e-5, rtol=0)
    real = ref.attention_to_positions(model, ids, mask, key_mask=mask.bool())
    torch.testing.assert_close(real["sum"], torch.ones(2, L, H), atol=1e-5, rtol=0)
    assert bool((real["max"] <= real["sum"] + 1e-6).all()) and bool((real["max"] > 0).all())
    # every real query row sums to one as well, and pads get no weight
    for w in out["weights"]:
        torch.testing.assert_close(w[0].sum(-1), torch.ones(H, T), atol=1e-5, rtol=0)
        torch.testing.assert_close(w[1, :, T - 5 :].sum(-1), torch.ones(H, 5), atol=1e-5, rtol=0)
        assert float(w[1, :, T - 5 :, : T - 5].abs().max()) < 1e-6  # real queries ignore pads


def test_attention_sliding_window(model: Any) -> None:
    """Gemma sliding layers (window 4): the last query sees itself + 3 previous keys."""
    if not isinstance(model, (transformers.Gemma2ForCausalLM, transformers.Gemma3ForCausalLM)):
        pytest.skip("no sliding layers")
    ids = _ids(29, 1, SEQ)
    far = torch.zeros(1, SEQ, dtype=torch.bool)
    far[0, : SEQ - 4] = True
    out = ref.attention_to_positions(model, ids, None, key_mask=far)
    for layer, kind in enumerate(model.config.layer_types):
        if kind == "sliding_attention":
            assert float(out["sum"][0, layer].abs().max()) == 0.0
        else:
            assert bool((out["sum"][0, layer] > 0).all())


def test_attention_needs_eager() -> None:
    m = _build("llama")
    m.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError):
        ref.attention_to_positions(m, _ids(30, 1, 4), None, key_mask=torch.ones(1, 4, dtype=torch.bool))


# ----------------------------------------------------------------- generation


def test_generation_scale_zero_equals_generate(model: Any) -> None:
    prompt = _ids(31, 1, 5)
    n = 6
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        gen = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n
        )
    expected = gen[0, prompt.shape[1] :].tolist()
    for layer in (None, 1):
        got = ref.greedy_generate_injected(
            model,
            prompt,
            layer=layer,
            vector=_vec(model, 32)[0],
            scale=0.0,
            start=2,
            max_new_tokens=n,
            eos_token_id=eos,
        )
        assert got == expected


def test_generation_injected_equals_cached_hooked_generate(model: Any) -> None:
    """Cross-check against model.generate (KV cache) with a hook that injects at
    prompt positions >= start during prefill and at every decoded token after."""
    prompt = _ids(33, 1, 6)
    start, n, scale = 3, 5, 12.0
    vec = _vec(model, 34)[0]
    layer = 1

    def hook(mod: Any, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        T = hidden.shape[1]
        pm = torch.ones(T, dtype=torch.bool) if T == 1 else torch.arange(T) >= start
        hidden = hidden + scale * vec * pm[None, :, None]
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    h = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            gen = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=n,
                eos_token_id=None,
                pad_token_id=0,
            )
    finally:
        h.remove()
    got = ref.greedy_generate_injected(
        model, prompt, layer=layer, vector=vec, scale=scale, start=start, max_new_tokens=n
    )
    assert got == gen[0, prompt.shape[1] :].tolist()[: len(got)]
    plain = ref.greedy_generate_injected(
        model, prompt, layer=None, vector=None, scale=0.0, start=0, max_new_tokens=n
    )
    assert len(plain) == n
