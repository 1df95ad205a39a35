"""Direct logit attribution, activation patching, attribution patching and head ablation against the plain-hook
reference (tests/reference.py), on every tiny family (perturbed norms, untied unembedding, Gemma-2 in its softcap's
curved range) and on the embedded model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from introspection_utils.engine.components import Site
from introspection_utils.engine.measure import Trial, measure
from introspection_utils.engine.prompts import control_questions, introspection_prompt
from introspection_utils.engine.vectors import ConceptVector
from introspection_utils.experiments import attribution, patching

# attribution and patching read the plain logit difference of one yes and one no token (a linear readout)
PAIR = ("Yes", "No")


def make_vector(handle, seed: int, layer: int = 0, norm: float = 8.0) -> ConceptVector:
    direction = torch.randn(handle.arch.d_model, generator=torch.Generator().manual_seed(seed))
    return ConceptVector(f"v{seed}", layer, direction / direction.norm() * norm, kind="random", seed=seed,
                         model=handle.name)


def prompts(handle):
    return [introspection_prompt(handle), introspection_prompt(handle, control_questions(1)[0])]


def injection(oracle, trial) -> dict:
    return oracle._injection(trial)


# ------------------------------------------------------------------ direct logit attribution


def test_attribution_sums_reproduce_the_model_through_the_softcap(tiny_perturbed, oracle):
    handle = tiny_perturbed
    intro, control = prompts(handle)
    v0, v1 = make_vector(handle, 1, layer=0), make_vector(handle, 2, layer=1)
    trials = [Trial(intro, v0, 4.0), Trial(intro, v0, -3.0), Trial(intro), Trial(control, v1, 6.0),
              Trial(control, v0, 2.0, window="last"),
              Trial(control, v0, 5.0, window=(control.injection_start, len(control) - 2))]
    df = attribution.direct_logit_attribution(handle, trials)
    cap = handle.arch.final_logit_softcap
    sums = attribution.totals(df, cap)
    oracle.assert_close(sums["diff"].to_numpy().copy(), oracle.logit_diff(handle, trials, answers=PAIR))
    readout = measure(handle, trials, answers=PAIR)  # the model's own yes and no logits, softcap included
    capped = sums[["yes", "no"]].to_numpy()
    capped = cap * np.tanh(capped / cap) if cap else capped
    oracle.assert_close(capped, readout.logits)
    if cap:  # the cap really bends these logits: the raw difference is not the model's
        assert float((sums["raw_diff"] - sums["diff"]).abs().max()) > 1e-2
    has_injection = df[df["component"] == "injection"]["trial"].unique().tolist()
    assert has_injection == [0, 1, 3, 4]  # the answer position is outside the (start, 40) window


def test_attribution_components_match_the_reference(tiny_perturbed, oracle):
    handle = tiny_perturbed
    intro, control = prompts(handle)
    trials = [Trial(intro, make_vector(handle, 3, layer=0), 5.0), Trial(control)]
    df = attribution.direct_logit_attribution(handle, trials)
    ids = oracle.yes_no(handle)
    for index, trial in enumerate(trials):
        ref = oracle.ref.logit_attribution(handle.torch_model, oracle.ids(trial.prompt), **ids,
                                           **injection(oracle, trial))
        rows = df[df["trial"] == index]

        def values(component, rows=rows):
            part = rows[rows["component"] == component].sort_values(["comp_layer", "head"])
            return part[["yes", "no"]].to_numpy()

        oracle.assert_close(values("embed")[0], ref["embed"])
        oracle.assert_close(values("attn"), ref["attn"])
        oracle.assert_close(values("mlp"), ref["mlp"])
        oracle.assert_close(values("head"), ref["heads"].reshape(-1, 2))
        if trial.injected:
            oracle.assert_close(values("injection")[0], ref["injection"])
        whole = rows[rows["component"] != "head"][["yes", "no"]].sum().to_numpy()
        oracle.assert_close(whole, ref["raw"])  # the reference's own final norm and unembedding


def test_heads_add_up_to_their_layer_attention(tiny_perturbed):
    handle = tiny_perturbed
    intro, _ = prompts(handle)
    df = attribution.direct_logit_attribution(handle, [Trial(intro, make_vector(handle, 4), 6.0)])
    heads = df[df["component"] == "head"].groupby("comp_layer")["diff"].sum().to_numpy()
    attn = df[df["component"] == "attn"].sort_values("comp_layer")["diff"].to_numpy()
    np.testing.assert_allclose(heads, attn, atol=1e-5 * max(1.0, np.abs(attn).max()))
    assert df[df["component"] == "head"]["head"].nunique() == handle.arch.n_heads


def test_difference_in_differences_by_hand():
    rows = []
    values = {("introspection", True): [5.0], ("introspection", False): [1.0], ("control", True): [2.0, 4.0],
              ("control", False): [1.0, 1.0]}
    trial = 0
    for (kind, injected), diffs in values.items():
        for d in diffs:
            rows.append({"question_kind": kind, "injected": injected, "trial": trial, "component": "mlp",
                         "comp_layer": 3, "head": pd.NA, "diff": d})
            trial += 1
    table = attribution.difference_in_differences(pd.DataFrame(rows))
    row = table.iloc[0]
    assert (row["intro_effect"], row["control_effect"], row["did"]) == (4.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="cell"):
        attribution.difference_in_differences(pd.DataFrame(rows[:1]))


def test_attribution_cells_and_did_per_layer(tiny_llama):
    vector = make_vector(tiny_llama, 5, layer=0)
    df = attribution.attribution_cells(tiny_llama, vector, 6.0, n_controls=2)
    assert set(df["question_kind"]) == {"introspection", "control"} and set(df["injected"]) == {True, False}
    assert df["question"].nunique() == 3
    per_layer = attribution.did_by_layer(df)
    per_component = attribution.difference_in_differences(df[df["component"] != "head"])
    assert per_layer["comp_layer"].tolist() == [-1, 0, 1]
    np.testing.assert_allclose(per_layer["did"].sum(), per_component["did"].sum(), atol=1e-5)
    # the whole DiD is the DiD of the model's logit differences (llama: no softcap)
    sums = attribution.totals(df).merge(df[["trial", "question_kind", "injected"]].drop_duplicates(), on="trial")
    whole = attribution.difference_in_differences(sums.assign(component="all", comp_layer=0, head=0))
    np.testing.assert_allclose(whole["did"].iloc[0], per_component["did"].sum(), atol=1e-5)


# ------------------------------------------------------------------ activation patching


def reference_patch(oracle, handle, trial, site: Site, positions, direction: str) -> float:
    injected, plain = injection(oracle, trial), injection(oracle, Trial(trial.prompt))
    source, target = (injected, plain) if direction == "sufficiency" else (plain, injected)
    return oracle.ref.patched_yes_no_logit_diff(handle.torch_model, oracle.ids(trial.prompt), **oracle.yes_no(handle),
                                                site=(site.kind, site.layer, site.head), positions=positions,
                                                source=source, target=target)


@pytest.mark.parametrize("span", ["answer", "window"])
def test_activation_patching_equals_recomputation_with_the_patched_activation(tiny_perturbed, oracle, span):
    handle = tiny_perturbed
    intro, control = prompts(handle)
    trials = [Trial(intro, make_vector(handle, 6, layer=0), 6.0), Trial(control, make_vector(handle, 7, layer=0), -5.0)]
    span = "answer" if span == "answer" else (intro.injection_start + 1, len(intro))
    sites = [Site(1, "attn"), Site(1, "mlp"), Site(1, "head", 2), Site(1, "head", 0), Site(0, "mlp")]
    df = patching.activation_patching(handle, trials[:1] if span != "answer" else trials, sites, span=span,
                                      batch_size=3)
    assert len(df) == len(sites) * 2 * (1 if span != "answer" else 2)
    for row in df.itertuples():
        trial = trials[0] if row.question_kind == "introspection" else trials[1]
        site = Site(int(row.comp_layer), row.kind, None if pd.isna(row.head) else int(row.head))
        positions = torch.tensor([len(trial.prompt) - 1]) if span == "answer" else torch.arange(*span)
        expected = reference_patch(oracle, handle, trial, site, positions, row.direction)
        oracle.assert_close(row.patched, expected)
    injected = oracle.logit_diff(handle, trials[:1], answers=PAIR)
    plain = oracle.logit_diff(handle, [Trial(intro)], answers=PAIR)
    first = df[(df["question_kind"] == "introspection") & (df["direction"] == "sufficiency")].iloc[0]
    oracle.assert_close(first["source"], injected[0])
    oracle.assert_close(first["target"], plain[0])
    # the injection is added to layer 0's output: layer 0's MLP is the same in both runs, patching it does nothing
    noop = df[df["site"] == "L0 mlp"]
    oracle.assert_close(noop["effect"].to_numpy(), np.zeros(len(noop)), tol=1e-5)
    assert df[df["comp_layer"] == 1]["effect"].abs().max() > 1e-4


def test_patching_rejects_bad_input_before_compute(tiny_llama, forbid_compute):
    intro, _ = prompts(tiny_llama)
    good = Trial(intro, make_vector(tiny_llama, 8), 4.0)
    forbid_compute(tiny_llama)
    with pytest.raises(ValueError, match="injected"):
        patching.activation_patching(tiny_llama, [Trial(intro)], [Site(1, "attn")])
    with pytest.raises(ValueError, match=r"head \(1, 9\) does not exist"):
        patching.activation_patching(tiny_llama, [good], [Site(1, "head", 9)])
    with pytest.raises(ValueError, match="span"):
        patching.activation_patching(tiny_llama, [good], [Site(1, "attn")], span=(5, 10_000))
    with pytest.raises(ValueError, match="directions"):
        patching.attribution_patching(tiny_llama, [good], [Site(1, "attn")], directions=["sideways"])


def test_attribution_patching_equals_the_reference_gradient_estimate(tiny_perturbed, oracle):
    handle = tiny_perturbed
    intro, _ = prompts(handle)
    trial = Trial(intro, make_vector(handle, 9, layer=0), 6.0)
    sites = [Site(1, "attn"), Site(1, "mlp"), Site(1, "head", 3)]
    for span in ("answer", (intro.injection_start, len(intro))):
        df = patching.attribution_patching(handle, [trial], sites, span=span)
        positions = torch.tensor([len(intro) - 1]) if span == "answer" else torch.arange(*span)
        injected, plain = injection(oracle, trial), injection(oracle, Trial(intro))
        for row in df.itertuples():
            source, target = (injected, plain) if row.direction == "sufficiency" else (plain, injected)
            site = Site(int(row.comp_layer), row.kind, None if pd.isna(row.head) else int(row.head))
            expected = oracle.ref.attribution_patching_estimate(
                handle.torch_model, oracle.ids(intro), **oracle.yes_no(handle), site=(site.kind, site.layer,
                                                                                      site.head),
                positions=positions, source=source, target=target)
            oracle.assert_close(row.estimate, expected, tol=1e-3)
    assert all(p.grad is None for p in handle.torch_model.parameters())  # the weights got no gradient
    assert all(p.requires_grad for p in handle.torch_model.parameters())  # and were handed back as they were


def test_agreement_of_perfect_and_reversed_estimates():
    base = {"question": "q", "concept": "c", "scale": 1.0, "direction": "sufficiency", "span": "answer"}
    real = pd.DataFrame([{**base, "site": f"s{i}", "effect": float(i ** 2)} for i in range(5)])
    same = real.rename(columns={"effect": "estimate"})
    assert patching.attribution_agreement(real, same)["spearman"] == pytest.approx(1.0)
    flipped = same.assign(estimate=-same["estimate"])
    result = patching.attribution_agreement(real, flipped)
    assert result["pearson"] == pytest.approx(-1.0) and result["n"] == 5


# ------------------------------------------------------------------ head ablation


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_head_ablation_matches_the_reference_ablation(tiny_perturbed, oracle, mode):
    handle = tiny_perturbed
    intro, control = prompts(handle)
    v = make_vector(handle, 10, layer=0)
    trials = [Trial(intro, v, 6.0), Trial(control, v, 6.0), Trial(intro, v, -4.0)]
    heads = [(1, 2), (0, 1)]
    diff, base = patching.ablated_logit_diff(handle, trials, heads, mode=mode)
    values = None
    if mode == "mean":  # pooled over every position of the distinct prompts, uninjected
        per_prompt = [oracle.ref.head_outputs(handle.torch_model, oracle.ids(p), heads) for p in (intro, control)]
        values = [torch.cat([pp[k] for pp in per_prompt]).mean(0) for k in range(len(heads))]
    for trial, got, got_base in zip(trials, diff, base, strict=True):
        kwargs = dict(yes_id=oracle.yes_no(handle)["yes_id"], no_id=oracle.yes_no(handle)["no_id"], heads=heads,
                      values=values)
        expected = oracle.ref.head_ablated_yes_no_logit_diff(handle.torch_model, oracle.ids(trial.prompt),
                                                             injection=injection(oracle, trial), **kwargs)
        expected_base = oracle.ref.head_ablated_yes_no_logit_diff(handle.torch_model, oracle.ids(trial.prompt),
                                                                  injection=injection(oracle, Trial(trial.prompt)),
                                                                  **kwargs)
        oracle.assert_close(got, expected)
        oracle.assert_close(got_base, expected_base)
    plain = measure(handle, trials, answers=PAIR).logit_diff
    assert (diff - plain).abs().max() > 1e-6  # the ablation really changes the answer (float32 noise ~1e-8)


@pytest.mark.integration
def test_write_up_heads_are_refused_on_a_model_without_them(smollm, forbid_compute):
    forbid_compute(smollm)
    with pytest.raises(ValueError, match=r"head \(34, 10\) does not exist in smollm2-135m-instruct.*0\.\.29.*0\.\.8"):
        patching.head_ablation(smollm, "Sandwich", 4.0, [(34, 10), (39, 5)])


# ------------------------------------------------------------------ the embedded model


@pytest.mark.integration
def test_attribution_and_patching_on_the_embedded_model(smollm, oracle):
    intro, control = prompts(smollm)
    v = make_vector(smollm, 11, layer=20, norm=40.0)
    trials = [Trial(intro, v, 1.0), Trial(intro), Trial(control, v, 1.0)]
    df = attribution.direct_logit_attribution(smollm, trials)
    oracle.assert_close(attribution.totals(df)["diff"].to_numpy().copy(),
                        oracle.logit_diff(smollm, trials, answers=PAIR))
    sites = [Site(25, "attn"), Site(27, "head", 4), Site(29, "mlp")]
    real = patching.activation_patching(smollm, trials[:1], sites)
    for row in real.itertuples():
        site = Site(int(row.comp_layer), row.kind, None if pd.isna(row.head) else int(row.head))
        expected = reference_patch(oracle, smollm, trials[0], site, torch.tensor([len(intro) - 1]), row.direction)
        oracle.assert_close(row.patched, expected)
    ablated = patching.head_ablation(smollm, v, 1.0, [(25, 3), (27, 4)], n_controls=1, modes=("none", "zero"))
    table = patching.specific_shift(ablated)
    assert table["ablation"].tolist() == ["none", "zero"] and np.isfinite(table["specific"]).all()


@pytest.mark.integration
def test_attribution_patching_agrees_with_real_patching_over_every_head_on_the_embedded_model(smollm):
    """The agreement docs/notebooks.md points to (printed with -s, not typed there): Sandwich at layer 20, scale 4,
    the introspection question, every attention output, MLP output and head above the injection layer, both
    directions."""
    trials = patching.concept_trials(smollm, "Sandwich", 4.0, layer=20, n_controls=0)
    real = patching.activation_patching(smollm, trials)
    estimated = patching.attribution_patching(smollm, trials)
    result = patching.attribution_agreement(real, estimated)
    print(f"attribution patching vs patching on {smollm.name}: {result}")
    assert result["n"] == 2 * 9 * (2 + smollm.arch.n_heads)
    assert result["pearson"] > 0.8 and result["spearman"] > 0.8
