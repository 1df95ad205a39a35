"""Generation under injection, the injection continuing on every generated token (the paper's protocol), one pass
per token; notebook 07's grading calls it."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from introspection_utils.engine.prompts import conversation_text, introspection_prompt
from introspection_utils.engine.traced_pass import Injection, Reads, traced_pass
from introspection_utils.engine.trials import Trial, check_trials
from introspection_utils.engine.vectors import concept_vectors, left_pad

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle


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
    if handle.remote is True:
        raise ValueError("generation keeps a KV cache here between steps, which NDIF cannot hold: generate with a "
                         "local model (measure, lenses and sweeps do run remotely)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    stops = torch.tensor(sorted(stop_token_ids(handle)))
    texts: list[str] = [""] * len(trials)
    groups: dict[int | None, list[int]] = defaultdict(list)  # one injection layer per batch; prompts may differ
    for index, trial in enumerate(trials):
        groups[trial.injection_layer if trial.injected else None].append(index)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=len(trials), desc="generating", disable=not progress)
    for layer, indices in groups.items():
        indices = sorted(indices, key=lambda i: len(trials[i].prompt))  # similar lengths, little padding
        for chunk_start in range(0, len(indices), batch_size):
            chunk = indices[chunk_start:chunk_start + batch_size]
            tokens = _generate_batch(handle, [trials[i] for i in chunk], layer, max_new_tokens, temperature,
                                     generator, stops)
            for i, row in zip(chunk, tokens, strict=True):
                texts[i] = handle.tokenizer.decode(row, skip_special_tokens=True)
            bar.update(len(chunk))
    bar.close()
    return texts


def _generate_batch(handle: ModelHandle, trials: list[Trial], layer: int | None, max_new_tokens: int,
                    temperature: float, generator: torch.Generator, stops: torch.Tensor) -> list[list[int]]:
    """Token ids generated for a batch of trials (prompts left-padded to one width): ``max_new_tokens`` steps,
    each row cut at its first stop token."""
    rows, device = len(trials), handle.device
    ids, attention, positions = left_pad([t.prompt.input_ids for t in trials], handle.tokenizer.pad_token_id)
    cache = DynamicCache(config=handle.torch_model.config)
    generated: list[torch.Tensor] = []
    done = torch.zeros(rows, dtype=torch.bool)
    for _ in range(max_new_tokens):
        token_pos = positions if not generated else positions[:, -1:]  # each row's own token positions
        # The window rule at this step's positions (never into the prompt's padding).
        injection = Injection.of(handle, trials, token_pos, layer=layer, valid=None if generated else attention)
        inputs = {"attention_mask": attention.to(device), "position_ids": token_pos.to(device), "cache": cache,
                  "use_cache": True, "logits_to_keep": 1}
        logits = traced_pass(handle, ids.to(device), inputs, injection=injection, reads=Reads(logits=True)).logits
        if temperature == 0:
            next_ids = logits.argmax(-1)
        else:
            next_ids = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
        generated.append(next_ids)
        done |= torch.isin(next_ids, stops)
        if done.all():
            break
        ids = next_ids[:, None]
        attention = torch.cat([attention, torch.ones(rows, 1, dtype=torch.long)], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    out = []
    stop_set = set(stops.tolist())
    for row in torch.stack(generated, dim=1).tolist():
        cut = next((k for k, token in enumerate(row) if token in stop_set), len(row))
        out.append(row[:cut])
    return out


def response_table(handle: ModelHandle, concepts: Sequence[str], scales: Sequence[float], *, layer: int,
                   samples: int = 1, max_new_tokens: int = 100, temperature: float = 0.0, seed: int = 0,
                   question: str | None = None, progress: bool = True) -> pd.DataFrame:
    """Free-text answers to the injected-thought prompt for every concept × scale × sample.

    Scale 0 rows are the no-injection controls (the same prompt, nothing injected; their ``concept`` is the word a
    false positive would be graded against). Columns: ``model, concept, layer, scale, sample, injected, question,
    conversation, response`` (``conversation``: the whole conversation the model saw, as plain turns — what the
    grader is shown); ``temperature`` and ``seed`` make sampling reproducible.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    handle.check_layer(layer)
    bank = concept_vectors(handle, concepts, progress=progress)
    prompt = introspection_prompt(handle, question)
    conversation = conversation_text(question)
    rows, trials = [], []
    for concept in concepts:
        vector = bank.get(concept, layer)
        for scale in scales:
            for sample in range(samples):
                trials.append(Trial(prompt, vector, float(scale)))
                rows.append({"model": handle.name, "concept": concept, "layer": layer, "scale": float(scale),
                             "sample": sample, "injected": float(scale) != 0.0, "question": prompt.question,
                             "conversation": conversation})
    texts = generate(handle, trials, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                     progress=progress)
    return pd.DataFrame(rows).assign(response=texts)
