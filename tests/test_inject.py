"""The measurement engine against the plain-PyTorch reference (tests/reference.py), on every tiny family.

Tolerance: 1e-4, with atol scaled by the largest expected magnitude (the perturbed Gemma-2 has logits near its
softcap of 30), as in the reference's own tests.
"""

from __future__ import annotations

import math

import pytest
import torch

from introspection_utils.engine.generation import generate
from introspection_utils.engine.measure import (
    Readout,
    Trial,
    attention_to_injection,
    logit_lens,
    measure,
    yes_no_logit_diff,
)
from introspection_utils.engine.prompts import Prompt, control_questions, introspection_prompt
from introspection_utils.engine.vectors import ConceptVector


def make_vector(handle, seed: int, layer: int = 0, norm: float = 4.0) -> ConceptVector:
    direction = torch.randn(handle.arch.d_model, generator=torch.Generator().manual_seed(seed))
    return ConceptVector(f"v{seed}", layer, direction / direction.norm() * norm, kind="random", seed=seed,
                         model=handle.name)


@pytest.fixture(scope="module")
def paper_prompts(request):
    """Per handle: the paper's introspection prompt, a control question in the paper frame, and one bare."""
    cache = {}

    def get(handle):
        if handle.name not in cache:
            q = control_questions(2)
            cache[handle.name] = (introspection_prompt(handle), introspection_prompt(handle, q[0]),
                                  introspection_prompt(handle, q[1], frame="bare"))
        return cache[handle.name]

    return get


def truncated(prompt: Prompt, length: int) -> Prompt:
    return Prompt(prompt.text, prompt.input_ids[:length], min(prompt.injection_start, length - 1), prompt.kind,
                  prompt.question, prompt.system)


# ------------------------------------------------------------------ yes−no difference


@pytest.mark.parametrize("strategy", ["cached", "full"])
def test_injected_logit_diff_matches_reference_for_mixed_scales_and_two_layers(tiny_perturbed, oracle,
                                                                            paper_prompts, strategy):
    handle = tiny_perturbed
    prompt = paper_prompts(handle)[0]
    v0, v1 = make_vector(handle, 1, layer=0, norm=8.0), make_vector(handle, 2, layer=1, norm=8.0)
    trials = [Trial(prompt, v0, 4.0), Trial(prompt, v1, -3.0), Trial(prompt, v0, 0.0), Trial(prompt),
              Trial(prompt, v1, 8.0), Trial(prompt, v0, -2.5), Trial(prompt, v0, 1.5, layer=1)]
    readout = measure(handle, trials, strategy=strategy)
    assert isinstance(readout, Readout) and readout.logit_diff.shape == (len(trials),)
    expected = oracle.logit_diff(handle, trials)
    oracle.assert_close(readout.logit_diff, expected)
    plain = oracle.logit_diff(handle, [Trial(prompt)])
    oracle.assert_close(readout.baseline, plain.expand(len(trials)))
    for trial, value in zip(trials, readout.logit_diff, strict=True):  # the injections really move the readout
        assert (abs(float(value - plain[0])) > 2e-4) == trial.injected


def test_answer_mass_is_the_softmax_probability_of_both_answer_sets(tiny_perturbed, oracle, paper_prompts):
    handle = tiny_perturbed
    prompt = paper_prompts(handle)[0]
    v = make_vector(handle, 3, layer=0, norm=8.0)
    trials = [Trial(prompt, v, 4.0), Trial(prompt), Trial(prompt, v, -2.0)]
    readout = measure(handle, trials)
    expected = oracle.readout(handle, trials)
    oracle.assert_close(readout.logit_diff, expected["diff"])
    oracle.assert_close(readout.answer_mass, expected["mass"], tol=1e-5)
    oracle.assert_close(readout.baseline_answer_mass, expected["mass"][1].expand(3), tol=1e-5)
    assert ((readout.answer_mass > 0) & (readout.answer_mass <= 1)).all()
    sets = oracle.answer_sets(handle)
    pair = measure(handle, trials, answers=("Yes", "No"))  # a single pair: sets of one, a smaller mass
    assert len(sets["yes_ids"]) > 1 and len(sets["no_ids"]) > 1
    assert (pair.answer_mass < readout.answer_mass).all()
    oracle.assert_close(pair.logit_diff, oracle.logit_diff(handle, trials, answers=("Yes", "No")))


