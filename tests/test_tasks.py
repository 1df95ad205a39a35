"""The tasks a yes-bias cannot score (introspection_utils.experiments.tasks) against plain-hook references on
tiny-llama, their
statistics on synthetic truth, the null kinds' defining properties, the strength columns and the atlas's nulls."""

from __future__ import annotations

import ast
import json
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomllib
import torch

from introspection_utils.engine.generation import generate
from introspection_utils.engine.measure import Trial, answer_logits, measure
from introspection_utils.engine.prompts import answer_set, introspection_prompt
from introspection_utils.engine.vectors import (
    NULL_KINDS,
    ConceptVector,
    NullSource,
    VectorBank,
    null_vector,
    residual_norms,
    with_random,
)
from introspection_utils.experiments import atlas as metrics
from introspection_utils.experiments.sweeps import scale_sweep
from introspection_utils.experiments.tasks import common, congruence, forced_choice, strength
from introspection_utils.stats import accuracy as acc
from tests import reference

WORDS = ("Dust", "Satellites", "Trumpets")


def random_bank(handle, words=WORDS, seed: int = 0, norm: float = 8.0) -> VectorBank:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(len(words), handle.arch.n_layers, handle.arch.d_model, generator=g)
    return VectorBank(tuple(words), v / v.norm(dim=-1, keepdim=True) * norm, model=handle.name)


def label_ids_independently(handle, prompt, labels):
    """Each label's id: the last token of the prompt's text with the label appended (written out, no package code)."""
    return [handle.tokenizer(prompt.text + lab, add_special_tokens=False)["input_ids"][-1] for lab in labels]


def reference_last_logits(handle, prompt, spans=(), vector=None, layer=None):
    """Logits at the last position with ``scale × vector`` added over each ``(start, end, scale)`` span (one plain
    forward hook per span on the layer's output)."""
    ids = torch.tensor([list(prompt.input_ids)])
    with ExitStack() as stack, torch.no_grad():
        for start, end, scale in spans:
            mask = torch.zeros(1, ids.shape[1], dtype=torch.bool)
            mask[0, start:end] = True
            stack.enter_context(reference._injection(handle.torch_model, layer, vector[None].float(),
                                                     torch.tensor([float(scale)]), mask))
        return reference._forward(handle.torch_model, ids, torch.ones_like(ids)).logits[0, -1].float()


# ------------------------------------------------------------------------------------------------ forced choice


def test_forced_choice_probabilities_match_the_reference_and_map_shuffled_labels_back(tiny_llama):
    h = tiny_llama
    bank = random_bank(h)
    result = forced_choice.run_forced_choice(h, WORDS, layer=1, scales=[6.0], n_orders=3, n_random=1,
                                     nulls=["isotropic"], bank=bank, seed=3, progress=False)
    df = result.df
    assert set(df["condition"]) == {"concept", "random", "none"}
    orders = forced_choice.balanced_orders(3, 3, 3)
    assert [o.split(",") for o in df["order"].unique()] == [[WORDS[i] for i in o] for o in orders]
    concept_rows = df[df["condition"] == "concept"]
    assert len(concept_rows) == 3 * 3
    for row in concept_rows.itertuples():
        shown = row.order.split(",")
        prompt = forced_choice.forced_choice_prompt(h, shown)
        ids = label_ids_independently(h, prompt, ["1", "2", "3"])
        start = prompt.injection_start
        logits = reference_last_logits(h, prompt, [(start, len(prompt), 6.0)], bank.get(row.target, 1).vector,
                                       layer=1)[ids]
        probs = logits.softmax(-1)  # by position shown
        for pos, concept in enumerate(shown):
            assert getattr(row, f"p_{concept}") == pytest.approx(float(probs[pos]), abs=1e-5)
        assert row.chosen == shown[int(logits.argmax())]
        assert row.chosen_label == str(int(logits.argmax()) + 1)
        assert row.correct == (row.chosen == row.target)
    none = df[df["condition"] == "none"]
    assert len(none) == 3 * 3 and set(none["target"]) == set(WORDS)  # each listing once per target
    assert (none.groupby("order_index")["chosen"].nunique() == 1).all()
    assert np.allclose(concept_rows["effective_strength"], 6.0 * 8.0, rtol=1e-5)


def test_choices_from_logits_maps_positions_to_canonical_concepts():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    chosen, probs = forced_choice.choices_from_logits(logits, [2, 0, 1])  # position 0 shows concept 2, ...
    assert chosen.tolist() == [0, 2]
    assert torch.allclose(probs[0], logits[0].softmax(-1)[[1, 2, 0]])


