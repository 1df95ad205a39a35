"""Effects planted into the embedded model's forward pass by hooks (``atlas.planted_effect``) land in the measured
sweep exactly as the plasmode plants them into a plain sweep's numbers; a planted detection signal is then called at
the rate the plasmode predicts, and a planted compression or shared yes-shift is not called at all (issue #30)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from introspection_utils.apps.planted_check import planted_arithmetically
from introspection_utils.engine.measure import Trial, measure
from introspection_utils.engine.planted import HookedRow, answer_direction, planted_answers
from introspection_utils.engine.prompts import answer_set, control_questions, default_wordings, introspection_prompt
from introspection_utils.engine.vectors import concept_vectors, default_layer, random_vector
from introspection_utils.experiments import atlas, sweeps
from introspection_utils.stats import plasmode, verdicts

# four controls from the list span little on this model: the score needs no controls' line, so its warning is noise
pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:scale_sweep. the control questions:UserWarning")]

# Sized to run in about two minutes on two busy CPU cores: this file took 1 min 55 s and, when another job held more
# of the cores, 5 min 56 s at nice 19 on a 2-core Intel Xeon with AMX (load average 2.6-3.2). With R random vectors
# the smallest rank p-value is 1/(R + 1); Benjamini–Hochberg over n concepts calls k of them only if 1/(R + 1) ≤ α·k/n.
# R = 10 × 4 = 40 gives 1/41 ≈ 0.024, so any k ≥ 5 of the 10 concepts can be called: power between 0 and 1 is
# visible (with 2 random vectors per concept, R = 20 and 1/21 > α·9/10 — nothing but all 10 together could be called).
CONCEPTS = ["Dust", "Satellites", "Trumpets", "Origami", "Illusions", "Cameras", "Lightning", "Constellations",
            "Treasures", "Phones"]
SCALES = (4.0, 8.0)
N_RANDOM = 4
GRID = (0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2)  # δ, logits per unit scale: where δ is picked
KEYS = ["concept", "vector_kind", "vector_seed", "scale", "question"]


@pytest.fixture(scope="module")
def setup(smollm):
    layer = default_layer(smollm)
    bank = concept_vectors(smollm, CONCEPTS, progress=False)
    spec = sweeps.SweepSpec.build(CONCEPTS, SCALES, [layer], controls=control_questions(4), n_random=N_RANDOM)
    plain = sweeps.scale_sweep(smollm, spec, bank=bank, progress=False).df
    return spec, bank, plain


def _hooked(smollm, setup, effect: plasmode.Effect, n_random: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The sweep measured again inside ``planted_effect`` (concept vectors and the first ``n_random`` random vectors
    of each concept), and the atlas table it makes with the plain sweep's other random vectors (which the plant
    leaves alone by construction; the re-measured ones show it)."""
    spec, bank, plain = setup
    hooked_spec = sweeps.SweepSpec.build(CONCEPTS, SCALES, list(spec.layers), controls=list(spec.controls),
                                         n_random=n_random)
    with atlas.planted_effect(smollm, hooked_spec, effect, bank=bank):
        hooked = sweeps.scale_sweep(smollm, hooked_spec, bank=bank, progress=False).df
    rest = plain[(plain["vector_kind"] == "random") & (plain["vector_seed"] >= n_random)]
    return hooked, pd.concat([hooked, rest], ignore_index=True)


def _check_exact(hooked: pd.DataFrame, plain: pd.DataFrame, effect: plasmode.Effect) -> None:
    """Every re-measured row: its Δ is the plain row's with the effect planted by arithmetic (concept rows) or the
    plain row's (random rows); baselines unchanged."""
    expected = planted_arithmetically(plain, effect).set_index(KEYS)
    got = hooked.set_index(KEYS)
    assert len(got) and got.index.isin(expected.index).all()
    ref = expected.loc[got.index]
    np.testing.assert_allclose(got["baseline_logit_diff"], ref["baseline_logit_diff"], atol=1e-4)
    np.testing.assert_allclose(got["delta"], ref["delta"], atol=2e-4)
    random = got.reset_index()["vector_kind"].eq("random").to_numpy()
    if random.any():
        np.testing.assert_allclose(got["delta"].to_numpy()[random], plain.set_index(KEYS).loc[got.index]["delta"]
                                   .to_numpy()[random], atol=1e-4)


