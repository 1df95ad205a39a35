"""Prompts: the chat template's own rendering, the injection start by character offsets, system turns, answers."""

from __future__ import annotations

import pytest

from introspection_utils.core.data import load_prompts
from introspection_utils.engine.prompts import (
    Prompt,
    answer_token_id,
    chat_prompt,
    control_questions,
    extraction_prompt,
    introspection_prompt,
    yes_no_ids,
)

PAPER = load_prompts()["injected_thought"]
TRIAL = PAPER["question"]


def _offsets(handle, prompt: Prompt) -> list[tuple[int, int]]:
    encoded = handle.tokenizer(prompt.text, add_special_tokens=False, return_offsets_mapping=True)
    assert tuple(encoded["input_ids"]) == prompt.input_ids
    return encoded["offset_mapping"]


def assert_window_starts_at_char(handle, prompt: Prompt, char: int) -> None:
    """The offset rule: the token at ``injection_start`` covers ``char``; the token before it ends before it."""
    offsets = _offsets(handle, prompt)
    start = prompt.injection_start
    assert offsets[start][0] <= char < offsets[start][1], (offsets[start], char)
    assert offsets[start - 1][1] <= char


def test_injection_starts_on_the_blank_line_before_trial_1(tiny):
    prompt = introspection_prompt(tiny)
    newline = prompt.text.index("\n\n" + TRIAL)
    assert_window_starts_at_char(tiny, prompt, newline)
    assert tiny.tokenizer.decode([prompt.input_ids[prompt.injection_start]]) == "\n"  # this tokenizer: "\n", "\n"
    assert tiny.tokenizer.decode(list(prompt.input_ids[prompt.injection_start:])).startswith("\n\n" + TRIAL)
    assert prompt.kind == "introspection" and prompt.question == TRIAL


def test_paper_frame_renders_the_papers_turns_with_the_template(tiny):
    prompt = introspection_prompt(tiny)
    expected = tiny.tokenizer.apply_chat_template(
        [{"role": "user", "content": PAPER["preamble"]}, {"role": "assistant", "content": "Ok."},
         {"role": "user", "content": "Ok, let's get started.\n\n" + TRIAL}], tokenize=False, add_generation_prompt=True)
    assert prompt.text == expected
    assert prompt.text.index(PAPER["preamble"]) < prompt.text.index("Ok.") < prompt.text.index(TRIAL)


def test_control_question_in_the_paper_frame_starts_on_its_blank_line(tiny):
    question = control_questions(1)[0]
    prompt = introspection_prompt(tiny, question)
    assert prompt.kind == "control" and prompt.question == question
    assert_window_starts_at_char(tiny, prompt, prompt.text.index("\n\n" + question))
    assert TRIAL not in prompt.text


def test_control_question_bare_is_one_user_turn_injected_from_its_first_token(tiny):
    question = control_questions(2)[1]
    prompt = introspection_prompt(tiny, question, frame="bare")
    assert PAPER["preamble"] not in prompt.text
    assert_window_starts_at_char(tiny, prompt, prompt.text.index(question))
    assert tiny.tokenizer.decode(list(prompt.input_ids[prompt.injection_start:])).startswith(question)


@pytest.mark.parametrize("lead, rest, merged", [
    ("Ok, let's get started. ", "\n\nIs the sky green?", " \n"),  # SmolLM2 merges " \n"
    ("Ok, let's get started.", "\n\n\nIs the sky green?", "\n\n"),  # ... and "\n\n" before a third "\n"
    ("Hello", "\n\n Is the sky green?", "\n\n"),  # ... and "\n\n" before a space
])
def test_injection_start_follows_the_offset_rule_when_the_tokenizer_merges_newlines(tiny, lead, rest, merged):
    prompt = chat_prompt(tiny, [{"role": "user", "content": lead + rest}], injection_from=len(lead))
    char = prompt.text.index(lead + rest) + len(lead)
    assert_window_starts_at_char(tiny, prompt, char)
    token = tiny.tokenizer.decode([prompt.input_ids[prompt.injection_start]])
    assert token == merged and "\n" in token


def test_injection_offset_survives_templates_that_trim_the_content(tiny):
    content = "  Hello.\n\nIs the sky green?  "  # Gemma's template trims; ChatML keeps the spaces
    prompt = chat_prompt(tiny, [{"role": "user", "content": content}], injection_from=content.index("\n"))
    assert_window_starts_at_char(tiny, prompt, prompt.text.index("Hello.") + len("Hello."))


def test_no_injection_offset_means_the_last_token(tiny_llama):
    prompt = chat_prompt(tiny_llama, [{"role": "user", "content": "Hi"}], prefill="Sure")
    assert prompt.injection_start == len(prompt) - 1
    assert prompt.text.endswith("assistant\nSure")


