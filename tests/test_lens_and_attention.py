"""The logit lens per layer (:mod:`introspection_utils.experiments.logit_lens`) and the attention maps from a
prefilled answer token to the injected positions (:mod:`introspection_utils.experiments.attention`) as tidy tables.
Run on tiny-llama (fast, random weights)."""

from __future__ import annotations

import numpy as np
import pytest

from introspection_utils.engine.measure import Trial, measure
from introspection_utils.engine.prompts import introspection_prompt
from introspection_utils.engine.vectors import concept_vectors
from introspection_utils.experiments import attention, logit_lens


def test_lens_profile_is_tidy_and_equals_the_real_answer_at_the_last_layer(tiny_llama, lens):
    assert list(lens.columns) == logit_lens.LENS_COLUMNS
    assert len(lens) == (1 + 1) * (1 + 2) * tiny_llama.arch.n_layers
    vector = concept_vectors(tiny_llama, ["Sandwich"], progress=False).get("Sandwich", 1)
    real = measure(tiny_llama, [Trial(introspection_prompt(tiny_llama), vector, 4.0)]).logit_diff[0]
    last = lens[(lens.vector_kind == "concept") & (lens.question_kind == "introspection")
                & (lens.lens_layer == tiny_llama.arch.n_layers - 1)]["lens_diff"].iloc[0]
    assert abs(last - float(real)) < 1e-4
    before = lens[lens.lens_layer < 1]
    np.testing.assert_allclose(before["lens_diff"], before["baseline_lens_diff"], atol=1e-5)


def test_attention_maps_cover_three_conditions_and_injection_cannot_act_below_its_layer(tiny_llama, maps):
    assert list(maps.maps) == [attention.CONTROL_INJ, attention.INTRO_INJ, attention.INTRO_NOINJ]
    for m in maps.maps.values():
        assert m.shape == (tiny_llama.arch.n_layers, tiny_llama.arch.n_heads)
        assert (m >= 0).all() and (m <= 1 + 1e-6).all()  # a sum of softmax weights over a subset of keys
    # added to layer 0's output: layer 0's attention cannot see it, layer 1's does
    np.testing.assert_allclose(maps.maps[attention.INTRO_INJ][:1], maps.maps[attention.INTRO_NOINJ][:1], atol=1e-6)
    assert np.abs(maps.maps[attention.INTRO_INJ][1] - maps.maps[attention.INTRO_NOINJ][1]).max() > 1e-4


def test_prefill_must_end_as_the_answer_token(tiny_llama):
    with pytest.raises(ValueError, match="prefill is empty"):
        attention.attention_maps(tiny_llama, "Sandwich", 4.0, layer=1, prefill="")