def test_the_answer_direction_moves_yes_minus_no_by_one(smollm):
    """W_yes·u = +1/2 and W_no·u = −1/2 for every spelling in the answer sets, checked on the unembedding itself."""
    sets = answer_set(smollm)
    u = answer_direction(smollm, sets.ids, len(sets.yes)).float()
    rows = smollm.lm_head.weight[list(sets.ids)].detach().float() @ u
    assert rows[:len(sets.yes)].numpy() == pytest.approx(0.5, abs=1e-4)
    assert rows[len(sets.yes):].numpy() == pytest.approx(-0.5, abs=1e-4)


def test_the_hooks_read_which_vector_and_scale_each_row_carries(smollm):
    """On a handful of trials: the rule sees the right prompt, the concept vector and its scale (a random vector of
    the same norm and an uninjected trial carry none), and what it returns is what ``measure`` reads."""
    layer = default_layer(smollm)
    bank = concept_vectors(smollm, CONCEPTS[:2], progress=False)
    vectors = [bank.get(c, layer) for c in CONCEPTS[:2]]
    prompts = [introspection_prompt(smollm, q, kind="introspection") for q in default_wordings()[:2]]
    trials = [Trial(p, v, s) for p in prompts for v in [*vectors, random_vector(vectors[0], 0)] for s in SCALES]
    trials.append(Trial(prompts[1]))
    seen: list[HookedRow] = []

    def rule(row: HookedRow) -> float:
        seen.append(row)
        return 7.0 if row.vector is not None else row.answer

    plain = measure(smollm, trials)
    with planted_answers(smollm, layer, prompts, vectors, rule):
        hooked = measure(smollm, trials)
    carries = [t.vector is not None and t.vector.kind == "concept" for t in trials]
    assert hooked.logit_diff.numpy()[carries] == pytest.approx(7.0, abs=1e-4)
    assert hooked.logit_diff.numpy()[~np.array(carries)] == pytest.approx(
        plain.logit_diff.numpy()[~np.array(carries)], abs=1e-5)
    found = {(r.prompt, r.vector, round(r.scale, 3)) for r in seen if r.vector is not None}
    assert found == {(i, j, s) for i in range(2) for j in range(2) for s in SCALES}
    with pytest.raises(ValueError, match="below the last"):
        with planted_answers(smollm, smollm.arch.n_layers - 1, prompts, vectors, rule):
            pass


def test_a_hooked_detection_signal_is_found_at_the_rate_the_plasmode_predicts(smollm, setup):
    """δ is picked on the plain sweep: the plasmode's power curve over ``GRID`` (the effect planted into the numbers
    of every concept), the δ whose predicted fraction called is nearest one half. Planted with that δ through the
    model, (a) each re-measured Δ is the plain one plus δ·s·p_w on the wordings of concept rows and unchanged
    elsewhere (to float rounding), and (b) the fraction of concepts the atlas calls introspection-specific agrees
    with the predicted one within three binomial standard errors at n = 10 concepts, √(p(1 − p)/n) — and, because
    (a) holds to rounding, concept by concept."""
    spec, bank, plain = setup
    panel = plasmode.panel(plain)
    assert panel.concept_delta.shape == (10, 10, 2) and len(panel.null_delta) == 40
    curve = plasmode.power_curve(panel, GRID)
    print("\nplasmode on the plain SmolLM2 sweep:\n" + curve.to_string())
    delta = float(curve.iloc[int(np.argmin(np.abs(curve["called"] - 0.5)))]["delta"])
    effect = plasmode.Effect("wording", delta)
    predicted_p = plasmode.score_method(effect.apply(panel.concept_delta, panel), panel.null_delta, panel, panel.groups)
    predicted = plasmode.called_fraction(predicted_p)
    hooked, table = _hooked(smollm, setup, effect, n_random=1)
    _check_exact(hooked, plain, effect)
    result = verdicts.verdicts(table, n_boot=1, mde=False)
    called = result["class"] == "introspection-specific"
    observed = float(called.mean())
    margin = 3 * np.sqrt(predicted * (1 - predicted) / len(CONCEPTS))
    print(f"δ = {delta}: predicted {predicted:.0%}, hooked {observed:.0%} (margin ±{margin:.0%})")
    assert abs(observed - predicted) <= margin
    expected_calls = {c for c, q in zip(panel.concepts, verdicts.benjamini_hochberg(predicted_p), strict=True)
                      if q <= verdicts.ALPHA}
    assert set(result.loc[called, "concept"]) == expected_calls