def test_a_label_of_several_tokens_is_an_error_naming_it(tiny_llama):
    prompt = forced_choice.forced_choice_prompt(tiny_llama, list(WORDS))
    assert len(common.label_token_ids(tiny_llama, prompt, ["1", "2", "3"])) == 3
    with pytest.raises(ValueError, match="label '12' is not a single token"):
        common.label_token_ids(tiny_llama, prompt, ["1", "12"])
    with pytest.raises(ValueError, match="forced choice needs 2..9 distinct concepts"):
        forced_choice.run_forced_choice(tiny_llama, ["Dust"], progress=False)


def test_mutual_information_is_zero_at_chance_and_finds_a_planted_signal():
    rng = np.random.default_rng(0)
    labels = list("ABCD")
    n = 4000
    targets = rng.choice(labels, n)
    chance_choice = rng.choice(labels, n)
    mi, p, _ = forced_choice.mi_permutation_test(targets, chance_choice, labels, n_permutations=200)
    assert mi < 0.01 and p > 0.01
    planted = np.where(rng.random(n) < 0.5, targets, chance_choice)
    mi, p, null_mean = forced_choice.mi_permutation_test(targets, planted, labels, n_permutations=200)
    assert mi > 0.2 and p < 0.01 and null_mean < 0.01
    assert forced_choice.mutual_information(np.eye(4) * 10) == pytest.approx(2.0)  # a perfect 4-way code: 2 bits
    assert forced_choice.mutual_information(np.ones((4, 4))) == pytest.approx(0.0)


def test_forced_choice_summary_puts_chance_in_the_interval_and_the_planted_signal_above_it():
    rng = np.random.default_rng(1)
    labels = ["a", "b", "c"]
    n = 600
    targets = rng.choice(labels, n)
    chance = rng.choice(labels, n)
    planted = np.where(rng.random(n) < 0.6, targets, chance)
    df = pd.DataFrame({"condition": ["none"] * n + ["concept"] * n, "null_kind": "", "layer": 1,
                       "scale": [0.0] * n + [4.0] * n, "target": np.r_[targets, targets],
                       "chosen": np.r_[chance, planted]})
    df["correct"] = df["target"] == df["chosen"]
    summary = forced_choice.forced_choice_summary(df).set_index("condition")
    assert summary.loc["none", "ci_low"] < 1 / 3 < summary.loc["none", "ci_high"]
    assert summary.loc["concept", "ci_low"] > 1 / 3 and summary.loc["concept", "mi_p"] < 0.01
    assert "above chance" in forced_choice.describe_forced_choice(summary.reset_index())
    assert forced_choice.forced_choice_found(summary.reset_index())
    # a null vector kind that names the concept as well as the concept vectors do: not found
    null = df[df["condition"] == "concept"].assign(condition="random", null_kind="isotropic")
    both = forced_choice.forced_choice_summary(pd.concat([df, null]))
    assert not forced_choice.forced_choice_found(both)
    chance_only = df.assign(chosen=np.r_[chance, chance])
    chance_only["correct"] = chance_only["target"] == chance_only["chosen"]
    assert not forced_choice.forced_choice_found(forced_choice.forced_choice_summary(chance_only))


def test_the_figure_the_notebook_table_and_the_findings_row_read_one_forced_choice_summary(tiny_llama, tmp_path):
    """Notebook 13 on a tiny model: the summary it prints, the numbers in its figure's title and the findings' row
    recomputed from the saved table (with another run seed) are one computation — the same scale, accuracy and
    permutation p (the figure once said p = 0.562 where the README said 0.574: 1000 draws seeded by the run against
    the findings' 2000 seeded by 0)."""
    from introspection_utils.apps import findings
    from introspection_utils.plotting.tasks import plot_forced_choice
    from introspection_utils.readings import saved

    result = forced_choice.run_forced_choice(tiny_llama, WORDS, layer=1, scales=[2.0, 6.0], n_orders=2, n_random=1,
                                             nulls=["isotropic"], bank=random_bank(tiny_llama), seed=5,
                                             results_dir=tmp_path, progress=False)
    summary = forced_choice.forced_choice_summary(result.df)
    best = common.best_row(summary)
    fig = plot_forced_choice(result, summary)
    title = fig.axes[0].get_title()
    assert f"scale {best['scale']:g}" in title and f"p = {best['mi_p']:.3g}" in title
    assert f"{best['accuracy']:.0%} correct" in title
    reading = forced_choice.describe_forced_choice(summary)
    assert f"at scale {best['scale']:g}" in reading and f"permutation p = {best['mi_p']:.3g}" in reading
    pd.testing.assert_frame_equal(forced_choice.forced_choice_summary(result.df.sample(frac=1, random_state=0)),
                                  summary)  # the table alone decides it, not the row order
    assert findings.task_rows(tmp_path).iloc[0]["evidence"] == reading
    assert saved.task_sentences(tmp_path)[0] == reading


