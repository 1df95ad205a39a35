"""Model families: everything model-specific about each supported transformers class, one entry per family (paths,
norms, test template, tiny model); the handle reads it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, Qwen2Config


@dataclass(frozen=True)
class Family:
    """Everything model-specific about a causal-LM class: where it keeps its parts (attribute paths from the
    top-level module), its sublayer norms, the chat template a test model of it gets, and its tiny test model.

    The logit softcap and whether the template has a system role are read from each model's config and template
    (:class:`Architecture`), so a family entry holds only what cannot be read there."""

    layers: str
    final_norm: str
    lm_head: str = "lm_head"
    embeddings: str = "model.embed_tokens"
    # Gemma-2/3: an RMS norm on the attention output and on the MLP output before each residual add
    # (post_attention_layernorm / post_feedforward_layernorm); elsewhere post_attention_layernorm is the pre-MLP norm.
    sublayer_norms: bool = False
    # The chat template (``data/``) a test model of this family (tiny or random, on the embedded model's tokenizer)
    # gets: Gemma's have no system role. None: the embedded tokenizer's own (ChatML).
    template: str | None = None
    # The family's 2-layer random test model, loaded as ``tiny-<tiny>``: its config from the common tiny fields
    # (:data:`TINY_FIELDS`, with the embedded tokenizer's vocabulary) plus what gives it the real model's structure.
    tiny: str | None = None
    tiny_config: Callable[[dict[str, Any]], Any] | None = field(default=None, compare=False)


TINY_FIELDS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                   pad_token_id=2, tie_word_embeddings=True)
_ALTERNATING = ["sliding_attention", "full_attention"]  # Gemma-2/3: sliding-window and full layers alternate

# One entry per supported architecture; adding a family = one entry here (with its tiny model, which puts it under
# every engine test against the plain-hook reference). docs/design.md has the checklist.
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("model.layers", "model.norm", tiny="llama", tiny_config=lambda c: LlamaConfig(**c)),
    "MistralForCausalLM": Family("model.layers", "model.norm"),
    "Qwen2ForCausalLM": Family("model.layers", "model.norm", tiny="qwen2", tiny_config=lambda c: Qwen2Config(**c)),
    "Qwen3ForCausalLM": Family("model.layers", "model.norm"),
    "GemmaForCausalLM": Family("model.layers", "model.norm", template="gemma"),
    "Gemma2ForCausalLM": Family(  # the real model's structure: both softcaps, sliding-window and full layers
        "model.layers", "model.norm", sublayer_norms=True, template="gemma", tiny="gemma2",
        tiny_config=lambda c: Gemma2Config(**c, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                                           sliding_window=8, layer_types=_ALTERNATING, query_pre_attn_scalar=16)),
    "Gemma3ForCausalLM": Family(
        "model.layers", "model.norm", sublayer_norms=True, template="gemma3", tiny="gemma3",
        tiny_config=lambda c: Gemma3TextConfig(**c, sliding_window=8, layer_types=_ALTERNATING,
                                               query_pre_attn_scalar=16)),
    "Gemma3ForConditionalGeneration": Family("model.language_model.layers", "model.language_model.norm",
                                             embeddings="model.language_model.embed_tokens", sublayer_norms=True,
                                             template="gemma3"),
}
# The tiny test models by short name, in a fixed order: tiny-llama, tiny-gemma2, tiny-gemma3, tiny-qwen2.
TINY = {f.tiny: f for f in sorted((f for f in FAMILIES.values() if f.tiny), key=lambda f: (f.tiny != "llama", f.tiny))}
TINY_FAMILIES = tuple(TINY)
