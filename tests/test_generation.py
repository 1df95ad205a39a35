"""Generation under injection: greedy tokens against the reference, seeded sampling, injection on new tokens."""

from __future__ import annotations

import math

import pytest
import torch

from introspection_utils.engine import generation
from introspection_utils.engine.generation import generate, stop_token_ids
from introspection_utils.engine.measure import Trial
from introspection_utils.engine.prompts import chat_prompt, control_questions, introspection_prompt
from introspection_utils.engine.vectors import ConceptVector

STEPS = 6


def make_vector(handle, seed: int, layer: int = 0, norm: float = 8.0) -> ConceptVector:
    direction = torch.randn(handle.arch.d_model, generator=torch.Generator().manual_seed(seed))
    return ConceptVector(f"v{seed}", layer, direction / direction.norm() * norm, model=handle.name)


@pytest.fixture
def generated_tokens(monkeypatch):
    """Spy on the generation loop: ``tokens[id(trial)]`` is the list of ids generated for that trial."""
    tokens = {}
    real = generation._generate_batch

    def spy(handle, trials, *args, **kwargs):
        rows = real(handle, trials, *args, **kwargs)
        tokens.update({id(t): row for t, row in zip(trials, rows, strict=True)})
        return rows

    monkeypatch.setattr(generation, "_generate_batch", spy)
    return tokens


def cut_at_stop(handle, ids: list[int]) -> list[int]:
    stops = stop_token_ids(handle)
    return next((ids[:k] for k, token in enumerate(ids) if token in stops), ids)


def reference_greedy(oracle, handle, trial, steps: int = STEPS) -> list[int]:
    """The reference's greedy decoding (whole sequence recomputed each step, injection on every new token)."""
    injected = trial.vector is not None and trial.scale != 0
    return cut_at_stop(handle, oracle.ref.greedy_generate_injected(
        handle.torch_model, oracle.ids(trial.prompt), layer=trial.injection_layer if injected else None,
        vector=trial.vector.vector if injected else None, scale=trial.scale, start=trial.prompt.injection_start,
        max_new_tokens=steps))


def reference_greedy_prompt_only(oracle, handle, trial, steps: int = STEPS) -> list[int]:
    """Greedy decoding with the injection confined to the prompt's positions (stops at the prompt's end)."""
    ids, end, new = oracle.ids(trial.prompt), len(trial.prompt), []
    for _ in range(steps):
        positions = torch.arange(ids.shape[1])
        mask = ((positions >= trial.prompt.injection_start) & (positions < end))[None]
        logits = oracle.ref.injected_logits(handle.torch_model, ids, None, layer=trial.injection_layer,
                                            vectors=trial.vector.vector[None], scales=torch.tensor([trial.scale]),
                                            positions_mask=mask)
        new.append(int(logits[0, -1].argmax()))
        ids = torch.cat([ids, torch.tensor([[new[-1]]])], dim=1)
    return cut_at_stop(handle, new)


def test_greedy_generation_under_injection_equals_the_reference(tiny_perturbed, oracle, generated_tokens):
    handle = tiny_perturbed
    prompt = introspection_prompt(handle, control_questions(1)[0], frame="bare")
    v0, v1 = make_vector(handle, 1, layer=0), make_vector(handle, 2, layer=1)
    trials = [Trial(prompt), Trial(prompt, v0, 0.0), Trial(prompt, v0, 4.0), Trial(prompt, v0, -6.0),
              Trial(prompt, v1, 5.0)]
    texts = generate(handle, trials, max_new_tokens=STEPS)
    for trial, text in zip(trials, texts, strict=True):
        expected = reference_greedy(oracle, handle, trial)
        assert generated_tokens[id(trial)] == expected, trial
        assert text == handle.tokenizer.decode(expected, skip_special_tokens=True)
    assert generated_tokens[id(trials[0])] == generated_tokens[id(trials[1])]  # scale 0 = no injection
    assert generated_tokens[id(trials[2])] != generated_tokens[id(trials[0])]  # the injection does something