def test_best_is_the_highest_accuracy_in_every_reading_figure_and_rule():
    """One definition of a task's best point (``common.best_row``): where the concept vectors are named most often.
    Planted: at scale 2 the model names the injected concept 60% of the time; at scale 8 it answers one fixed
    wrong concept for each target (MI high, accuracy 0). Every reader of the summary — the sentence, the figure's
    confusion panel, the "found" rule and the organisms' row — speaks of scale 2."""
    import matplotlib.pyplot as plt

    from introspection_utils.core.results import SweepResult
    from introspection_utils.plotting.tasks import plot_forced_choice

    rng = np.random.default_rng(4)
    labels, n = ["a", "b", "c"], 300
    targets = rng.choice(labels, n)
    right = np.where(rng.random(n) < 0.6, targets, rng.choice(labels, n))
    shifted = np.array([labels[(labels.index(t) + 1) % 3] for t in targets])  # a perfect code, always wrong
    df = pd.DataFrame({"condition": "concept", "null_kind": "", "layer": 1, "scale": [2.0] * n + [8.0] * n,
                       "target": np.r_[targets, targets], "chosen": np.r_[right, shifted]})
    df["correct"] = df["target"] == df["chosen"]
    summary = forced_choice.forced_choice_summary(df)
    by_scale = summary.set_index("scale")
    assert by_scale.loc[8.0, "mi_bits"] > by_scale.loc[2.0, "mi_bits"]  # MI would have picked scale 8
    assert common.best_row(summary)["scale"] == 2.0
    assert "at scale 2," in forced_choice.describe_forced_choice(summary)
    assert forced_choice.forced_choice_found(summary)
    result = SweepResult(df, {"model": "planted", "spec": {"concepts": labels, "layer": 1, "n_orders": 1}})
    fig = plot_forced_choice(result, summary)
    assert "scale 2" in fig.axes[0].get_title()
    plt.close(fig)
    gaps = pd.DataFrame({"condition": "concept", "null_kind": "", "layer": 1, "scale": [2.0, 8.0],
                         "mean_gap": [0.1, 0.7], "accuracy": np.nan}).drop(columns="accuracy")
    assert common.best_row(gaps)["scale"] == 8.0  # congruence names nothing: its mean gap
    with pytest.raises(ValueError, match="accuracy"):
        common.best_row(gaps.drop(columns="mean_gap"))


# ------------------------------------------------------------------------------------------------ congruence


def test_congruence_prompts_name_the_concept_and_inject_from_the_trial_line(tiny_llama):
    h = tiny_llama
    prompt = congruence.congruence_prompt(h, "Dust")
    assert prompt.question == "Trial 1: Do you detect an injected thought about dust?"
    paper = introspection_prompt(h)
    assert prompt.injection_start == paper.injection_start  # the same frame: the "\n\n" before the trial line
    assert h.tokenizer.decode(list(prompt.input_ids[prompt.injection_start:])).lstrip("Ċ").startswith("\n\nTrial 1")


def test_congruence_pairs_each_concept_with_its_most_anti_aligned_and_matches_the_reference(tiny_llama):
    h = tiny_llama
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(h.arch.d_model, generator=g), torch.randn(h.arch.d_model, generator=g)
    vecs = torch.stack([a, b, -a * 0.9 + 0.1 * b])[:, None, :].expand(3, h.arch.n_layers, -1) * 2
    bank = VectorBank(("Dust", "Satellites", "Trumpets"), vecs.contiguous(), model=h.name)
    assert congruence.incongruent_partners(bank, 1)["Dust"] == "Trumpets"
    result = congruence.run_congruence(h, bank.words, layer=1, scales=[5.0], n_random=1, bank=bank, progress=False)
    df = result.df
    assert result.meta["spec"]["partners"]["Dust"] == "Trumpets"
    for row in df[df["condition"] == "concept"].itertuples():
        prompt = congruence.congruence_prompt(h, row.named)
        assert row.congruent == (row.named == row.concept)
        sets = answer_set(h)  # the engine reads yes and no as log-sum-exp over their token variants
        vec = bank.get(row.concept, 1).vector
        inj = reference_last_logits(h, prompt, [(prompt.injection_start, len(prompt), 5.0)], vec, layer=1)
        plain = reference_last_logits(h, prompt)

        def yes_minus_no(logits, sets=sets):
            yes, no = logits[list(sets.yes)].double(), logits[list(sets.no)].double()
            return torch.logsumexp(yes, 0) - torch.logsumexp(no, 0)

        assert row.delta == pytest.approx(float(yes_minus_no(inj) - yes_minus_no(plain)), abs=1e-4)


