"""The committed rendered prompts (data/rendered_prompts/<model>.json) are what the chat templates render now: a
template, tokenizer or prompt-text change fails here with the fields that moved, and shows up as a diff once the
files are rewritten (`python -m introspection_utils.frozen_prompts`)."""

from __future__ import annotations

import copy
import json

import pytest

from introspection_utils.apps import frozen_prompts
from introspection_utils.engine.prompts import control_questions

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("fixture", ["smollm", "gemma3"])
def test_committed_prompts_equal_the_rendered_ones(fixture, request):
    handle = request.getfixturevalue(fixture)
    assert frozen_prompts.check(handle) == []


def test_the_record_has_every_question_with_its_injection_window(smollm):
    record = frozen_prompts.render(smollm)
    names = [p["name"] for p in record["prompts"]]
    controls = [n for n in names if n.startswith("control ") and n.removeprefix("control ").isdigit()]
    assert names[0] == "introspection" and len(controls) == len(control_questions())  # (+ format variants)
    intro = record["prompts"][0]
    assert 0 < intro["injection_start"] < intro["n_tokens"]
    assert intro["injected_text"].startswith("\n\nTrial 1:") and intro["text"].endswith(intro["injected_text"])


def test_a_changed_template_is_reported_field_by_field(smollm, tmp_path):
    frozen = frozen_prompts.render(smollm)
    changed = copy.deepcopy(frozen)
    changed["prompts"][1]["text"] += "!"
    changed["prompts"][1]["n_tokens"] += 1
    del changed["prompts"][-1]
    lines = frozen_prompts.differences(frozen, changed)
    assert any(line.startswith("control 01: text") for line in lines)
    assert f"control 01: n_tokens {frozen['prompts'][1]['n_tokens']} -> {changed['prompts'][1]['n_tokens']}" in lines
    assert any(line.endswith("removed") for line in lines) and len(lines) == 3
    frozen_prompts.frozen_path(smollm, tmp_path).write_text(json.dumps(changed))  # a stale committed file
    assert frozen_prompts.check(smollm, tmp_path) == frozen_prompts.differences(changed, frozen) != []
    frozen_prompts.write(smollm, tmp_path)
    assert frozen_prompts.check(smollm, tmp_path) == []


def test_every_embedded_model_has_its_file():
    for name in frozen_prompts.FROZEN_MODELS:
        record = json.loads(frozen_prompts.frozen_path(name).read_text(encoding="utf-8"))
        assert record["model"] == name and record["prompts"]
