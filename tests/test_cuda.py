"""The GPU path: the engine on a CUDA device agrees with the float32 plain-hook reference run on the CPU.

Skipped where no CUDA device is visible (marker ``cuda``: ``pytest -m cuda`` selects these alone). The reference
numbers come from the CPU float32 tiny families (``tests/conftest.py`` pins them there on every machine); the models
under test are the same weights moved to the GPU, in float32 and in bfloat16 (the dtype researchers run Gemma-2 in).
The bf16 checks are ``tests/test_bfloat16.py``'s own tests, collected here a second time with ``pair`` meaning
(CPU float32 reference, CUDA bf16 copy): one set of tolerances for both devices. The engine returns its readouts on
the CPU in float32 whatever the model's device (``engine/traced_pass.py``), which the comparisons rely on.
"""

from __future__ import annotations

import pytest
import torch
from test_bfloat16 import (  # noqa: F401  (collected here again with this module's ``pair``)
    copied,
    test_bf16_ablated_logits_agree_with_float32,
    test_bf16_attention_agrees_with_the_float32_reference,
    test_bf16_attribution_and_patching_agree_with_float32,
    test_bf16_cached_and_full_strategies_agree,
    test_bf16_concept_vectors_point_where_the_float32_ones_do,
    test_bf16_generation_runs_and_starts_like_float32_where_the_choice_is_clear,
    test_bf16_measure_agrees_with_the_float32_reference,
    test_bf16_residuals_agree_with_the_float32_engine,
    trials_of,
)
from transformers import AutoConfig

from introspection_utils.engine import measure as measure_module
from introspection_utils.engine.measure import measure, residuals
from introspection_utils.models.handle import load_model
from introspection_utils.models.memory import check_fits, model_bytes

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible here")]

FP32_TOL = 1e-3  # GPU float32 vs CPU float32: other reduction orders, no TF32 (torch's default for matmuls)


@pytest.fixture(scope="module")
def pair(tiny_perturbed):
    """``(CPU float32 reference, its CUDA bfloat16 copy)`` for each tiny family."""
    return tiny_perturbed, copied(tiny_perturbed, torch.bfloat16, "cuda")


@pytest.fixture(scope="module")
def fp32_pair(tiny_perturbed):
    return tiny_perturbed, copied(tiny_perturbed, torch.float32, "cuda")


def test_cuda_float32_measure_equals_the_cpu_reference(fp32_pair, oracle):
    cpu, gpu = fp32_pair
    assert gpu.device.type == "cuda"
    trials = trials_of(cpu)
    got = measure(gpu, trials, lens=True)
    assert got.logit_diff.device.type == "cpu" and got.logit_diff.dtype == torch.float32
    oracle.assert_close(got.logit_diff, oracle.logit_diff(cpu, trials), tol=FP32_TOL)
    oracle.assert_close(got.lens, oracle.lens(cpu, trials), tol=FP32_TOL)
    expected = oracle.readout(cpu, trials)
    oracle.assert_close(got.answer_mass, expected["mass"], tol=FP32_TOL)


def test_cuda_residuals_equal_the_cpu_engine(fp32_pair):
    """The last position's layer outputs read on the GPU (every window rule of ``trials_of``) are the CPU's."""
    cpu, gpu = fp32_pair
    trials = trials_of(cpu)
    got, expected = residuals(gpu, trials, [0, 1]), residuals(cpu, trials, [0, 1])
    scale = max(1.0, float(expected.abs().max()))
    assert float((got - expected).abs().max()) <= FP32_TOL * scale


def test_load_model_on_cuda_places_every_weight_and_defaults_to_bf16():
    handle = load_model("tiny-llama", device="cuda")
    assert handle.dtype == torch.bfloat16 and handle.device.type == "cuda"
    assert {p.device.type for p in handle.torch_model.parameters()} == {"cuda"}
    assert {p.dtype for p in handle.torch_model.parameters()} == {torch.bfloat16}
    assert load_model("tiny-llama", device="cuda", dtype="auto").dtype == torch.bfloat16
    fp32 = load_model("tiny-llama", device="cuda", dtype="float32")
    assert {p.dtype for p in fp32.torch_model.parameters()} == {torch.float32}


def test_cuda_batch_size_comes_from_free_memory(pair):
    """On a GPU the engine sizes its batches from the free memory (on a CPU it keeps ``DEFAULT_BATCH``)."""
    cpu, gpu = pair
    trials = trials_of(cpu)
    assert measure_module._auto_batch_size(cpu, trials) == measure_module.DEFAULT_BATCH
    assert measure_module._auto_batch_size(gpu, trials) > measure_module.DEFAULT_BATCH
    # a tiny model on a GPU: the limit


def test_a_model_too_large_for_the_gpu_is_refused_before_loading():
    """``check_fits`` reads the GPU's free memory: a config with more layers than fit is refused with the sizes,
    nothing allocated."""
    free, _ = torch.cuda.mem_get_info()
    config = AutoConfig.for_model("llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=1,
                                  vocab_size=128256, num_attention_heads=64, num_key_value_heads=8)
    one = model_bytes(config, torch.float32)
    config.num_hidden_layers = 2
    per_layer = model_bytes(config, torch.float32) - one
    config.num_hidden_layers = int(free / per_layer) + 2
    assert model_bytes(config, torch.float32) > free
    before = torch.cuda.memory_allocated()
    with pytest.raises(MemoryError, match=r"GiB is free on cuda"):
        check_fits(config, torch.float32, torch.device("cuda"), name="too-large")
    assert torch.cuda.memory_allocated() == before


def test_bf16_on_cuda_is_the_same_readout_as_bf16_on_cpu_within_rounding(pair):
    """The two bf16 paths (CPU kernels, GPU kernels) differ only by bf16 rounding order: same tolerance as each
    against float32."""
    from test_bfloat16 import LOGIT_TOL, as_bfloat16, assert_agrees

    cpu, gpu = pair
    trials = trials_of(cpu)
    assert_agrees(measure(gpu, trials).logit_diff, measure(as_bfloat16(cpu), trials).logit_diff, tol=2 * LOGIT_TOL,
                  what="bf16 GPU vs bf16 CPU")
