"""Shared fixtures: models load once per session (tiny random families and the embedded SmolLM2)."""

from __future__ import annotations

import pytest

from introspection_utils import load_model

TINY = ["tiny-llama", "tiny-gemma2", "tiny-gemma3", "tiny-qwen2"]


@pytest.fixture(scope="session", params=TINY)
def tiny(request):
    """Each tiny random family in turn (2 layers, d_model 64, the embedded model's tokenizer)."""
    return load_model(request.param)


@pytest.fixture(scope="session")
def tiny_llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (converted once into the cache directory)."""
    return load_model()