def test_sign_flip_and_congruence_summary_on_synthetic_gaps():
    assert congruence.sign_flip_test([1.0] * 8) == pytest.approx(1 / 256)
    rng = np.random.default_rng(2)
    null = rng.normal(0, 1, 12)
    assert congruence.sign_flip_test(np.r_[null, -null]) > 0.3  # symmetric around 0
    rows = []
    for k, concept in enumerate(f"c{i}" for i in range(10)):
        shared = rng.normal(2, 1)  # a yes-bias: both questions lifted alike
        for condition, gap in (("concept", 1.0 + 0.1 * k), ("random", 0.0)):
            rows += [{"condition": condition, "null_kind": "" if condition == "concept" else "isotropic",
                      "vector_seed": pd.NA if condition == "concept" else 0, "concept": concept, "layer": 1,
                      "scale": 4.0, "congruent": c, "delta": shared + (gap if c else 0.0) + rng.normal(0, 0.01)}
                     for c in (True, False)]
    summary = congruence.congruence_summary(pd.DataFrame(rows)).set_index("condition")
    assert summary.loc["concept", "p_signflip"] < 0.01 and summary.loc["concept", "n_positive"] == 10
    assert abs(summary.loc["random", "mean_gap"]) < 0.05 and summary.loc["random", "p_signflip"] > 0.01
    assert summary.loc["concept", "mean_gap"] == pytest.approx(1.45, abs=0.02)
    assert congruence.congruence_found(summary.reset_index())
    shared_only = pd.DataFrame(rows)  # the planted gaps taken out: the yes-bias lifts both questions alike
    planted = shared_only["congruent"] & (shared_only["condition"] == "concept")
    shared_only["delta"] -= np.where(planted, 1.0 + 0.1 * shared_only["concept"].str[1:].astype(int), 0.0)
    assert not congruence.congruence_found(congruence.congruence_summary(shared_only))


# ------------------------------------------------------------------------------------------------ strength comparison


def test_strength_prompt_spans_cover_each_sentence(tiny_llama):
    two = strength.strength_prompt(tiny_llama, ["The dog barks loudly.", "It rained all day."])
    for (start, end), sentence in zip(two.spans, two.sentences, strict=True):
        text = tiny_llama.tokenizer.decode(list(two.prompt.input_ids[start:end]))
        assert text.strip() == sentence
    assert two.prompt.text.endswith("The sentence with the stronger injected thought is SENTENCE ")


def test_two_strengths_in_one_prompt_match_two_plain_hooks(tiny_llama):
    h = tiny_llama
    two = strength.strength_prompt(h, ["The dog barks loudly.", "It rained all day."])
    v = random_bank(h).get("Dust", 0)
    ids = label_ids_independently(h, two.prompt, ["1", "2"])
    trials = [strength.strength_trial(two, v, 6.0, 2.0), strength.strength_trial(two, v, 2.0, 6.0),
              strength.strength_trial(two, None, 0, 0)]
    got = answer_logits(h, trials, ids)
    (a1, b1), (a2, b2) = two.spans
    for (first, second), row in zip( [(6.0, 2.0), (2.0, 6.0), (0.0, 0.0)], got, strict=True):
        spans = [(a1, b1, first), (a2, b2, second)] if first else []
        expected = reference_last_logits(h, two.prompt, spans, v.vector, layer=0)[ids]
        torch.testing.assert_close(row, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got[0], got[1])
    full = answer_logits(h, trials[:2], ids, strategy="full")
    torch.testing.assert_close(full, got[:2], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="weighted span"):
        measure(h, [Trial(two.prompt, v, 1.0, window=((a1, b1, 1.0), (a2, len(two.prompt) + 5, 1.0)))])
    with pytest.raises(ValueError, match="weighted spans are read by measure.measure"):
        generate(h, trials[:1], max_new_tokens=1)