def test_injection_continues_on_generated_tokens(tiny_perturbed, oracle, generated_tokens):
    handle = tiny_perturbed
    prompt = introspection_prompt(handle, control_questions(2)[1], frame="bare")
    vector = make_vector(handle, 3, layer=handle.arch.n_layers - 1)  # acts on the injected positions' own logits
    continuing = Trial(prompt, vector, 10.0)  # "suffix": the paper's protocol
    prompt_only = Trial(prompt, vector, 10.0, window=(prompt.injection_start, len(prompt)))
    generate(handle, [continuing, prompt_only], max_new_tokens=STEPS)
    assert generated_tokens[id(continuing)] == reference_greedy(oracle, handle, continuing)
    assert generated_tokens[id(prompt_only)] == reference_greedy_prompt_only(oracle, handle, prompt_only)
    assert generated_tokens[id(continuing)] != generated_tokens[id(prompt_only)]


def test_seeded_sampling_is_reproducible(tiny_llama):
    prompt = chat_prompt(tiny_llama, [{"role": "user", "content": "Tell me a story."}])
    trials = [Trial(prompt), Trial(prompt, make_vector(tiny_llama, 4), 3.0), Trial(prompt)]
    first = generate(tiny_llama, trials, max_new_tokens=STEPS, temperature=1.0, seed=0)
    again = generate(tiny_llama, trials, max_new_tokens=STEPS, temperature=1.0, seed=0)
    other = generate(tiny_llama, trials, max_new_tokens=STEPS, temperature=1.0, seed=1)
    assert first == again
    assert first != other  # near-uniform sampling over 49k tokens: another seed gives other text
    assert first[0] != first[2]  # rows of one batch draw their own samples


def test_texts_come_back_in_input_order_across_groups(tiny_llama, generated_tokens):
    a = chat_prompt(tiny_llama, [{"role": "user", "content": "Hi"}])
    b = introspection_prompt(tiny_llama, control_questions(1)[0], frame="bare")
    v = make_vector(tiny_llama, 5, layer=1)
    trials = [Trial(b, v, 2.0), Trial(a), Trial(b), Trial(a, v, -2.0, window="all")]
    texts = generate(tiny_llama, trials, max_new_tokens=3, batch_size=1)
    for trial, text in zip(trials, texts, strict=True):
        assert text == generate(tiny_llama, [trial], max_new_tokens=3)[0]
        assert text == tiny_llama.tokenizer.decode(generated_tokens[id(trial)], skip_special_tokens=True)


def test_generation_stops_at_end_of_turn_tokens(tiny_llama):
    stops = stop_token_ids(tiny_llama)
    assert tiny_llama.tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    assert tiny_llama.tokenizer.eos_token_id in stops


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
    ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
    ({"temperature": math.nan}, "temperature must be >= 0, got nan"),
])
def test_bad_generation_settings_are_rejected_before_any_compute(tiny_llama, forbid_compute, kwargs, message):
    forbid_compute(tiny_llama)
    prompt = chat_prompt(tiny_llama, [{"role": "user", "content": "Hi"}])
    with pytest.raises(ValueError, match=message):
        generate(tiny_llama, [Trial(prompt)], **kwargs)


@pytest.mark.integration
def test_embedded_model_answers_paris(smollm):
    prompt = chat_prompt(smollm, [{"role": "user", "content": "What is the capital of France?"}])
    answer = generate(smollm, [Trial(prompt)], max_new_tokens=12)[0]
    assert "Paris" in answer


@pytest.mark.integration
def test_embedded_model_injected_generation_equals_the_reference(smollm, oracle, generated_tokens):
    prompt = introspection_prompt(smollm, control_questions(1)[0], frame="bare")
    trial = Trial(prompt, make_vector(smollm, 6, layer=10, norm=40.0), 4.0)
    plain = Trial(prompt)
    generate(smollm, [trial, plain], max_new_tokens=4)
    assert generated_tokens[id(trial)] == reference_greedy(oracle, smollm, trial, steps=4)
    assert generated_tokens[id(trial)] != generated_tokens[id(plain)]