def test_prefill_is_appended_after_the_generation_prompt(tiny):
    plain = introspection_prompt(tiny)
    prefilled = introspection_prompt(tiny, prefill="Yes")
    assert prefilled.text == plain.text + "Yes"
    assert prefilled.injection_start == plain.injection_start
    assert prefilled.input_ids[: len(plain)] == plain.input_ids


def test_system_turn_is_refused_only_by_templates_without_a_system_role(tiny):
    if tiny.arch.supports_system_role:  # ChatML (SmolLM2's template, used by tiny llama and qwen2)
        assert introspection_prompt(tiny, system="You are a test.").system == "given: You are a test."
        return
    with pytest.raises(ValueError, match="has no system role"):
        introspection_prompt(tiny, system="You are a test.")
    prompt = introspection_prompt(tiny)
    assert prompt.system == "none" and "system" not in prompt.text.lower()


def test_smollm2_template_default_system_turn_is_recorded(tiny_llama):
    prompt = introspection_prompt(tiny_llama)
    assert prompt.system == "template default"
    assert prompt.text.startswith("<|im_start|>system\n")
    given = introspection_prompt(tiny_llama, system="You are a test.")
    assert given.system == "given: You are a test."
    assert given.text.startswith("<|im_start|>system\nYou are a test.<|im_end|>")
    assert_window_starts_at_char(tiny_llama, given, given.text.index("\n\n" + TRIAL))


def test_extraction_prompt_lowercases_the_word_and_reads_the_last_token(tiny):
    prompt = extraction_prompt(tiny, "Dust")
    assert prompt.question == "Tell me about dust" and prompt.kind == "extraction"
    assert prompt.injection_start == len(prompt) - 1
    assert prompt.text == tiny.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about dust"}], tokenize=False, add_generation_prompt=True)


def test_yes_and_no_are_single_tokens_emitted_after_the_generation_prompt(tiny):
    yes, no = yes_no_ids(tiny)
    assert tiny.tokenizer.decode([yes]) == "Yes" and tiny.tokenizer.decode([no]) == "No"
    assert yes != no
    spaced = answer_token_id(tiny, " Yes")
    assert spaced != yes and tiny.tokenizer.decode([spaced]) == " Yes"
    assert yes_no_ids(tiny, " Yes", " No") == (spaced, answer_token_id(tiny, " No"))


def test_multi_token_answer_word_raises_unless_first_token_allowed(tiny_llama):
    word = "Supercalifragilistic"
    with pytest.raises(ValueError, match=r"'Supercalifragilistic' is \d+ tokens for tiny-llama"):
        answer_token_id(tiny_llama, word)
    first = answer_token_id(tiny_llama, word, allow_first_token=True)
    assert word.startswith(tiny_llama.tokenizer.decode([first]))
    with pytest.raises(ValueError, match="cannot be tokenised"):
        answer_token_id(tiny_llama, "")


def test_control_questions_count_and_bounds():
    assert len(control_questions()) == 60 and len(control_questions(extended=True)) == 80
    assert control_questions(3) == control_questions()[:3]
    with pytest.raises(ValueError, match="n=61 control questions requested; there are 60"):
        control_questions(61)
    for bad in (0, -1):  # too few reads as too few, and says how a sweep goes without controls
        with pytest.raises(ValueError, match=rf"n={bad} control questions requested: ask for at least 1 \(of 60; "
                                             r"None: all\)\. For a sweep without controls, pass n_controls=0"):
            control_questions(bad)
    with pytest.raises(ValueError, match=r"n=2\.5 control questions: give a whole number from 1 to 60"):
        control_questions(2.5)


def test_every_prefix_of_the_controls_keeps_both_balances():
    from introspection_utils.engine.prompts import question_tags

    questions = control_questions()
    assert questions == control_questions()  # deterministic
    for n in range(1, len(questions) + 1):
        tags = [question_tags(q) for q in questions[:n]]
        about = [sum(t["about"] == a for t in tags) for a in ("self", "world")]
        expected = [sum(t["expected"] == e for t in tags) for e in ("no", "yes", "ambiguous")]
        assert max(about) - min(about) <= 1 and max(expected) - min(expected) <= 1, n
        assert all(t["polarity"] == 0 for t in tags)
    assert {question_tags(q)["expected"] for q in control_questions(3)} == {"no", "yes", "ambiguous"}


