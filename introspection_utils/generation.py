"""Generation under injection: the injection continues on every generated token (the paper's protocol).

A plain loop of traced forwards with a KV cache, one token per step, so each step's injection is the same trace
block as the readouts' and sampling is seeded by a ``torch.Generator`` of our own (same seed, same text).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from introspection_utils.inject import Trial, check_trials

if TYPE_CHECKING:
    from introspection_utils.models import ModelHandle


def stop_token_ids(handle: ModelHandle) -> set[int]:
    """End-of-sequence and end-of-turn ids (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``...)."""
    ids = {handle.tokenizer.eos_token_id}
    configured = handle.torch_model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    for token in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
        token_id = handle.tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != handle.tokenizer.unk_token_id:
            ids.add(token_id)
    return {i for i in ids if i is not None}


def generate(handle: ModelHandle, trials: Sequence[Trial], *, max_new_tokens: int = 100, temperature: float = 0.0,
             seed: int = 0, batch_size: int = 16, progress: bool = False) -> list[str]:
    """Continue each trial's prompt under its injection; returns the generated text per trial (order kept).

    ``temperature=0`` is greedy; otherwise sampling from ``softmax(logits / temperature)`` with a generator seeded
    by ``seed`` (per batch, so the same call gives the same texts). Injection applies at generated positions when
    the trial's window runs to the end (``"suffix"``, ``"all"`` or ``(start, None)``).
    """
    check_trials(handle, trials)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    stops = torch.tensor(sorted(stop_token_ids(handle)))
    texts: list[str] = [""] * len(trials)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, trial in enumerate(trials):
        groups[(trial.prompt, trial.span(), trial.injection_layer if trial.injected else None)].append(index)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=len(trials), desc="generating", disable=not progress)
    for (prompt, (start, end), layer), indices in groups.items():
        for chunk_start in range(0, len(indices), batch_size):
            chunk = indices[chunk_start:chunk_start + batch_size]
            tokens = _generate_batch(handle, [trials[i] for i in chunk], prompt.input_ids, start, end, layer,
                                     max_new_tokens, temperature, generator, stops)
            for i, row in zip(chunk, tokens, strict=True):
                texts[i] = handle.tokenizer.decode(row, skip_special_tokens=True)
            bar.update(len(chunk))
    bar.close()
    return texts


def _generate_batch(handle: ModelHandle, trials: list[Trial], prompt_ids: tuple[int, ...], start: int,
                    end: int | None, layer: int | None, max_new_tokens: int, temperature: float,
                    generator: torch.Generator, stops: torch.Tensor) -> list[list[int]]:
    """Token ids generated for a batch of trials on one prompt: ``max_new_tokens`` steps, cut at a stop token."""
    rows, device = len(trials), handle.device
    add = None
    if layer is not None:
        add = torch.stack([t.scale * t.vector.vector for t in trials]).to(device, handle.dtype)  # [B, D]
    ids = torch.tensor([prompt_ids], device=device).expand(rows, -1)
    cache = DynamicCache(config=handle.torch_model.config)
    generated: list[torch.Tensor] = []
    length, done = 0, torch.zeros(rows, dtype=torch.bool)
    for _ in range(max_new_tokens):
        positions = torch.arange(length, length + ids.shape[1], device=device)
        in_window = (positions >= start) & (positions < (end if end is not None else 1 << 62))
        mask = in_window.to(handle.dtype)
        length += ids.shape[1]
        with torch.no_grad(), handle.model.trace(
                ids, attention_mask=torch.ones(rows, length, dtype=torch.long, device=device),
                position_ids=positions[None].expand(rows, -1), cache=cache, use_cache=True, logits_to_keep=1):
            if add is not None:
                handle.layers[layer].output += add[:, None, :] * mask[None, :, None]
            logits = handle.model.output.logits[:, -1, :].save()
        logits = logits.float().cpu()
        if temperature == 0:
            next_ids = logits.argmax(-1)
        else:
            next_ids = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
        generated.append(next_ids)
        done |= torch.isin(next_ids, stops)
        if done.all():
            break
        ids = next_ids[:, None].to(device)
    out = []
    for row in torch.stack(generated, dim=1).tolist():
        cut = next((k for k, token in enumerate(row) if token in set(stops.tolist())), len(row))
        out.append(row[:cut])
    return out
