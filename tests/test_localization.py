"""Localization: sentence spans, the digit readout against the reference, the prediction, accuracy bookkeeping."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from introspection_utils.engine.measure import Trial, answer_logits, measure
from introspection_utils.engine.vectors import ConceptVector
from introspection_utils.experiments import localization as loc

SENTENCES = ("The dog barks loudly.", "The cat sleeps on the couch.", "A bird flies over the lake.")


def _vector(handle, seed: int = 0, layer: int = 0) -> ConceptVector:
    g = torch.Generator().manual_seed(seed)
    return ConceptVector("test", layer, torch.randn(handle.arch.d_model, generator=g), model=handle.name)


@pytest.mark.parametrize("question", ["introspection", "abstract", "concrete"])
def test_spans_cover_exactly_each_sentences_tokens(tiny_llama, question):
    lp = loc.localization_prompt(tiny_llama, SENTENCES, question=question)
    tok = tiny_llama.tokenizer
    ids = lp.prompt.input_ids
    offsets = tok(lp.prompt.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert list(ids) == tok(lp.prompt.text, add_special_tokens=False)["input_ids"]
    for (start, end), sentence in zip(lp.spans, SENTENCES, strict=True):
        assert tok.decode(ids[start:end]).strip() == sentence
        # the tokens just outside the span are not part of the sentence ("SENTENCE k:" before, " SENTENCE"/"\n" after)
        assert ":" in tok.decode(ids[start - 1:start]) or lp.prompt.text[offsets[start - 1][1] - 1] == ":"
        assert sentence not in tok.decode(ids[start + 1:end + 3])
    assert lp.prompt.injection_start == lp.spans[0][0]
    assert lp.prompt.text.endswith(loc.load_prompts()[loc.QUESTION_SECTIONS[question]]["prefill"])
    spans = [s for span in lp.spans for s in span]
    assert spans == sorted(spans) and len(set(spans)) == len(spans)  # in order, disjoint


def test_spans_are_found_when_one_sentence_contains_another(tiny_llama):
    sentences = ("The dog barks.", "The dog barks loudly.", "The dog barks.x")
    lp = loc.localization_prompt(tiny_llama, sentences)
    for (start, end), sentence in zip(lp.spans, sentences, strict=True):
        assert tiny_llama.tokenizer.decode(lp.prompt.input_ids[start:end]).strip() == sentence


def test_digit_tokens_are_the_single_tokens_1_to_n(tiny_llama):
    ids = loc.digit_token_ids(tiny_llama, 5)
    assert [tiny_llama.tokenizer.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]
    with pytest.raises(ValueError, match="2..9"):
        loc.digit_token_ids(tiny_llama, 10)


def test_prediction_is_the_argmax_over_the_digit_logits():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, -1.0], [-2.0, -3.0, -1.0]])
    assert loc.predict(logits).tolist() == [2, 1, 3]


def test_digit_readout_equals_the_reference_logits(tiny, oracle):
    lp = loc.localization_prompt(tiny, SENTENCES)
    digits = loc.digit_token_ids(tiny, len(SENTENCES))
    trials = [Trial(lp.prompt, _vector(tiny, k, layer=k % 2), scale, window=lp.window(k % 3))
              for k, scale in enumerate([0.0, 2.0, 4.0, 8.0])]
    trials.append(Trial(lp.prompt, _vector(tiny, 9, layer=1), 3.0, window=(lp.spans[0][0], lp.spans[2][1])))
    got = answer_logits(tiny, trials, digits, batch_size=2)
    assert got.shape == (len(trials), len(digits))
    expected = torch.stack([oracle.logits(tiny, t)[-1, digits] for t in trials])
    oracle.assert_close(got, expected)


def test_answer_logits_of_yes_no_give_the_engines_logit_difference(tiny_llama):
    from introspection_utils.engine.prompts import introspection_prompt, paper_answers, yes_no_ids

    prompt = introspection_prompt(tiny_llama)
    trials = [Trial(prompt, _vector(tiny_llama, 1), s) for s in (0.0, 1.0, 4.0)]
    logits = answer_logits(tiny_llama, trials, list(yes_no_ids(tiny_llama)))
    readout = measure(tiny_llama, trials, answers=paper_answers())  # one token per answer, as answer_logits reads
    torch.testing.assert_close(logits[:, 0] - logits[:, 1], readout.logit_diff)
    torch.testing.assert_close(readout.logits, logits)


def test_answer_logits_rejects_bad_token_ids_before_compute(tiny_llama, forbid_compute):
    lp = loc.localization_prompt(tiny_llama, SENTENCES)
    forbid_compute(tiny_llama)
    with pytest.raises(ValueError, match="token_ids"):
        answer_logits(tiny_llama, [Trial(lp.prompt)], [])
    with pytest.raises(ValueError, match="token_ids"):
        answer_logits(tiny_llama, [Trial(lp.prompt)], [10**9])


def test_bad_localization_inputs_raise(tiny_llama):
    with pytest.raises(ValueError, match="unknown localization question"):
        loc.localization_prompt(tiny_llama, SENTENCES, question="longest")
    with pytest.raises(ValueError, match="2..9"):
        loc.localization_prompt(tiny_llama, SENTENCES[:1])
    with pytest.raises(ValueError, match="unknown controls"):
        loc.run_localization(tiny_llama, n_sets=1, n_sentences=3, scales=(1.0,), layers=[0], controls=("nope",),
                             bank=_bank(tiny_llama), progress=False)
    with pytest.raises(ValueError, match="out of range"):
        loc.run_localization(tiny_llama, n_sets=1, n_sentences=3, layer=5, scales=(1.0,), layers=[0],
                             bank=_bank(tiny_llama), progress=False)


def test_sentence_sets_are_seeded_and_distinct():
    a = loc.sentence_sets(3, 5, seed=1)
    assert a == loc.sentence_sets(3, 5, seed=1) and a != loc.sentence_sets(3, 5, seed=2)
    assert all(len(set(s)) == 5 for s in a)
    order = loc.shuffled_order(5, np.random.default_rng(0))
    assert sorted(order) == list(range(5)) and all(o != i for i, o in enumerate(order))


def _bank(handle):
    from introspection_utils.engine.vectors import VectorBank

    g = torch.Generator().manual_seed(3)
    vectors = torch.randn(2, handle.arch.n_layers, handle.arch.d_model, generator=g)
    return VectorBank(("alpha", "beta"), vectors, model=handle.name)


def test_run_bookkeeping_targets_chance_and_controls(tiny_llama, tmp_path):
    result = loc.run_localization(tiny_llama, n_sets=2, n_sentences=3, layer=1, scales=(1.0, 4.0), layers=[0],
                                  scale=4.0, n_random=2, bank=_bank(tiny_llama), results_dir=tmp_path,
                                  progress=False)
    df = result.df
    assert list(df.columns) == loc.COLUMNS
    grid = [(1, 1.0), (1, 4.0), (0, 4.0)]
    per_set_target = {"introspection": len(grid), "abstract": len(grid), "concrete": len(grid),
                      "random": 2 * len(grid), "shuffled": len(grid), "no injection": 3}
    counts = df.groupby("condition").size().to_dict()
    assert counts == {c: n * 2 * 3 for c, n in per_set_target.items()}
    assert sorted(df["target"].unique()) == [1, 2, 3]
    assert (df["correct"] == (df["prediction"] == df["target"])).all()
    assert ((df["target_margin"] > 0) == df["correct"]).all()
    assert not df.loc[df["condition"] == "no injection", "injected"].any()
    assert df.loc[df["condition"] != "no injection", "injected"].all()
    # shuffled rows: the target is where the injected sentence moved to; the set's sentences are recorded
    sets = result.meta["sentence_sets"]
    assert len(sets) == 2 and all(len(s) == 3 for s in sets)
    acc = loc.accuracy(df)
    assert np.allclose(acc["chance"], 1 / 3)
    no_inj = acc[acc["condition"] == "no injection"]
    assert np.allclose(no_inj["accuracy"], 1 / 3)  # one constant answer per set, every sentence the target once
    assert ((acc["ci_low"] <= acc["accuracy"]) & (acc["accuracy"] <= acc["ci_high"])).all()
    vs_scale, vs_layer = loc.accuracy_lines(result)
    assert set(vs_scale["scale"]) == {1.0, 4.0} and set(vs_scale["layer"]) == {1}
    assert set(vs_layer["layer"]) == {0, 1} and set(vs_layer["scale"]) == {4.0}
    assert (tmp_path / "localization.csv").is_file() and result.meta["spec"]["n_sentences"] == 3
    assert "Chance is 33%" in loc.reading(result)


def test_accuracy_counts_and_wilson_interval_by_hand():
    df = pd.DataFrame({"condition": ["introspection"] * 4, "question_kind": "introspection", "layer": 1,
                       "scale": 2.0, "n_sentences": 4, "correct": [True, True, True, False]})
    acc = loc.accuracy(df)
    row = acc.iloc[0]
    assert (row["n"], row["correct"], row["accuracy"], row["chance"]) == (4, 3, 0.75, 0.25)
    # Wilson 95%: p = 0.75, n = 4, z = 1.95996
    z = 1.959963984540054
    centre = (0.75 + z * z / 8) / (1 + z * z / 4)
    half = z * np.sqrt(0.75 * 0.25 / 4 + z * z / 64) / (1 + z * z / 4)
    assert row["ci_low"] == pytest.approx(centre - half) and row["ci_high"] == pytest.approx(centre + half)


def test_run_resumes_set_by_set_after_an_interruption(tiny_llama, tmp_path, monkeypatch):
    """Interrupted during the second sentence set: the rerun computes only that set and gives the whole table."""
    kw = dict(n_sets=2, n_sentences=3, layer=1, scales=(4.0,), layers=[0], scale=4.0, n_random=1,
              bank=_bank(tiny_llama), progress=False)
    whole = loc.run_localization(tiny_llama, **kw).df
    real, calls = loc.answer_logits, []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loc, "answer_logits", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        loc.run_localization(tiny_llama, results_dir=tmp_path, **kw)
    assert len(list((tmp_path / ".chunks").glob("localization-set*.pkl"))) == 1
    calls.clear()
    monkeypatch.setattr(loc, "answer_logits", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = loc.run_localization(tiny_llama, results_dir=tmp_path, **kw).df
    assert len(calls) == 1
    pd.testing.assert_frame_equal(resumed, whole)
