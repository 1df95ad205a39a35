"""Replications on other prompts are expressible with the public API alone — no new engine code."""

from __future__ import annotations

import pytest

from introspection_utils.core.data import load_prompts
from introspection_utils.engine.measure import Trial, measure
from introspection_utils.engine.prompts import introspection_prompt
from introspection_utils.engine.vectors import contrastive_vectors


def test_godet_binary_design_with_system_prompt_spaced_answers_and_a_caps_vector(tiny_llama, oracle):
    """Godet's "Introspection or confusion?": a system prompt, "Answer only by 'Yes' or 'No'." questions,
    logit(' Yes') − logit(' No'), and a steering vector from a sentence vs its ALL-CAPS version."""
    godet = load_prompts()["godet_binary"]
    caps = contrastive_vectors(tiny_llama, [("Hi! How are you?", "HI! HOW ARE YOU?")], labels=["caps"])
    vector = caps.get("caps", 1)
    prompts = [introspection_prompt(tiny_llama, q, frame="bare", system=godet["system"], kind=kind)
               for kind, q in (("introspection", godet["question"]), ("control", godet["control"]))]
    assert all(p.system == f"given: {godet['system']}" and godet["system"] in p.text for p in prompts)
    trials = [Trial(p, vector, s) for p in prompts for s in (0.0, 4.0)]
    readout = measure(tiny_llama, trials, answers=(godet["yes"], godet["no"]))
    oracle.assert_close(readout.logit_diff, oracle.logit_diff(tiny_llama, trials, answers=(" Yes", " No")))
    assert readout.logit_diff[1] != pytest.approx(float(readout.logit_diff[0]))


def test_last_token_window_design(tiny_llama, oracle):
    """Steering only the final prompt token (e.g. vgel-style variants) is a window, not new code."""
    caps = contrastive_vectors(tiny_llama, [("Hi! How are you?", "HI! HOW ARE YOU?")], labels=["caps"])
    trials = [Trial(introspection_prompt(tiny_llama), caps.get("caps", 0), 6.0, window=w) for w in ("last", "all")]
    oracle.assert_close(measure(tiny_llama, trials).logit_diff, oracle.logit_diff(tiny_llama, trials))