def test_strength_comparison_is_counterbalanced_and_its_summary_reads_chance_and_signal(tiny_llama):
    result = strength.run_strength_comparison(tiny_llama, ["Dust"], layers=[0, 1], pairs=[(2.0, 6.0)], n_sets=1,
                                           n_random=1, bank=random_bank(tiny_llama), progress=False)
    df = result.df
    injected = df[df["condition"] != "none"]
    assert (injected.groupby(["condition", "layer"])["stronger"].value_counts() == 1).all()
    assert set(zip(injected["first_scale"], injected["second_scale"], injected["stronger"],
                   strict=True)) == {(6.0, 2.0, 1), (2.0, 6.0, 2)}
    always_one = pd.DataFrame({"condition": "concept", "null_kind": "", "layer": 1, "stronger": [1, 2] * 50,
                               "chosen": 1})
    always_one["correct"] = always_one["chosen"] == always_one["stronger"]
    s = strength.strength_summary(always_one).iloc[0]
    assert s["accuracy"] == 0.5 and s["first_bias"] == 1.0 and s["ci_low"] < 0.5 < s["ci_high"]
    good = always_one.assign(chosen=np.where(np.arange(100) % 10 == 0, 3 - always_one["stronger"],
                                             always_one["stronger"]))
    good["correct"] = good["chosen"] == good["stronger"]
    s = strength.strength_summary(good).iloc[0]
    assert s["accuracy"] == 0.9 and s["ci_low"] > 0.5 and s["p_binomial"] < 1e-6
    assert strength.strength_found(strength.strength_summary(good))
    assert not strength.strength_found(strength.strength_summary(always_one))  # a position bias is not strength
    as_good = good.assign(condition="random", null_kind="isotropic")
    assert not strength.strength_found(strength.strength_summary(pd.concat([good, as_good])))


# ------------------------------------------------------------------------------------------------ null kinds


def _source(d: int = 16, n_layers: int = 2, n: int = 40) -> NullSource:
    g = torch.Generator().manual_seed(9)
    basis = torch.randn(3, d, generator=g)  # the baseline words vary in a 3-dimensional subspace only
    acts = torch.randn(n, n_layers, 3, generator=g) * torch.tensor([5.0, 1.0, 0.2]) @ basis + torch.randn(d)
    return NullSource(tuple(f"w{i}" for i in range(n)), acts)


def test_every_null_kind_is_norm_matched_seeded_and_recorded():
    source = _source()
    like = ConceptVector("w3", 1, torch.randn(16) * 3, model="m")
    for kind in NULL_KINDS:
        a, b = null_vector(like, 0, kind, source), null_vector(like, 0, kind, source)
        assert a.kind == "random" and a.null == kind and a.seed == 0 and a.layer == 1
        assert a.norm == pytest.approx(like.norm, rel=1e-5)
        assert torch.equal(a.vector, b.vector)  # seeded
        assert not torch.equal(a.vector, null_vector(like, 1, kind, source).vector)
    vs = with_random(like, 2, 0, nulls=NULL_KINDS, source=source)
    assert [v.null for v in vs] == [None, *[k for k in NULL_KINDS for _ in range(2)]]


def test_shuffled_null_is_a_permutation_of_the_concept_vector():
    like = ConceptVector("c", 0, torch.randn(32))
    shuffled = null_vector(like, 4, "shuffled").vector
    assert torch.equal(shuffled.sort().values, like.vector.sort().values)
    assert not torch.equal(shuffled, like.vector)


def test_covariance_null_lies_in_the_baseline_span_and_follows_its_covariance():
    source = _source()
    acts = source.activations[:, 1]
    centred = acts - acts.mean(0)
    like = ConceptVector("c", 1, torch.randn(16))
    draws = torch.stack([null_vector(like, s, "covariance", source).vector for s in range(400)])
    q, _ = torch.linalg.qr(centred.T)  # an orthonormal basis of the span
    residual = draws - draws @ q @ q.T
    assert residual.norm(dim=-1).max() < 1e-3 * like.norm
    top = torch.linalg.svd(centred, full_matrices=False).Vh[0]  # the baseline words' main direction
    second = torch.linalg.svd(draws, full_matrices=False).Vh[0]
    assert abs(float(top @ second)) > 0.95


