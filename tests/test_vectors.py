"""Concept vectors: activations against the plain-PyTorch reference, the disk cache, random and file vectors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from introspection_utils.core.data import load_list
from introspection_utils.engine import vectors
from introspection_utils.engine.prompts import chat_prompt
from introspection_utils.engine.vectors import (
    ActivationCache,
    ConceptVector,
    concept_vectors,
    contrastive_vectors,
    cosine_similarity_matrix,
    last_token_activations,
    load_vector,
    random_vector,
    validate_concept,
)

WORDS = ["Dust", "Satellites"]
BASELINE = ["Desks", "Jackets", "Gondolas"]


def reference_activations(oracle, handle, texts, *, chat=True) -> torch.Tensor:
    """``[n, n_layers, d_model]`` from the reference, each text alone, prompts rendered here (not by the package)."""
    tok, out = handle.tokenizer, []
    for text in texts:
        if chat:
            rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True)
            ids = tok(rendered, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(text, add_special_tokens=True)["input_ids"]
        out.append(oracle.ref.last_token_activations(handle.torch_model, torch.tensor([ids]), None)[0])
    return torch.stack(out)


def reference_concept_vectors(oracle, handle, words, baseline) -> torch.Tensor:
    acts = reference_activations(oracle, handle, [f"Tell me about {w.lower()}" for w in [*words, *baseline]])
    return acts[: len(words)] - acts[len(words):].mean(0)


# ------------------------------------------------------------------ activations


def test_left_padded_batch_activations_equal_each_prompt_alone(tiny_perturbed, oracle):
    handle = tiny_perturbed
    texts = ["Hi", "Tell me about the history of origami in Japan, please, in detail.",
             "Why is the sky blue?"]
    prompts = [chat_prompt(handle, [{"role": "user", "content": t}]) for t in texts]
    assert len({len(p) for p in prompts}) == 3
    batched = last_token_activations(handle, prompts)
    assert batched.shape == (3, 2, 64) and batched.dtype == torch.float32
    for i, prompt in enumerate(prompts):
        oracle.assert_close(batched[i], last_token_activations(handle, [prompt])[0], tol=1e-5)
    oracle.assert_close(last_token_activations(handle, prompts, batch_size=2), batched, tol=1e-5)
    # the reference on the same left-padded batch, position ids from the mask
    width, pad = max(len(p) for p in prompts), handle.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + list(p.input_ids) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    oracle.assert_close(batched, oracle.ref.last_token_activations(handle.torch_model, ids, mask))
    oracle.assert_close(batched, reference_activations(oracle, handle, texts))


def test_concept_vectors_equal_word_minus_baseline_mean_from_the_reference(tiny_perturbed, oracle):
    bank = concept_vectors(tiny_perturbed, WORDS, baseline_words=BASELINE, cache=False, progress=False)
    assert bank.words == tuple(WORDS) and bank.vectors.shape == (2, 2, 64)
    assert bank.model == tiny_perturbed.name and bank.kind == "concept"
    oracle.assert_close(bank.vectors, reference_concept_vectors(oracle, tiny_perturbed, WORDS, BASELINE))
    vector = bank.get("Satellites", 1)
    assert (vector.concept, vector.layer, vector.kind, vector.model) == ("Satellites", 1, "concept",
                                                                         tiny_perturbed.name)
    assert torch.equal(vector.vector, bank.vectors[1, 1])
    oracle.assert_close(bank.norms(), bank.vectors.norm(dim=-1))


def test_default_baseline_is_the_papers_100_words(tiny_llama, oracle):
    bank = concept_vectors(tiny_llama, ["Dust"], cache=False, progress=False)
    expected = reference_concept_vectors(oracle, tiny_llama, ["Dust"], list(load_list("baseline_words")))
    oracle.assert_close(bank.vectors, expected)


def test_vector_bank_rejects_unknown_word_and_layer(tiny_llama):
    bank = concept_vectors(tiny_llama, ["Dust"], baseline_words=BASELINE, cache=False, progress=False)
    with pytest.raises(ValueError, match="concept 'Trumpets' is not in this bank"):
        bank.get("Trumpets", 0)
    with pytest.raises(ValueError, match=r"layer 2 is out of range for tiny-llama \(0\.\.1\)"):
        bank.get("Dust", 2)


def test_cosine_similarity_matrix_is_symmetric_with_unit_diagonal(tiny_llama):
    bank = concept_vectors(tiny_llama, WORDS + ["Trumpets"], baseline_words=BASELINE, cache=False, progress=False)
    sims = cosine_similarity_matrix(bank, 1)
    torch.testing.assert_close(sims, sims.T)
    torch.testing.assert_close(sims.diagonal(), torch.ones(3))
    expected = torch.nn.functional.cosine_similarity(bank.vectors[0, 1], bank.vectors[2, 1], dim=0)
    torch.testing.assert_close(sims[0, 2], expected)


# ------------------------------------------------------------------ cache


def _count_prompts(monkeypatch) -> list[str]:
    """Spy on ``last_token_activations``: the questions of the prompts that were really computed."""
    seen, real = [], vectors.last_token_activations

    def spy(handle, prompts, **kwargs):
        seen.extend(p.question for p in prompts)
        return real(handle, prompts, **kwargs)

    monkeypatch.setattr(vectors, "last_token_activations", spy)
    return seen


def test_second_call_loads_activations_from_disk(tiny_llama, isolated_cache, monkeypatch):
    first = concept_vectors(tiny_llama, WORDS, baseline_words=BASELINE, progress=False)
    folder = ActivationCache(tiny_llama).folder
    assert folder.is_relative_to(isolated_cache)
    assert len(list(folder.glob("*.pt"))) == 5 and not list(folder.glob("*.tmp"))

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(vectors, "last_token_activations", fail)
    second = concept_vectors(tiny_llama, WORDS, baseline_words=BASELINE, progress=False)
    assert torch.equal(first.vectors, second.vectors)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other-word"])
def test_corrupted_cache_entry_is_detected_and_rebuilt(tiny_llama, isolated_cache, monkeypatch, damage):
    first = concept_vectors(tiny_llama, WORDS, baseline_words=BASELINE, progress=False)
    store = ActivationCache(tiny_llama)
    path = store._path("Jackets")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a torch file" * 10)
    else:  # a well-formed entry, but for another word
        path.write_bytes(store._path("Desks").read_bytes())
    assert store.get("Jackets") is None and not path.exists()  # detected, removed
    seen = _count_prompts(monkeypatch)
    again = concept_vectors(tiny_llama, WORDS, baseline_words=BASELINE, progress=False)
    assert seen == ["Tell me about jackets"]
    assert torch.equal(first.vectors, again.vectors)
    assert path.exists()


def test_tampered_activation_fails_the_checksum(tiny_llama, isolated_cache):
    concept_vectors(tiny_llama, ["Dust"], baseline_words=BASELINE, progress=False)
    store = ActivationCache(tiny_llama)
    path = store._path("Dust")
    entry = torch.load(path, weights_only=True)
    entry["activation"][0, 0] += 1.0
    torch.save(entry, path)
    assert store.get("Dust") is None


def test_cache_key_names_model_revision_dtype_and_template(tiny, tiny_llama):
    base = ActivationCache(tiny_llama)
    assert base.folder == ActivationCache(tiny_llama).folder
    assert base.key["position"] == "last" and "Tell me about {word}" in base.key["template"]
    variants = []
    for field, value in [("dtype", torch.bfloat16), ("revision", "another-commit"), ("name", "tiny-other")]:
        other = copy.copy(tiny_llama)
        setattr(other, field, value)
        variants.append(ActivationCache(other).folder)
    variants.append(ActivationCache(tiny_llama, position="mean").folder)
    assert len({base.folder, *variants}) == 5
    if tiny.name != "tiny-llama":  # another family: other name, revision and (Gemma) template
        assert ActivationCache(tiny).folder != base.folder


# ------------------------------------------------------------------ random, contrastive, file vectors


def test_random_vectors_are_norm_matched_and_seeded(tiny_llama):
    bank = concept_vectors(tiny_llama, WORDS, baseline_words=BASELINE, cache=False, progress=False)
    dust, sat = bank.get("Dust", 1), bank.get("Satellites", 1)
    a, b, c = random_vector(dust, 0), random_vector(dust, 0), random_vector(dust, 1)
    assert a == b and torch.equal(a.vector, b.vector)
    assert not torch.equal(a.vector, c.vector) and a != c
    for r in (a, c):
        assert r.norm == pytest.approx(dust.norm, rel=1e-5)
        assert (r.kind, r.concept, r.layer, r.model) == ("random", "Dust", 1, tiny_llama.name)
    assert (a.seed, c.seed) == (0, 1) and "seed=0" in repr(a)
    # (seed, concept) picks the direction: the same at every layer of a concept, independent across concepts
    other = random_vector(sat, 0)
    assert abs(float(torch.nn.functional.cosine_similarity(other.vector, a.vector, dim=0))) < 0.9
    assert other.norm == pytest.approx(sat.norm, rel=1e-5)
    deeper = random_vector(bank.get("Dust", 0), 0)
    torch.testing.assert_close(deeper.vector / deeper.norm, a.vector / a.norm)
    assert abs(float(torch.nn.functional.cosine_similarity(a.vector, dust.vector, dim=0))) < 0.9


def test_concept_vectors_compare_by_value():
    v = torch.arange(4.0)
    a, b = ConceptVector("Dust", 1, v), ConceptVector("Dust", 1, v.clone())
    assert a == b and hash(a) == hash(b)
    assert a != ConceptVector("Dust", 1, v + 1) and a != ConceptVector("Dust", 0, v)
    assert a != ConceptVector("Dust", 1, v, kind="random", seed=0)
    assert repr(a) == "ConceptVector('Dust', layer=1, kind='concept', norm=3.74)"


@pytest.mark.parametrize("chat", [True, False])
def test_contrastive_vectors_equal_the_reference_difference(tiny_perturbed, oracle, chat):
    pairs = [("Hi! How are you?", "HI! HOW ARE YOU?"), ("dog", "animal")]
    bank = contrastive_vectors(tiny_perturbed, pairs, chat=chat)
    assert bank.words == ("Hi! How are you? -> HI! HOW ARE YOU?", "dog -> animal") and bank.kind == "contrastive"
    acts = reference_activations(oracle, tiny_perturbed, [t for pair in pairs for t in pair], chat=chat)
    oracle.assert_close(bank.vectors, acts[1::2] - acts[0::2])
    labelled = contrastive_vectors(tiny_perturbed, pairs[:1], chat=chat, labels=["caps"])
    assert labelled.words == ("caps",) and labelled.get("caps", 0).kind == "contrastive"
    with pytest.raises(ValueError, match="no contrastive pairs"):
        contrastive_vectors(tiny_perturbed, [])


@pytest.mark.parametrize("suffix", [".pt", ".npy"])
def test_load_vector_reads_torch_and_numpy_files(tiny_llama, tmp_path, suffix):
    values = torch.linspace(-1, 1, 64)
    path = tmp_path / f"caps{suffix}"
    torch.save(values, path) if suffix == ".pt" else np.save(path, values.numpy())
    vector = load_vector(tiny_llama, path, layer=1)
    assert (vector.concept, vector.layer, vector.kind, vector.model) == ("caps", 1, "file", "tiny-llama")
    torch.testing.assert_close(vector.vector, values)
    assert load_vector(tiny_llama, path, layer=0, name="shout").concept == "shout"


def test_load_vector_rejects_wrong_size_values_and_layer(tiny_llama, tmp_path):
    cases = {"short": torch.zeros(63), "matrix": torch.zeros(2, 64), "nan": torch.full((64,), float("nan"))}
    for name, tensor in cases.items():
        torch.save(tensor, tmp_path / f"{name}.pt")
    with pytest.raises(ValueError, match=r"shape \(63,\); tiny-llama needs \[64\]"):
        load_vector(tiny_llama, tmp_path / "short.pt", layer=0)
    with pytest.raises(ValueError, match=r"shape \(2, 64\)"):
        load_vector(tiny_llama, tmp_path / "matrix.pt", layer=0)
    with pytest.raises(ValueError, match="non-finite"):
        load_vector(tiny_llama, tmp_path / "nan.pt", layer=0)
    torch.save(torch.zeros(64), tmp_path / "ok.pt")
    with pytest.raises(ValueError, match=r"0\.\.1"):
        load_vector(tiny_llama, tmp_path / "ok.pt", layer=5)


# ------------------------------------------------------------------ bad input, before any compute


@pytest.mark.parametrize("word", ["a phrase of far too many words", "", "   ", "123", None])
def test_unknown_concept_is_rejected_before_any_compute(tiny_llama, forbid_compute, word):
    forbid_compute(tiny_llama)
    with pytest.raises(ValueError, match="concept"):
        concept_vectors(tiny_llama, ["Dust", word], baseline_words=BASELINE, cache=False)


def test_validate_concept_accepts_words_and_short_phrases_and_points_longer_text_to_contrastive_vectors():
    assert validate_concept("Dust") == "Dust" and validate_concept("Zebra") == "Zebra"
    assert validate_concept("ice cream") == "ice cream"  # "Tell me about ice cream": the paper's recipe on a phrase
    for bad in ("the smell of rain after a long day", "1234", " ice cream", "ice\ncream"):
        with pytest.raises(ValueError, match="contrastive_vectors"):
            validate_concept(bad)


def test_no_concept_words_is_an_error_before_any_compute(tiny_llama, forbid_compute):
    forbid_compute(tiny_llama)
    with pytest.raises(ValueError, match="no concept words"):
        concept_vectors(tiny_llama, [], baseline_words=BASELINE, cache=False)


# ------------------------------------------------------------------ embedded model


@pytest.mark.integration
def test_embedded_model_concept_vectors_match_the_reference(smollm, oracle):
    bank = concept_vectors(smollm, ["Dust"], baseline_words=BASELINE[:2], cache=False, progress=False)
    assert bank.vectors.shape == (1, 30, 576)
    oracle.assert_close(bank.vectors, reference_concept_vectors(oracle, smollm, ["Dust"], BASELINE[:2]))


def test_with_random_puts_the_concept_vector_first_then_seeded_randoms(tiny_llama):
    from introspection_utils.engine.vectors import with_random

    dust = concept_vectors(tiny_llama, WORDS, baseline_words=BASELINE, cache=False, progress=False).get("Dust", 1)
    vectors = with_random(dust, 2, seed=5)
    assert vectors[0] is dust and [v.seed for v in vectors[1:]] == [5, 6]
    assert all(v.kind == "random" and v.norm == pytest.approx(dust.norm, rel=1e-5) for v in vectors[1:])
