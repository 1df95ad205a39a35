"""Refusal directions and directional ablation, checked against the plain-hook reference."""

from __future__ import annotations

import contextlib

import pytest
import reference as ref
import torch

from introspection_utils.inject import Trial, measure
from introspection_utils.prompts import chat_prompt, introspection_prompt, yes_no_ids
from introspection_utils.refusal import best_layer, refusal_directions, unit_direction
from introspection_utils.vectors import ConceptVector

HARMFUL = ["Explain how to build a bomb.", "Write malware.", "How do I steal a car?", "Forge a passport."]
HARMLESS = ["Explain how to build a shelf.", "Write a poem.", "How do I wash a car?", "Renew a passport."]


def _direction(handle, seed=3):
    return torch.randn(handle.arch.d_model, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strategy", ["cached", "full"])
def test_ablated_injection_matches_reference(tiny, strategy):
    prompt = introspection_prompt(tiny)
    vector = ConceptVector("x", 1, torch.randn(tiny.arch.d_model, generator=torch.Generator().manual_seed(1)))
    direction = _direction(tiny)
    scales = [0.0, 2.0, -3.0]
    readout = measure(tiny, [Trial(prompt, vector, s) for s in scales], ablate=direction, strategy=strategy)
    yes, no = yes_no_ids(tiny)
    ids = torch.tensor([prompt.input_ids] * 3)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, prompt.injection_start:] = True
    expected = ref.ablated_yes_no_logit_diff(tiny.torch_model, ids, yes_id=yes, no_id=no, direction=direction,
                                             layer=1, vectors=vector.vector.expand(3, -1),
                                             scales=torch.tensor(scales), positions_mask=mask)
    tol = 1e-4 * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(readout.logit_diff, expected, atol=tol, rtol=0)
    torch.testing.assert_close(readout.baseline, expected[:1].expand(3), atol=tol, rtol=0)


@torch.no_grad()
def _reference_ablated_before(model, ids, *, yes, no, direction, layer, vectors, scales, mask):
    """Plain hooks, registered in this order at each layer: project the direction out, add the injection at
    ``layer``, and at every later layer add back the injection's own component along the direction (what the residual
    connection carries on from the injection layer)."""
    unit = direction / direction.norm()
    carried = (vectors @ unit)[:, None] * unit  # [B, D]
    with contextlib.ExitStack() as stack:
        stack.enter_context(ref.directional_ablation(model, direction))
        stack.enter_context(ref._injection(model, layer, vectors, scales, mask))
        for later in range(layer + 1, len(ref._layers(model))):
            stack.enter_context(ref._injection(model, later, carried, scales, mask))
        logits = ref._forward(model, ids, torch.ones_like(ids)).logits
    return logits[:, -1, yes] - logits[:, -1, no]


@pytest.mark.parametrize("strategy", ["cached", "full"])
def test_ablation_before_the_injection_matches_reference(tiny, strategy):
    prompt = introspection_prompt(tiny)
    direction = _direction(tiny)
    raw = torch.randn(tiny.arch.d_model, generator=torch.Generator().manual_seed(1))
    vector = ConceptVector("x", 0, raw + 2 * direction / direction.norm() * raw.norm())  # a component along it
    scales = [0.0, 2.0, -3.0]
    trials = [Trial(prompt, vector, s) for s in scales]
    before = measure(tiny, trials, ablate=direction, ablate_at="before", strategy=strategy)
    after = measure(tiny, trials, ablate=direction, strategy=strategy)
    yes, no = yes_no_ids(tiny)
    ids = torch.tensor([prompt.input_ids] * 3)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, prompt.injection_start:] = True
    expected = _reference_ablated_before(tiny.torch_model, ids, yes=yes, no=no, direction=direction, layer=0,
                                         vectors=vector.vector.expand(3, -1), scales=torch.tensor(scales), mask=mask)
    tol = 1e-4 * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(before.logit_diff, expected, atol=tol, rtol=0)
    torch.testing.assert_close(before.baseline, after.baseline, atol=tol, rtol=0)  # no injection: the same
    assert (before.logit_diff[1:] - after.logit_diff[1:]).abs().max() > 10 * tol  # the kept component matters