@pytest.mark.parametrize("effect", [plasmode.Effect("compression", 0.8), plasmode.Effect("yes-shift", 0.25)],
                         ids=["compression", "yes-shift"])
def test_a_hooked_compression_or_yes_shift_is_not_called(smollm, setup, effect):
    """Non-linear compression towards indifference (γ = 0.8 at scale 8) or a shared push to "yes" on every question
    (β = 0.25 per unit scale: +2 logits at scale 8), planted through the model into every concept's answers: each
    measured Δ is the plasmode's arithmetic on the plain sweep, and no concept is called introspection-specific (the
    plasmode, on the numbers, calls none either)."""
    _, _, plain = setup
    hooked, table = _hooked(smollm, setup, effect, n_random=0)
    _check_exact(hooked, plain, effect)
    result = verdicts.verdicts(table, n_boot=1, mde=False)
    print(f"\n{effect}: " + ", ".join(f"{k} {v}" for k, v in verdicts.class_counts(result).items() if v))
    assert (result["class"] != "introspection-specific").all()
    panel = plasmode.panel(plain)
    assert plasmode.called_fraction(plasmode.score_method(effect.apply(panel.concept_delta, panel), panel.null_delta,
                                                          panel, panel.groups)) == 0.0


def test_the_planted_check_plants_exactly_calls_the_signal_as_predicted_and_no_confound(smollm, tmp_path):
    """``planted_check`` (the command that runs this check on Qwen for docs/verdicts.md): on the embedded model, every
    re-measured Δ is the plasmode's arithmetic to float rounding, the signal is called at exactly the predicted rate
    (the plant is exact, so concept by concept), the fitted compression, yes-shift and self push are called for no
    concept, and the table is saved with its metadata."""
    from introspection_utils.apps.planted_check import CONFOUNDS, planted_check, planted_markdown

    # 6 concepts × 4 random vectors: the smallest rank p 1/25 lets Benjamini–Hochberg call 5 or 6 of them
    table = planted_check(smollm, CONCEPTS[:6], SCALES, n_controls=4, n_random=4, results_dir=tmp_path,
                          progress=False)
    print("\n" + table.to_string())
    assert table["effect"].tolist() == ["wording", *CONFOUNDS]
    assert (table["max_abs_error"] < 2e-4).all()
    assert table.loc[0, "predicted_called"] > 0
    assert table["called"].tolist() == table["predicted_called"].tolist()
    assert (table.loc[table["effect"] != "wording", "called"] == 0).all()
    assert (table["n_nulls"] == 24).all() and (tmp_path / "planted_check.csv").is_file()
    assert (tmp_path / "planted_check.meta.json").is_file()
    assert "| wording |" in planted_markdown(table, smollm.name)


def test_the_hooks_refuse_a_model_below_float32():
    """In bfloat16 a row's residual is rounded to 2^-8 of its size, more than the tolerance that names its vector:
    no row would be planted, so the hooks refuse with one clear error instead."""
    from introspection_utils.models.handle import load_model

    half = load_model("tiny-llama", device="cpu", dtype="bfloat16")
    prompt = introspection_prompt(half, default_wordings()[0], kind="introspection")
    with pytest.raises(ValueError, match="dtype='float32'"):
        with planted_answers(half, 0, [prompt], [], lambda row: row.answer):
            pass
