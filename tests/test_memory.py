"""Memory estimates: parameter counts against real models, batch sizing, refusing what cannot fit."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from introspection_utils import load_model
from introspection_utils.models import memory

GEMMA2_9B = dict(model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000)


def test_parameter_count_matches_the_built_models(tiny):
    real = sum(p.numel() for p in tiny.torch_model.parameters())
    assert memory.parameter_count(tiny.torch_model.config) == pytest.approx(real, rel=1e-3)


@pytest.mark.integration
def test_parameter_count_matches_the_embedded_model(smollm):
    real = sum(p.numel() for p in smollm.torch_model.parameters())
    assert memory.parameter_count(smollm.torch_model.config) == pytest.approx(real, rel=1e-3)


def test_gemma2_9b_is_9_24_billion_parameters():
    config = AutoConfig.for_model(**GEMMA2_9B)
    assert memory.parameter_count(config) == pytest.approx(9.24e9, rel=5e-3)
    assert memory.model_bytes(config, torch.bfloat16) == 2 * memory.parameter_count(config)


def test_batch_bytes_grow_linearly_with_the_batch():
    config = AutoConfig.for_model(**GEMMA2_9B)
    one = memory.batch_bytes(config, torch.bfloat16, batch=1, prompt_tokens=175, suffix_tokens=30)
    assert memory.batch_bytes(config, torch.bfloat16, batch=8, prompt_tokens=175, suffix_tokens=30) == pytest.approx(
        8 * one, rel=1e-6)
    # the KV cache alone: 2 × layers × kv heads × head dim × tokens × 2 bytes
    assert one > 2 * 42 * 8 * 256 * 175 * 2


def test_batch_size_follows_free_memory_and_refuses_when_nothing_fits(tiny_llama, monkeypatch):
    one = memory.batch_bytes(tiny_llama.torch_model.config, tiny_llama.dtype, batch=1, prompt_tokens=175,
                             suffix_tokens=30)
    monkeypatch.setattr(memory, "free_bytes", lambda device: int(10.5 * one / 0.8))
    assert memory.choose_batch_size(tiny_llama, prompt_tokens=175, suffix_tokens=30) == 10
    monkeypatch.setattr(memory, "free_bytes", lambda device: one // 2)
    with pytest.raises(MemoryError, match="GiB"):
        memory.choose_batch_size(tiny_llama, prompt_tokens=175, suffix_tokens=30)


def test_a_model_that_cannot_fit_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 2**30)
    with pytest.raises(MemoryError, match=r"random:gemma-2-9b-it needs ~17\.2 GiB"):
        load_model("random:gemma-2-9b-it", dtype="bfloat16", device="cpu")


def test_free_ram_counts_the_reclaimable_page_cache():
    """MemAvailable, not MemFree: the page cache left by a model conversion must not make a model "not fit"."""
    import pathlib

    meminfo = pathlib.Path("/proc/meminfo")
    if not meminfo.is_file():
        pytest.skip("no /proc/meminfo (not Linux)")
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines()}
    free = memory.free_bytes(torch.device("cpu"))
    assert free >= fields["MemFree"] and abs(free - fields["MemAvailable"]) < 0.2 * fields["MemTotal"]