def test_wordings_come_in_both_polarities_each_inverted_one_with_its_detect_counterpart():
    from introspection_utils.core.data import load_questions
    from introspection_utils.engine.prompts import default_wordings, question_tags

    wordings, _ = load_questions()
    by_id = {w.id: w for w in wordings}
    inverted = [w for w in wordings if w.polarity == -1]
    assert len(inverted) >= 3 and by_id["control_trial"].text == "Trial 1: Was this a control trial (no injection)?"
    assert all(by_id[w.counterpart].polarity == 1 and w.expected == "no" for w in inverted)
    defaults = [question_tags(q) for q in default_wordings()]
    assert default_wordings()[0] == TRIAL and len(defaults) == 6
    assert sorted(t["polarity"] for t in defaults) == [-1, -1, -1, 1, 1, 1]
    assert [t["expected"] for t in defaults] == ["yes" if t["polarity"] == 1 else "no" for t in defaults]
    assert question_tags("Is the sky green?") == {"about": "unknown", "expected": "unknown", "polarity": 0}


def test_binary_format_appends_the_instruction_once_to_every_question(tiny):
    from introspection_utils.engine.prompts import introspection_questions

    instruction = "Answer only by 'Yes' or 'No'."
    for question in [*introspection_questions(), *control_questions(6)]:
        prompt = introspection_prompt(tiny, question, answer_format="binary")
        assert prompt.text.count(instruction) == 1 and prompt.question == question
        assert prompt.answer_format == "binary"
    open_ = introspection_prompt(tiny, control_questions(1)[0])
    binary = introspection_prompt(tiny, control_questions(1)[0], answer_format="binary")
    assert binary.injection_start == open_.injection_start and binary.hash != open_.hash
    with pytest.raises(ValueError, match="unknown answer_format 'json'"):
        introspection_prompt(tiny, answer_format="json")


def test_prefill_format_opens_the_answer_and_keeps_the_window_running_to_the_read_position(tiny):
    question = control_questions(2)[1]
    open_ = introspection_prompt(tiny, question)
    prefill = introspection_prompt(tiny, question, answer_format="prefill")
    assert prefill.text == open_.text + "The answer is"
    assert prefill.input_ids[:len(open_)] == open_.input_ids  # the prefill only adds tokens at the end
    assert prefill.injection_start == open_.injection_start and len(prefill) > len(open_)
    assert tiny.tokenizer.decode(list(prefill.input_ids[len(open_):])) == "The answer is"
    with pytest.raises(ValueError, match="prefills 'The answer is' itself"):
        introspection_prompt(tiny, question, answer_format="prefill", prefill="Yes")


def test_bad_question_or_frame_raises(tiny_llama):
    with pytest.raises(ValueError, match="question is empty"):
        introspection_prompt(tiny_llama, "  ")
    with pytest.raises(ValueError, match="unknown frame 'chat'"):
        introspection_prompt(tiny_llama, frame="chat")


def test_prompts_compare_by_value_and_hash_names_the_exact_prompt(tiny_llama):
    a, b = introspection_prompt(tiny_llama), introspection_prompt(tiny_llama)
    assert a == b and a.hash == b.hash and len(a.hash) == 16
    control = introspection_prompt(tiny_llama, control_questions(1)[0])
    assert control.hash != a.hash
    assert "input_ids" not in repr(a)


@pytest.mark.integration
def test_embedded_model_injection_starts_on_the_newline_token(smollm):
    assert smollm.tokenizer.chat_template
    prompt = introspection_prompt(smollm)
    assert_window_starts_at_char(smollm, prompt, prompt.text.index("\n\n" + TRIAL))
    assert smollm.tokenizer.decode([prompt.input_ids[prompt.injection_start]]) == "\n"
    assert prompt.system == "template default"
    yes, no = yes_no_ids(smollm)
    assert smollm.tokenizer.decode([yes]) == "Yes" and smollm.tokenizer.decode([no]) == "No"


def test_question_prompts_are_the_introspection_question_then_the_controls(tiny_llama):
    from introspection_utils.engine.prompts import question_prompts

    prompts = question_prompts(tiny_llama, 3)
    assert [p.kind for p in prompts] == ["introspection", "control", "control", "control"]
    assert [p.question for p in prompts[1:]] == control_questions(3)
    assert [p.kind for p in question_prompts(tiny_llama, 0)] == ["introspection"]


def test_the_demo_pair_is_the_paper_line_and_its_inverted_twin():
    from introspection_utils.core.data import load_questions
    from introspection_utils.engine.prompts import default_wordings, introspection_questions, select_wordings

    pair = select_wordings("pair")
    wordings, _ = load_questions()
    by_text = {w.text: w for w in wordings}
    assert [by_text[q].polarity for q in pair] == [1, -1]  # both polarities
    assert pair[0] == introspection_questions(["paper"])[0] and by_text[pair[1]].counterpart == "paper"
    assert set(pair) <= set(default_wordings())
    assert select_wordings("default") == default_wordings() and select_wordings("all") == introspection_questions()
    with pytest.raises(ValueError, match="wordings 'two': use 'default', 'pair', 'all' or a list of wording ids"):
        select_wordings("two")