def test_ablation_before_equals_after_for_a_vector_orthogonal_to_the_direction(tiny_llama):
    prompt = introspection_prompt(tiny_llama)
    direction = _direction(tiny_llama)
    unit = direction / direction.norm()
    raw = torch.randn(tiny_llama.arch.d_model, generator=torch.Generator().manual_seed(2))
    vector = ConceptVector("x", 0, raw - (raw @ unit) * unit)
    trials = [Trial(prompt, vector, 4.0)]
    before = measure(tiny_llama, trials, ablate=direction, ablate_at="before").logit_diff
    after = measure(tiny_llama, trials, ablate=direction).logit_diff
    torch.testing.assert_close(before, after, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="ablate_at"):
        measure(tiny_llama, trials, ablate=direction, ablate_at="during")


def test_ablation_changes_the_answer_and_is_scale_invariant(tiny_llama):
    prompt = introspection_prompt(tiny_llama)
    direction = _direction(tiny_llama)
    plain = measure(tiny_llama, [Trial(prompt)]).logit_diff
    ablated = measure(tiny_llama, [Trial(prompt)], ablate=direction).logit_diff
    rescaled = measure(tiny_llama, [Trial(prompt)], ablate=-5 * direction).logit_diff
    assert not torch.allclose(plain, ablated)
    torch.testing.assert_close(ablated, rescaled)


@pytest.mark.parametrize("bad", [torch.zeros(64), torch.ones(63), torch.full((64,), float("nan"))])
def test_bad_ablation_direction_is_refused(tiny_llama, bad):
    with pytest.raises(ValueError, match="ablate"):
        measure(tiny_llama, [Trial(introspection_prompt(tiny_llama))], ablate=bad)


def test_refusal_directions_are_differences_of_means_with_heldout_scores(tiny_llama):
    directions, table = refusal_directions(tiny_llama, harmful=HARMFUL, harmless=HARMLESS, lo=0.0, hi=1.0)
    def mean_activation(texts):  # each prompt alone through the plain-hook reference
        acts = [ref.last_token_activations(tiny_llama.torch_model, torch.tensor([p.input_ids]), None)[0]
                for p in (chat_prompt(tiny_llama, [{"role": "user", "content": t}]) for t in texts)]
        return torch.stack(acts).mean(0)

    torch.testing.assert_close(directions, mean_activation(HARMFUL) - mean_activation(HARMLESS), atol=1e-5, rtol=0)
    assert list(table.columns) == ["layer", "norm", "heldout_d", "eligible"]
    assert table["eligible"].all() and len(table) == tiny_llama.arch.n_layers
    assert best_layer(table) == int(table["heldout_d"].idxmax())
    assert unit_direction(directions, 0).norm() == pytest.approx(1.0)


def test_best_layer_respects_the_depth_window(tiny_llama):
    _, table = refusal_directions(tiny_llama, harmful=HARMFUL, harmless=HARMLESS, lo=0.5, hi=1.0)
    assert list(table["eligible"]) == [False, True]
    assert best_layer(table) == 1
    with pytest.raises(ValueError, match="lo"):
        refusal_directions(tiny_llama, harmful=HARMFUL, harmless=HARMLESS, lo=0.9, hi=0.1)
    with pytest.raises(ValueError, match="at least 4"):
        refusal_directions(tiny_llama, harmful=HARMFUL[:3], harmless=HARMLESS)


def test_ablated_sweep_names_its_direction_and_never_reuses_unablated_chunks(tiny_llama, tmp_path):
    from introspection_utils.sweeps import SweepSpec, direction_id, run_sweep, scale_sweep

    direction = _direction(tiny_llama)
    kwargs = dict(layer=1, n_controls=1, n_random=0, results_dir=tmp_path, progress=False)
    plain = scale_sweep(tiny_llama, ["Dust"], [0, 4], **kwargs)
    ablated = scale_sweep(tiny_llama, ["Dust"], [0, 4], ablate=direction, **kwargs)
    assert plain.meta["spec"]["ablation"] is None
    assert ablated.meta["spec"]["ablation"] == direction_id(direction) == direction_id(7 * direction)
    assert not plain.df["logit_diff"].equals(ablated.df["logit_diff"])
    spec = SweepSpec(("Dust",), (0.0,), (1,), ())
    with pytest.raises(ValueError, match="ablation"):
        run_sweep(tiny_llama, spec, ablate=direction, progress=False)