def test_other_word_null_is_a_held_out_word_minus_the_others_mean():
    source = _source()
    like = ConceptVector("w3", 1, torch.randn(16) * 2)
    v = null_vector(like, 7, "other-word", source).vector
    acts = source.activations[:, 1]
    candidates = [(acts[i] - acts[torch.arange(len(acts)) != i].mean(0)) for i in range(len(acts))]
    cosines = [float(torch.nn.functional.cosine_similarity(v, c, dim=0)) for c in candidates]
    best = int(np.argmax(cosines))
    assert cosines[best] == pytest.approx(1.0, abs=1e-5) and source.words[best] != "w3"


def test_null_kinds_are_validated():
    like = ConceptVector("c", 0, torch.randn(8))
    with pytest.raises(ValueError, match="unknown null kind 'gaussian'"):
        null_vector(like, 0, "gaussian")
    with pytest.raises(ValueError, match="pass source=null_source"):
        null_vector(like, 0, "covariance")


# ------------------------------------------------------------------------------------------------ strengths, atlas


def test_residual_norm_is_the_median_token_norm_of_the_reference_forward(tiny_llama, isolated_cache):
    h = tiny_llama
    prompt = introspection_prompt(h)
    norms = residual_norms(h, prompt)
    ids = torch.tensor([list(prompt.input_ids)])
    store = [None] * h.arch.n_layers
    with torch.no_grad(), reference._capture_layer_outputs(h.torch_model, store):
        reference._forward(h.torch_model, ids, torch.ones_like(ids))
    expected = torch.stack([s[0].float().norm(dim=-1).median() for s in store])
    torch.testing.assert_close(norms, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(residual_norms(h, prompt), norms)  # read back from the cache


def test_sweep_tables_carry_null_kind_and_comparable_strengths(tiny_llama, isolated_cache):
    h = tiny_llama
    bank = random_bank(h, ("Dust", "Satellites"))
    raw = scale_sweep(h, ["Dust", "Satellites"], [2.0, 4.0], layer=1, n_controls=1, n_random=1,
                      nulls=["isotropic", "shuffled"], bank=bank, progress=False).df
    assert list(raw.columns[-3:]) == ["null_kind", "effective_strength", "relative_strength"]
    assert set(raw.loc[raw["vector_kind"] == "random", "null_kind"]) == {"isotropic", "shuffled"}
    assert set(raw.loc[raw["vector_kind"] == "concept", "null_kind"]) == {""}
    h_norm = float(residual_norms(h, introspection_prompt(h))[1])
    np.testing.assert_allclose(raw["effective_strength"], raw["scale"] * raw["vector_norm"], rtol=1e-6)
    np.testing.assert_allclose(raw["relative_strength"], raw["effective_strength"] / h_norm, rtol=1e-6)
    rel = scale_sweep(h, ["Dust"], [0.5, 1.0], layer=1, n_controls=1, n_random=1, bank=bank, strength="relative",
                      progress=False).df
    np.testing.assert_allclose(sorted(set(rel["relative_strength"].round(6))), [0.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(rel["scale"], rel["relative_strength"] * h_norm / rel["vector_norm"], rtol=1e-5)
    with pytest.raises(ValueError, match="strength 'norm' must be one of raw, relative"):
        scale_sweep(h, ["Dust"], [1.0], layer=1, n_controls=1, bank=bank, strength="norm", progress=False)


def test_atlas_reports_p_under_each_null_it_was_given(tiny_llama, isolated_cache):
    h = tiny_llama
    words = ("Dust", "Satellites", "Trumpets")
    table, sweep = metrics.run_atlas(h, words, [4.0, 8.0], layer=1, n_controls=2, n_random=1,
                                     nulls=["isotropic", "shuffled", "covariance", "other-word"],
                                     bank=random_bank(h, words), n_boot=20, progress=False)
    for kind in ("isotropic", "shuffled", "covariance", "other_word"):
        assert table[f"p_random_{kind}"].between(0, 1).all()
    assert np.allclose(table["p_random"], table["p_random_isotropic"])
    assert set(sweep.df["null_kind"]) == {"", "isotropic", "shuffled", "covariance", "other-word"}
    with pytest.raises(ValueError, match="no random vectors of null kind 'shuffled'"):
        metrics.with_null(sweep.df[sweep.df["null_kind"] != "shuffled"], "shuffled")


# ------------------------------------------------------------------------------------------------ position and power


@pytest.mark.parametrize("n, n_orders, listings", [(3, 1, 3), (3, 3, 3), (3, 4, 6), (5, 7, 10), (4, 8, 8)])
def test_balanced_orders_put_every_concept_at_every_position_equally_often(n, n_orders, listings):
    orders = forced_choice.balanced_orders(n, n_orders, seed=2)
    assert len(orders) == listings
    assert all(sorted(o) == list(range(n)) for o in orders)
    counts = np.zeros((n, n), dtype=int)  # [concept, position]
    for o in orders:
        for position, concept in enumerate(o):
            counts[concept, position] += 1
    assert (counts == listings // n).all()
    assert orders == forced_choice.balanced_orders(n, n_orders, seed=2)
    with pytest.raises(ValueError, match="n_orders"):
        forced_choice.balanced_orders(n, 0, seed=2)


def test_position_matched_chance_is_exactly_one_over_n_on_a_balanced_design_and_not_on_an_unbalanced_one():
    rng = np.random.default_rng(0)
    answers = rng.choice(5, size=40, p=[0.6, 0.1, 0.1, 0.1, 0.1])  # a responder leaning on position 1
    balanced = np.repeat(np.arange(5), 3)
    assert acc.position_matched_chance(balanced, answers, 5) == 1 / 5
    assert acc.positions_balanced(balanced, 5)
    unbalanced = np.array([0, 0, 0, 1, 2])  # the target first in 3 of 5 trials
    q = np.bincount(answers, minlength=5) / len(answers)  # independent reference: the mean of q at the targets
    assert acc.position_matched_chance(unbalanced, answers, 5) == pytest.approx(q[unbalanced].mean(), abs=1e-12)
    assert acc.position_matched_chance(unbalanced, answers, 5) > 1 / 5
    assert not acc.positions_balanced(unbalanced, 5)


def _position_only_table(orders, concepts, answer_position, condition="concept", scale=4.0):
    """A forced-choice table whose every trial answers ``answer_position`` (0-based) whatever was injected."""
    rows = [{"condition": condition, "null_kind": "", "layer": 1, "scale": scale, "order": ",".join(o),
             "target": t, "chosen": o[answer_position], "chosen_label": str(answer_position + 1)}
            for o in orders for t in concepts]
    df = pd.DataFrame(rows)
    df["correct"] = df["target"] == df["chosen"]
    return df


def test_an_interrupted_forced_choice_resumes_at_the_listing_it_stopped_in(tiny_llama, tmp_path, monkeypatch):
    """Each listing's answers are kept under the results folder as they finish: a run stopped in its second listing
    keeps the first, the rerun computes only the rest and writes the table a run without interruption writes; other
    vectors are not served from those chunks."""
    settings = dict(layer=1, scales=[6.0], n_orders=2, n_random=1, nulls=["isotropic"], bank=random_bank(tiny_llama),
                    progress=False)
    whole = forced_choice.run_forced_choice(tiny_llama, WORDS, **settings, results_dir=tmp_path / "whole")
    real, calls = forced_choice.answer_logits, []

    def stops_in_the_second_listing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(forced_choice, "answer_logits", stops_in_the_second_listing)
    with pytest.raises(KeyboardInterrupt):
        forced_choice.run_forced_choice(tiny_llama, WORDS, **settings, results_dir=tmp_path / "cut")
    calls.clear()
    monkeypatch.setattr(forced_choice, "answer_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = forced_choice.run_forced_choice(tiny_llama, WORDS, **settings, results_dir=tmp_path / "cut")
    n_listings = whole.df["order_index"].nunique()
    assert len(calls) == n_listings - 1
    pd.testing.assert_frame_equal(resumed.df, whole.df)
    calls.clear()
    other = {**settings, "bank": random_bank(tiny_llama, seed=1)}
    forced_choice.run_forced_choice(tiny_llama, WORDS, **other, results_dir=tmp_path / "cut")
    assert len(calls) == n_listings


def test_forced_choice_position_only_responder_scores_exactly_chance_and_an_old_unbalanced_table_says_so():
    concepts = ["A", "B", "C", "D", "E"]
    orders = [[concepts[i] for i in o] for o in forced_choice.balanced_orders(5, 5, seed=1)]
    df = pd.concat([_position_only_table(orders, concepts, 0),
                    _position_only_table(orders, concepts, 0, condition="none", scale=0.0)])
    summary = forced_choice.forced_choice_summary(df)
    best = common.best_row(summary)
    assert best["accuracy"] == 1 / 5 and best["position_chance"] == 1 / 5 and best["balanced"]
    assert not forced_choice.forced_choice_found(summary)
    assert "exactly chance (position-matched chance 20%)" in forced_choice.describe_forced_choice(summary)
    # An old table: the concept trials of one listing only, where the targets sit at the positions the
    # no-injection trials favour — the position-matched chance rises above 1/N, is said, and is the bar.
    one = _position_only_table(orders[:1], concepts, 0)
    one = one[one["target"].isin(orders[0][:2])]  # the targets shown first and second
    none = _position_only_table(orders, concepts, 0, condition="none", scale=0.0)
    summary = forced_choice.forced_choice_summary(pd.concat([one, none]))
    row = summary[summary["condition"] == "concept"].iloc[0]
    assert not row["balanced"] and row["position_chance"] > row["chance"]
    text = forced_choice.describe_forced_choice(summary)
    assert "not balanced" in text and f"would score {row['position_chance']:.0%}" in text


def test_a_run_s_forced_choice_is_balanced_and_its_position_matched_chance_is_exactly_one_over_n(tiny_llama):
    result = forced_choice.run_forced_choice(tiny_llama, WORDS, layer=1, scales=[6.0], n_orders=2, n_random=1,
                                             nulls=["isotropic"], bank=random_bank(tiny_llama), progress=False)
    assert result.meta["spec"]["n_orders"] == 3 and result.meta["spec"]["n_orders_asked"] == 2
    summary = forced_choice.forced_choice_summary(result.df)
    assert summary["balanced"].all()
    assert (summary["position_chance"] == 1 / 3).all()


def test_strength_reads_no_accuracy_where_the_injection_leaves_the_readout_alone():
    none = pd.DataFrame({"condition": "none", "null_kind": "", "layer": pd.NA, "set_index": [0, 0, 1, 1],
                         "stronger": [1, 2, 1, 2], "margin": [0.5, 0.5, -0.3, -0.3]})
    still = none.assign(condition="concept", layer=0, margin=none["margin"] + [0.01, -0.01, 0.02, 0.0])
    moving = none.assign(condition="concept", layer=1, margin=[3.0, -3.0, 2.5, -2.0])
    df = pd.concat([none, still, moving] * 10, ignore_index=True)
    df["chosen"] = np.where(df["margin"] > 0, 1, 2)
    df["correct"] = df["chosen"] == df["stronger"]
    summary = strength.strength_summary(df).set_index(["condition", "layer"])
    assert summary.loc[("concept", 0), "margin_shift"] == pytest.approx(0.01)
    assert not summary.loc[("concept", 0), "moved"] and summary.loc[("concept", 1), "moved"]
    assert summary.loc[("concept", 1), "position_chance"] == 0.5 and summary["balanced"].all()
    assert strength.strength_found(summary.reset_index())
    unmoved = summary.reset_index()
    unmoved = unmoved[unmoved["layer"] != 1].assign(accuracy=0.9, ci_low=0.8)  # however high, not read
    unmoved.loc[unmoved["condition"] == "none", "accuracy"] = 0.5
    assert not strength.strength_found(unmoved)
    text = strength.describe_strength(unmoved)
    assert "does not move the readout" in text and "There: 90% correct (95% CI" in text  # its accuracy still stated


def _sizes(table: dict, notebook: dict) -> dict[str, int]:
    """Trials per point of notebook 13's three accuracy tasks under a parameter table (notebook defaults below)."""
    p = {**notebook, **table}
    n_concepts = len(p["concepts"])
    listings = -(-p["n_orders"] // n_concepts) * n_concepts
    return {"forced choice": n_concepts * listings,
            "strength comparison": len(p["strength_concepts"]) * p["n_sets"] * len(p["pairs"]) * 2,
            "localization": p["n_sets"] * 5}


@pytest.mark.parametrize("path, key", [("data/findings/qwen2.5-coder-1.5b-instruct.toml", "13"),
                                       ("data/full_size.toml", "13")])
def test_the_findings_and_full_sizes_of_notebook_13_reach_80_percent_power_at_twice_chance(path, key):
    root = Path(__file__).resolve().parents[1]
    table = tomllib.loads((root / path).read_text())[key]
    cell = json.loads((root / "notebooks/13_yes_bias_free_tasks.ipynb").read_text())["cells"][1]
    defaults = {}
    for node in ast.parse("".join(cell["source"])).body:
        defaults[node.targets[0].id] = ast.literal_eval(node.value)
    p = {**defaults, **table}
    chances = {"forced choice": 1 / len(p["concepts"]), "strength comparison": 0.5, "localization": 1 / 5}
    for task, n in _sizes(table, defaults).items():
        assert n >= acc.sample_size(chances[task]), (task, n)
        assert acc.detection_power(n, chances[task], min(2 * chances[task], (1 + chances[task]) / 2)) >= 0.8