def test_answer_sets_are_every_single_token_spelling_the_paper_spelling_first(tiny_perturbed, oracle):
    from introspection_utils.engine.prompts import answer_set

    sets = answer_set(tiny_perturbed)
    expected = oracle.answer_sets(tiny_perturbed)
    assert sorted(sets.yes) == sorted(expected["yes_ids"]) and sorted(sets.no) == sorted(expected["no_ids"])
    assert sets.yes[0] == expected["yes_ids"][0] and sets.no[0] == expected["no_ids"][0]
    assert sets.yes_tokens[0] == "Yes" and sets.no_tokens[0] == "No"
    assert sets.record()["yes_ids"] == list(sets.yes) and set(sets.yes).isdisjoint(sets.no)
    words = answer_set(tiny_perturbed, ([" Yes", "yes"], "No"))
    assert words.yes_tokens == (" Yes", "yes") and len(words.no) == 1
    with pytest.raises(ValueError, match="share token"):
        answer_set(tiny_perturbed, ("Yes", ["No", "Yes"]))
    with pytest.raises(ValueError, match="pair"):
        answer_set(tiny_perturbed, ("Yes",))


def test_trials_from_several_prompts_come_back_in_input_order(tiny_perturbed, oracle, paper_prompts):
    handle = tiny_perturbed
    intro, control, bare = paper_prompts(handle)
    v0, v1 = make_vector(handle, 3, layer=0), make_vector(handle, 4, layer=1)
    trials = [Trial(control, v1, 5.0), Trial(intro, v0, 2.0), Trial(bare, v0, -4.0), Trial(intro, v1, -6.0),
              Trial(control), Trial(bare, v1, 3.0, window="all"), Trial(intro, v0, 2.0, window="last"),
              Trial(control, v0, 7.0)]
    readout = measure(handle, trials, batch_size=2)
    oracle.assert_close(readout.logit_diff, oracle.logit_diff(handle, trials))
    alone = torch.cat([measure(handle, [t]).logit_diff for t in trials[:3]])
    oracle.assert_close(readout.logit_diff[:3], alone, tol=1e-5)
    baselines = oracle.logit_diff(handle, [Trial(t.prompt) for t in trials])
    oracle.assert_close(readout.baseline, baselines)


def test_prefix_cache_and_layer_skip_equal_full_recomputation(tiny_perturbed, oracle, paper_prompts):
    handle = tiny_perturbed
    intro, control, _ = paper_prompts(handle)
    trials = [Trial(p, make_vector(handle, 5 + k, layer=k % 2), s)
              for k, (p, s) in enumerate([(intro, 3.0), (intro, -5.0), (control, 6.0), (control, 0.5)])]
    cached = measure(handle, trials, lens=True, strategy="cached")
    full = measure(handle, trials, lens=True, strategy="full")
    oracle.assert_close(cached.logit_diff, full.logit_diff, tol=1e-5)
    oracle.assert_close(cached.lens, full.lens, tol=1e-5)
    oracle.assert_close(cached.logit_diff, oracle.logit_diff(handle, trials))
    one_by_one = measure(handle, trials, strategy="cached", batch_size=1)
    oracle.assert_close(one_by_one.logit_diff, cached.logit_diff, tol=1e-5)


def test_custom_answer_words_are_read_from_their_own_tokens(tiny_perturbed, oracle, paper_prompts):
    handle = tiny_perturbed
    trials = [Trial(paper_prompts(handle)[0], make_vector(handle, 9), s) for s in (0.0, 5.0)]
    got = yes_no_logit_diff(handle, trials, answers=(" Yes", " No"))
    oracle.assert_close(got, oracle.logit_diff(handle, trials, answers=(" Yes", " No")))
    assert not torch.allclose(got, yes_no_logit_diff(handle, trials))


# ------------------------------------------------------------------ logit lens


def test_lens_last_layer_equals_the_real_logit_difference(tiny_perturbed, paper_prompts):
    handle = tiny_perturbed
    intro, control, _ = paper_prompts(handle)
    trials = [Trial(intro), Trial(intro, make_vector(handle, 10, layer=0), 6.0),
              Trial(control, make_vector(handle, 11, layer=1), -4.0)]
    readout = measure(handle, trials, lens=True)
    assert readout.lens.shape == (3, handle.arch.n_layers)
    torch.testing.assert_close(readout.lens[:, -1], readout.logit_diff, atol=1e-5 * max(
        1.0, float(readout.logit_diff.abs().max())), rtol=1e-5)
    torch.testing.assert_close(logit_lens(handle, trials), readout.lens)


