"""Memory estimates of a model and a batch of trials: the batch size the engine picks, and the load the handle
refuses when it cannot fit."""

from __future__ import annotations

import os
from typing import Any, Protocol

import torch

GIB = 1024**3


class LoadedModel(Protocol):
    """What the batch-size choice reads off a loaded model (a :class:`~introspection_utils.models.handle.ModelHandle`;
    ``models`` imports this module, so it is named here by shape, not imported)."""

    name: str
    dtype: torch.dtype

    @property
    def torch_model(self) -> torch.nn.Module: ...

    @property
    def device(self) -> torch.device: ...


def parameter_count(config: Any) -> int:
    """Parameters of a decoder-only transformer from its config (embeddings counted once when tied)."""
    cfg = config.get_text_config()
    d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    attention = d * head_dim * (2 * cfg.num_attention_heads + 2 * kv_heads)
    mlp = 3 * d * cfg.intermediate_size
    embeddings = vocab * d * (1 if getattr(cfg, "tie_word_embeddings", True) else 2)
    return layers * (attention + mlp + 4 * d) + embeddings


def bytes_per_element(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def model_bytes(config: Any, dtype: torch.dtype) -> int:
    """Bytes the weights take in ``dtype``."""
    return parameter_count(config) * bytes_per_element(dtype)


def batch_bytes(config: Any, dtype: torch.dtype, *, batch: int, prompt_tokens: int, suffix_tokens: int) -> int:
    """Bytes one batched trace of ``batch`` trials needs beyond the weights.

    KV cache ``2 × layers × kv_heads × head_dim × prompt_tokens`` per row; the suffix's hidden and MLP activations
    (``suffix × (4·d + 2·intermediate)`` per row, a few live at once); one layer's eager attention weights
    (``heads × suffix × prompt`` per row, float32); the last position's logits (``vocab`` per row, float32).
    """
    cfg = config.get_text_config()
    size = bytes_per_element(dtype)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    kv_cache = 2 * cfg.num_hidden_layers * kv_heads * head_dim * prompt_tokens * size
    activations = suffix_tokens * (4 * cfg.hidden_size + 2 * cfg.intermediate_size) * size
    attention = cfg.num_attention_heads * suffix_tokens * prompt_tokens * 4
    logits = cfg.vocab_size * 4
    return int(batch * (kv_cache + 1.25 * (activations + attention + logits)))


def free_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, or the system's available RAM — Linux's ``MemAvailable``,
    which counts the page cache the kernel gives back (after converting a 7 GB model most RAM is cache, and
    ``MemFree`` alone would refuse a model that fits)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass  # not Linux
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_batch_size(handle: LoadedModel, *, prompt_tokens: int, suffix_tokens: int, limit: int = 256,
                      headroom: float = 0.8) -> int:
    """The largest batch (at most ``limit``) whose estimate fits in ``headroom`` × the free memory.

    Raises ``MemoryError`` saying what was needed when not even one trial fits.
    """
    config, device = handle.torch_model.config, handle.device
    available = headroom * free_bytes(device)
    one = batch_bytes(config, handle.dtype, batch=1, prompt_tokens=prompt_tokens, suffix_tokens=suffix_tokens)
    if one > available:
        raise MemoryError(f"one trial of {prompt_tokens} tokens on {handle.name} needs ~{one / GIB:.2f} GiB; "
                          f"{available / GIB:.2f} GiB is free on {device}. Use a shorter prompt, a smaller dtype, "
                          f"or shard the model (load_model(..., device_map='auto')).")
    return max(1, min(limit, int(available // one)))


def check_fits(config: Any, dtype: torch.dtype, device: torch.device, *, name: str) -> None:
    """Refuse to load a model whose weights cannot fit in the free memory of ``device`` (one clear error)."""
    need, free = model_bytes(config, dtype), free_bytes(device)
    if need > free:
        raise MemoryError(f"{name} needs ~{need / GIB:.1f} GiB for its weights in {str(dtype).removeprefix('torch.')}"
                          f"; {free / GIB:.1f} GiB is free on {device}. Try dtype='bfloat16', "
                          f"device_map='auto' (several GPUs), or remote=True (NDIF).")
