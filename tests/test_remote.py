"""NDIF remote execution: the engine's traces survive nnsight's remote serialization (``remote="local"``, a dry run
with local modules hidden, no server), and ``remote=True`` fails fast with what to do when it can't work here."""

from __future__ import annotations

import time

import pytest
import torch

from introspection_utils import load_model
from introspection_utils.engine.measure import Trial, measure
from introspection_utils.engine.prompts import control_questions, introspection_prompt
from introspection_utils.engine.vectors import ConceptVector
from introspection_utils.experiments.sweeps import SweepSpec, scale_sweep


@pytest.fixture(scope="module")
def dry_run():
    return load_model("tiny-llama", remote="local")


def test_the_engine_gives_the_same_numbers_through_the_remote_path(dry_run, tiny_llama, oracle):
    prompts = [introspection_prompt(dry_run), introspection_prompt(dry_run, control_questions(1)[0])]
    vector = ConceptVector("x", 1, torch.randn(64, generator=torch.Generator().manual_seed(2)) * 3)
    trials = [Trial(p, vector, s) for p in prompts for s in (0.0, 2.0, -4.0)]
    remote = measure(dry_run, trials, lens=True, ablate=torch.ones(64))
    local = measure(tiny_llama, trials, lens=True, ablate=torch.ones(64))
    for name in ("logit_diff", "baseline", "lens"):
        torch.testing.assert_close(getattr(remote, name), getattr(local, name), atol=1e-5, rtol=0)
    plain = measure(dry_run, trials)
    oracle.assert_close(plain.logit_diff, oracle.logit_diff(tiny_llama, trials))


def test_a_sweep_runs_unchanged_through_the_remote_path(dry_run, tiny_llama):
    spec = SweepSpec.build(["Dust"], [0, 2, 8], [1], n_controls=2, n_random=1)
    remote = scale_sweep(dry_run, spec, progress=False).df
    local = scale_sweep(tiny_llama, spec, progress=False).df
    torch.testing.assert_close(torch.tensor(remote["delta"].values), torch.tensor(local["delta"].values),
                               atol=1e-5, rtol=0)


def test_remote_needs_a_hub_id(monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "key")
    for name in ("tiny-llama", "smollm2-135m-instruct"):
        with pytest.raises(ValueError, match="hub id"):
            load_model(name, remote=True)


def test_remote_needs_an_api_key(monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    with pytest.raises(ValueError, match="NDIF_API_KEY"):
        load_model("meta-llama/Llama-3.1-70B-Instruct", remote=True)


def test_remote_fails_fast_when_ndif_is_unreachable(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.setenv("NDIF_API_KEY", "key")
    monkeypatch.setattr(CONFIG.API, "HOST", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="unreachable"):
        load_model("meta-llama/Llama-3.1-70B-Instruct", remote=True)
    assert time.perf_counter() - start < 10


def test_unknown_remote_mode_is_refused():
    with pytest.raises(ValueError, match="remote must be"):
        load_model("tiny-llama", remote="yes")


def test_concept_vectors_run_through_the_remote_path(dry_run, tiny_llama):
    from introspection_utils.engine.vectors import concept_vectors

    kwargs = dict(baseline_words=["Desks", "Jackets"], cache=False, progress=False)
    remote = concept_vectors(dry_run, ["Dust"], **kwargs).vectors
    torch.testing.assert_close(remote, concept_vectors(tiny_llama, ["Dust"], **kwargs).vectors, atol=1e-5, rtol=0)