def test_lens_at_every_layer_matches_the_reference(tiny_perturbed, oracle, paper_prompts):
    handle = tiny_perturbed
    intro, _, bare = paper_prompts(handle)
    trials = [Trial(intro), Trial(intro, make_vector(handle, 12, layer=0), 5.0),
              Trial(intro, make_vector(handle, 13, layer=1), -7.0), Trial(bare, make_vector(handle, 14), 3.0)]
    oracle.assert_close(logit_lens(handle, trials), oracle.lens(handle, trials))


# ------------------------------------------------------------------ attention


@pytest.mark.parametrize("window", ["suffix", "last", "all", "span"])
def test_attention_to_injected_positions_matches_the_reference(tiny_perturbed, oracle, paper_prompts, window):
    handle = tiny_perturbed
    prompt = paper_prompts(handle)[0]
    if window == "span":
        window = (prompt.injection_start + 2, len(prompt) - 4)
    trials = [Trial(prompt, window=window), Trial(prompt, make_vector(handle, 15, layer=0), 6.0, window=window),
              Trial(prompt, make_vector(handle, 16, layer=1), -3.0, window=window)]
    total, peak = attention_to_injection(handle, trials)
    assert total.shape == peak.shape == (3, handle.arch.n_layers, handle.arch.n_heads)
    for i, trial in enumerate(trials):
        expected = oracle.attention(handle, trial)
        oracle.assert_close(total[i], expected["sum"][0])
        oracle.assert_close(peak[i], expected["max"][0])
    assert bool((total >= 0).all() and (total <= 1 + 1e-5).all() and (peak <= total + 1e-6).all())


def test_attention_rows_sum_to_one(tiny_perturbed, oracle, paper_prompts):
    handle = tiny_perturbed
    prompt = paper_prompts(handle)[0]
    trials = [Trial(prompt, window="all"), Trial(prompt, make_vector(handle, 17), 4.0, window="all")]
    total, _ = attention_to_injection(handle, trials)  # every key is "injected": the whole row
    oracle.assert_close(total, torch.ones_like(total), tol=1e-5)
    for weights in oracle.attention(handle, trials[1])["weights"]:  # every query row of the reference
        oracle.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), tol=1e-5)


def test_only_sliding_layers_ignore_keys_outside_their_window(tiny_perturbed, paper_prompts):
    handle = tiny_perturbed
    config = handle.torch_model.config
    window = getattr(config, "sliding_window", None) or 8
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * handle.arch.n_layers
    prompt = paper_prompts(handle)[0]
    far = (0, len(prompt) - window)  # keys a sliding window at the last query cannot see
    total, _ = attention_to_injection(handle, [Trial(prompt, make_vector(handle, 18), 2.0, window=far)])
    assert handle.arch.family.startswith("Gemma") == ("sliding_attention" in kinds)
    for layer, kind in enumerate(kinds):
        assert (float(total[0, layer].max()) == 0.0) == (kind == "sliding_attention")


# ------------------------------------------------------------------ windows


def _windows(prompt: Prompt) -> dict:
    start, n = prompt.injection_start, len(prompt)
    return {"suffix": "suffix", "last": "last", "all": "all", "span": (start + 3, n - 5),
            "open-span": (start + 3, None), "head": (0, 6)}


@pytest.mark.parametrize("name", ["suffix", "last", "all", "span", "open-span", "head"])
def test_each_window_injects_exactly_its_positions(tiny_perturbed, oracle, paper_prompts, name):
    handle = tiny_perturbed
    prompt = paper_prompts(handle)[0]
    n, window = len(prompt), _windows(prompt)[name]
    vector = make_vector(handle, 19, layer=0, norm=8.0)
    got = measure(handle, [Trial(prompt, vector, 6.0, window=window)]).logit_diff
    oracle.assert_close(got, oracle.logit_diff(handle, [Trial(prompt, vector, 6.0, window=window)]))

    # The window's edges, read directly: cut the prompt so that its last token is just inside or just outside an
    # edge. The engine's answer there must be the reference's logits at that position on the whole prompt, and
    # whether that token itself is injected moves the answer by far more than the tolerance.
    start, end = {"suffix": (prompt.injection_start, n), "last": (n - 1, n), "all": (0, n)}.get(name, window)
    end = n if end is None else end
    whole = oracle.logits(handle, Trial(prompt, vector, 6.0, window=window))
    plain = oracle.logits(handle, Trial(prompt))
    for m in sorted({start, start + 1, end, end + 1} & set(range(1, n + 1))):
        cut = truncated(prompt, m)
        trial = Trial(cut, vector, 6.0, window=(start, min(end, m))) if start < m else Trial(cut)
        value = measure(handle, [trial]).logit_diff
        expected = oracle.set_diff(handle, whole[m - 1])
        oracle.assert_close(value, expected[None])
        if start <= m - 1 < end:  # the last token is injected: its own answer moves
            assert abs(float(expected - oracle.set_diff(handle, plain[m - 1]))) > 1e-3


def test_injection_at_the_last_layer_moves_the_answer_only_when_the_window_covers_the_last_token(
        tiny_perturbed, oracle, paper_prompts):
    handle = tiny_perturbed
    prompt = paper_prompts(handle)[0]
    n, last = len(prompt), handle.arch.n_layers - 1
    vector = make_vector(handle, 20, layer=last)
    base = measure(handle, [Trial(prompt)]).logit_diff
    before = measure(handle, [Trial(prompt, vector, 9.0, window=(prompt.injection_start, n - 1))]).logit_diff
    oracle.assert_close(before, base, tol=1e-6)
    for window in ("last", (n - 1, n), "suffix"):
        trial = Trial(prompt, vector, 9.0, window=window)
        covered = measure(handle, [trial]).logit_diff
        assert abs(float(covered - base)) > 1e-3
        oracle.assert_close(covered, oracle.logit_diff(handle, [trial]))


def test_injection_leaves_prefix_positions_untouched(tiny_perturbed, oracle, paper_prompts):
    """The engine's answer on the prompt cut after position m equals the reference's logits at m on the whole
    injected prompt: unchanged before the window, injected inside it."""
    handle = tiny_perturbed
    prompt = paper_prompts(handle)[0]
    a, b = prompt.injection_start + 2, len(prompt) - 6
    vector = make_vector(handle, 21, layer=0, norm=8.0)
    full = Trial(prompt, vector, 6.0, window=(a, b))
    injected_logits = oracle.logits(handle, full)
    plain_logits = oracle.logits(handle, Trial(prompt))
    for m in (a - 3, a, a + 1, b - 1, b, b + 1, b + 2, len(prompt)):  # m tokens kept: last position m - 1
        cut = truncated(prompt, m)
        trial = Trial(cut, vector, 6.0, window=(a, min(b, m))) if m > a else Trial(cut)
        got = measure(handle, [trial]).logit_diff
        expected = oracle.set_diff(handle, injected_logits[m - 1])
        oracle.assert_close(got, expected[None])
        unchanged = oracle.set_diff(handle, plain_logits[m - 1])
        assert (abs(float(got - unchanged)) < 1e-5) == (m <= a), m


# ------------------------------------------------------------------ records


def test_trial_resolves_layer_window_and_injection(tiny_llama, paper_prompts):
    prompt = paper_prompts(tiny_llama)[0]
    vector = make_vector(tiny_llama, 22, layer=1)
    n = len(prompt)
    assert Trial(prompt, vector, 2.0).injection_layer == 1
    assert Trial(prompt, vector, 2.0, layer=0).injection_layer == 0
    assert Trial(prompt).injection_layer is None and not Trial(prompt).injected
    assert not Trial(prompt, vector, 0.0).injected and Trial(prompt, vector, -1.0).injected
    assert Trial(prompt).span() == (prompt.injection_start, None)
    assert Trial(prompt, window="last").span() == (n - 1, n)
    assert Trial(prompt, window="all").span() == (0, None)
    assert Trial(prompt, window=(3, 7)).span() == (3, 7)
    assert Trial(prompt, vector, 2.0) == Trial(prompt, vector, 2.0)


# ------------------------------------------------------------------ bad input, before any compute


def _bad_trials(handle, prompt):
    n = len(prompt)
    v = make_vector(handle, 23, layer=0)
    return [
        ([], "no trials given"),
        ([Trial(prompt, v, 1.0, layer=2)], r"layer 2 is out of range for tiny-llama \(0\.\.1\)"),
        ([Trial(prompt, v, 1.0, layer=-1)], r"layer -1 is out of range"),
        ([Trial(prompt, make_vector(handle, 23, layer=7), 1.0)], r"layer 7 is out of range"),
        ([Trial(prompt, layer=5)], r"layer 5 is out of range"),
        ([Trial(prompt, v, 1.0), Trial(prompt, v, math.nan)], "scale nan must be a finite number"),
        ([Trial(prompt, v, math.inf)], "scale inf must be a finite number"),
        ([Trial(prompt, v, -math.inf)], "scale -inf must be a finite number"),
        ([Trial(prompt, v, "3")], "scale '3' must be a finite number"),
        ([Trial(prompt, v, True)], "scale True must be a finite number"),
        ([Trial(prompt, ConceptVector("x", 0, torch.ones(63)), 1.0)], r"has shape \(63,\); tiny-llama needs \[64\]"),
        ([Trial(prompt, ConceptVector("x", 0, torch.ones(2, 64)), 1.0)], r"needs \[64\]"),
        ([Trial(prompt, ConceptVector("x", 0, torch.full((64,), math.nan)), 1.0)], "non-finite"),
        ([Trial(prompt, v, 1.0, window=(5, 3))], r"window \(5, 3\) is outside the prompt"),
        ([Trial(prompt, v, 1.0, window=(0, n + 1))], "outside the prompt"),
        ([Trial(prompt, v, 1.0, window=(n, None))], "outside the prompt"),
        ([Trial(prompt, v, 1.0, window="prefix")], "window 'prefix' must be"),
        ([Trial(prompt, v, 1.0, window="ab")], "window 'ab' must be"),
        ([Trial(prompt, v, 1.0, window=(1.5, None))], r"window \(1.5, None\) must be"),
    ]


@pytest.mark.parametrize("case", range(19))
def test_bad_trials_are_rejected_before_any_compute(tiny_llama, paper_prompts, forbid_compute, case):
    trials, message = _bad_trials(tiny_llama, paper_prompts(tiny_llama)[0])[case]
    forbid_compute(tiny_llama)
    for run in (measure, yes_no_logit_diff, logit_lens, attention_to_injection, generate):
        with pytest.raises(ValueError, match=message):
            run(tiny_llama, trials)


def test_bad_answer_word_is_rejected_before_any_compute(tiny_llama, paper_prompts, forbid_compute):
    forbid_compute(tiny_llama)
    with pytest.raises(ValueError, match="answer word 'Supercalifragilistic'"):
        measure(tiny_llama, [Trial(paper_prompts(tiny_llama)[0])], answers=("Supercalifragilistic", "No"))


# ------------------------------------------------------------------ embedded model


@pytest.mark.integration
def test_embedded_model_readouts_match_the_reference(smollm, oracle):
    prompt = introspection_prompt(smollm)
    vector = make_vector(smollm, 24, layer=15, norm=20.0)
    trials = [Trial(prompt, vector, 4.0), Trial(prompt, vector, -4.0, layer=20)]
    readout = measure(smollm, trials, lens=True)
    lens = oracle.lens(smollm, trials)  # its last column is the reference's yes−no difference
    oracle.assert_close(readout.lens, lens)
    oracle.assert_close(readout.logit_diff, lens[:, -1])
    assert (readout.logit_diff - readout.baseline).abs().min() > 1e-2
    oracle.assert_close(measure(smollm, trials[:1], strategy="full").logit_diff, lens[:1, -1])
    total, peak = attention_to_injection(smollm, trials[:1])
    expected = oracle.attention(smollm, trials[0])
    oracle.assert_close(total[0], expected["sum"][0])
    oracle.assert_close(peak[0], expected["max"][0])


def test_prefill_format_injects_from_the_question_through_the_prefilled_answer(tiny_perturbed, oracle):
    handle = tiny_perturbed
    question = control_questions(1)[0]
    prompt = introspection_prompt(handle, question, answer_format="prefill")
    n_open = len(introspection_prompt(handle, question))  # the prefilled tokens are positions n_open..T-1
    vector = make_vector(handle, 30, layer=0, norm=8.0)
    trial = Trial(prompt, vector, 6.0)
    assert trial.span() == (prompt.injection_start, None) and prompt.injection_start < n_open < len(prompt)
    readout = measure(handle, [trial, Trial(prompt)])
    oracle.assert_close(readout.logit_diff, oracle.logit_diff(handle, [trial, Trial(prompt)]))
    short = Trial(prompt, vector, 6.0, window=(prompt.injection_start, n_open))  # stops before the prefill
    got = measure(handle, [short]).logit_diff
    oracle.assert_close(got, oracle.logit_diff(handle, [short]))
    assert abs(float(got[0] - readout.logit_diff[0])) > 1e-4  # the prefilled tokens themselves are injected
