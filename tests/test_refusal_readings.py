"""08_refusal_ablation's readings and figures on hand-built curves: the switch-back scale (and its stated fallback),
the ablation effect and its sentences, the lens comparison, the refusal-layer reading and the figures."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from introspection_utils.plotting import series as plots
from introspection_utils.readings import sentences as readings  # noqa: E402
from introspection_utils.stats import shifts  # noqa: E402

SCALES = (0, 1, 2, 4, 8, 16)


def _curve(values, scales=SCALES):
    return pd.Series(values, index=pd.Index([float(s) for s in scales], name="scale"), dtype=float)


# ---------------------------------------------------------------------------------------------- switch_back_scale

def test_switch_back_is_the_first_scale_after_the_peak_below_zero():
    curve = _curve([-1, 0.5, 2, 1, -0.5, -2])
    assert shifts.switch_back_scale(curve, baseline=-1) == 8


def test_a_dip_below_zero_before_the_peak_does_not_count():
    curve = _curve([-1, -0.5, 1, 3, 0.2, -1])
    assert shifts.switch_back_scale(curve, baseline=-1) == 16


def test_scale_zero_is_never_the_peak():
    curve = _curve([5, 1, -1, -2, -3, -4])  # the baseline point is not an injected scale
    assert shifts.switch_back_scale(curve, baseline=5) == 2


def test_without_reaching_yes_the_threshold_is_the_baseline():
    curve = _curve([-2, -1, -0.5, -1.5, -2.5, -3])
    assert shifts.switch_back_scale(curve, baseline=-2) == 8


def test_no_switch_back_when_the_curve_never_falls_or_never_rises():
    assert shifts.switch_back_scale(_curve([-1, 0, 1, 2, 3, 4]), baseline=-1) is None  # rises throughout
    assert shifts.switch_back_scale(_curve([-1, 1, 2, 2, 1, 0.5]), baseline=-1) is None  # falls, stays yes
    assert shifts.switch_back_scale(_curve([-1, -2, -3, -4, -5, -6]), baseline=-1) is None  # "bomb": only down
    assert shifts.switch_back_scale(_curve([0.0], scales=(0,)), baseline=0.0) is None  # no injected scale


def _frame(intro, control, baseline_intro, baseline_control, scales=SCALES, concept="X"):
    """A tidy scale-sweep table: the introspection question and two control questions (± 0.1 around ``control``)."""
    rows = []
    for s, i, c in zip(scales, intro, control, strict=True):
        rows.append(dict(model="m", concept=concept, vector_kind="concept", vector_seed=pd.NA, vector_norm=2.5,
                         layer=3, scale=float(s), question_kind="introspection", question="q", logit_diff=i,
                         baseline_logit_diff=baseline_intro))
        for k, offset in enumerate((-0.1, 0.1)):
            rows.append(dict(model="m", concept=concept, vector_kind="concept", vector_seed=pd.NA, vector_norm=2.5,
                             layer=3, scale=float(s), question_kind="control", question=f"c{k}",
                             logit_diff=c + offset, baseline_logit_diff=baseline_control))
    df = pd.DataFrame(rows)
    df["delta"] = df.logit_diff - df.baseline_logit_diff
    return df


def test_choose_switch_scale_says_where_the_answer_switches_back():
    df = _frame([-1, 0.5, 2, 1, -0.5, -2], [-2] * 6, -1, -2)
    scale, why = readings.choose_switch_scale(df, "X")
    assert scale == 8
    assert "peaks at scale 2 (+2.00" in why and "drops below zero" in why and "using scale 8" in why


def test_choose_switch_scale_falls_back_with_a_stated_reason():
    never_falls_back = _frame([-1, 1, 3, 2, 1.5, 2.5], [-2] * 6, -1, -2)
    scale, why = readings.choose_switch_scale(never_falls_back, "X")
    assert scale == 8 and "never drops back below zero" in why and "fallback: the scale after the peak" in why
    peak_last = _frame([-1, 0, 1, 2, 3, 4], [-2] * 6, -1, -2)
    scale, why = readings.choose_switch_scale(peak_last, "X")
    assert scale == 16 and "the peak is at the largest scale" in why and "fallback: the largest scale" in why
    only_down = _frame([-1, -2, -3, -4, -5, -6], [-2] * 6, -1, -2)
    scale, why = readings.choose_switch_scale(only_down, "X")
    assert scale == 16 and "never rises above zero or its no-injection baseline" in why


# ----------------------------------------------------------------------------------------------- ablation effect

def test_ablation_effect_averages_the_high_scales():
    plain = _frame([-1, 0.5, 2, 1, -0.5, -2], [-2, -2, -2, -1, -1, -1], -1, -2)
    ablated = _frame([-0.5, 1, 2.5, 1.5, 1.5, 1.0], [-2, -2, -2, -1, -0.8, -1.2], -0.5, -2)
    e = shifts.ablation_effect(plain, ablated, "X", from_scale=8)
    assert e["introspection"] == pytest.approx(2.5)   # (+2 at 8, +3 at 16) / 2
    assert e["control"] == pytest.approx(0.0)         # (+0.2, −0.2) / 2
    assert e["baseline"] == pytest.approx(0.5) and e["introspection_delta"] == pytest.approx(2.0)
    assert e["n"] == 2 and e["switch_plain"] == 8 and e["switch_ablated"] is None
    text = readings.describe_refusal_ablation(plain, ablated, "X", from_scale=8)
    assert "raises the introspection curve at scales ≥ 8 by 2.50 logits on average (2 scale(s))" in text
    assert "the control mean moves by +0.00" in text and "the change is +2.00" in text
    assert "Without ablation the introspection answer switches back at scale 8" in text
    assert "with ablation it does not drop back after its peak" in text


def test_ablation_reading_says_when_the_curve_never_rises():
    plain = _frame([-1, 0.5, 2, 1, -0.5, -2], [-2] * 6, -1, -2)
    ablated = _frame([-1, -2, -3, -4, -5, -6], [-2] * 6, -1, -2)
    text = readings.describe_refusal_ablation(plain, ablated, "X", from_scale=8)
    assert "lowers the introspection curve" in text and "never rises above zero or its baseline" in text


def test_ablation_effect_needs_matching_scales():
    with pytest.raises(ValueError, match="different scales"):
        shifts.ablation_effect(_frame([0] * 6, [0] * 6, 0, 0), _frame([0] * 3, [0] * 3, 0, 0, scales=(0, 1, 2)),
                                 "X")
    with pytest.raises(ValueError, match="no injected scale >= 99"):
        shifts.ablation_effect(_frame([0] * 6, [0] * 6, 0, 0), _frame([0] * 6, [0] * 6, 0, 0), "X", from_scale=99)


# ------------------------------------------------------------------------------------------------------ the lens

def _lens(intro, control, base, layer=1, scale=8.0, concept="X"):
    """A tidy lens table over len(intro) read-out layers: introspection, two controls, the uninjected lens."""
    rows = []
    for kind, values, questions in (("introspection", intro, ["q"]), ("control", control, ["c0", "c1"])):
        for question in questions:
            for i, v in enumerate(values):
                rows.append(dict(model="m", concept=concept, vector_kind="concept", vector_seed=pd.NA, layer=layer,
                                 scale=scale, question_kind=kind, question=question, lens_layer=i, lens_diff=v,
                                 baseline_lens_diff=base[i]))
    return pd.DataFrame(rows)


def test_describe_lens_ablation_reads_the_last_layer_and_the_largest_change():
    plain = _lens([0, 1, 2, 3], [0, 0, 0, -1], [0, 0.5, 0.5, 0.5])
    ablated = _lens([0, 1, 0, 2.5], [0, 0, 0.5, -0.5], [0, 0.5, 0.25, 0.0])
    text = readings.describe_lens_ablation(plain, ablated, "X")
    assert "injected at layer 1, scale 8" in text
    assert "introspection lens reads +3.00 without ablation and +2.50 with it" in text
    assert "the control mean -1.00 → -0.50" in text
    assert "most at layer 2 (-2.00)" in text and "without injection by -0.25" in text


def test_describe_refusal_layers_names_the_chosen_and_the_overall_best():
    table = pd.DataFrame({"layer": range(5), "norm": [1.0, 2, 3, 4, 5], "heldout_d": [0.5, 2.0, 1.5, 1.0, 3.0],
                          "eligible": [False, True, True, True, False]})
    text = readings.describe_refusal_layers(table, 1)
    assert "eligible layers 1–3" in text and "layer 1 (Cohen's d = 2.00, direction norm 2)" in text
    assert "over all layers the largest is at layer 4 (d = 3.00)" in text
    given = readings.describe_refusal_layers(table, 2)
    assert "layer 2 was given" in given and "would choose layer 1" in given


# ------------------------------------------------------------------------------------------------------ figures

def test_ablation_comparison_figure_solid_plain_dashed_ablated():
    plain = _frame([-1, 0.5, 2, 1, -0.5, -2], [-2] * 6, -1, -2)
    ablated = _frame([-0.5, 1, 2.5, 1.5, 1.5, 1.0], [-2] * 6, -0.5, -2)
    fig = plots.plot_ablation_comparison(plain, ablated, "X", mark=8)
    ax = fig.axes[0]
    assert "m" in ax.get_title() and "'X'" in ax.get_title() and "layer 3" in ax.get_title()
    assert "‖v‖ = 2.5" in ax.get_xlabel() and "logit difference" in ax.get_ylabel()
    lines = {line.get_label(): line for line in ax.get_lines()}
    intro, intro_ablated = lines["introspection question"], lines["introspection question, refusal direction ablated"]
    assert intro.get_linestyle() == "-" and intro_ablated.get_linestyle() == "--"
    assert matplotlib.colors.same_color(intro_ablated.get_color(), plots.PALETTE["introspection"])
    assert matplotlib.colors.same_color(lines["control mean"].get_color(), plots.PALETTE["control"])
    np.testing.assert_allclose(intro_ablated.get_ydata(), [-0.5, 1, 2.5, 1.5, 1.5, 1.0])
    assert "switch-back scale 8" in plots.legend_labels(fig)
    plt.close(fig)


def test_ablation_lens_figure_and_panels():
    plain = _lens([0, 1, 2, 3], [0, 0, 0, -1], [0, 0.5, 0.5, 0.5])
    ablated = _lens([0, 1, 0, 2.5], [0, 0, 0.5, -0.5], [0, 0.5, 0.25, 0.0])
    fig = plots.plot_ablation_comparison(plain, ablated, "X", x="lens_layer")
    ax = fig.axes[0]
    assert "read-out layer" in ax.get_xlabel() and "scale 8" in ax.get_title()
    assert "injection layer 1" in plots.legend_labels(fig)
    plt.close(fig)
    both = pd.concat([plain, _lens([0, 0, 0, 0], [0] * 4, [0] * 4, concept="Y")])
    both_ablated = pd.concat([ablated, _lens([1, 1, 1, 1], [0] * 4, [0] * 4, concept="Y")])
    fig = plots.ablation_panels(both, both_ablated, ["X", "Y"], x="lens_layer")
    assert len([a for a in fig.axes if a.get_title()]) == 2
    plt.close(fig)
    with pytest.raises(ValueError, match="x 'layer'"):
        plots.plot_ablation_comparison(plain, ablated, "X", x="layer")


def test_refusal_layer_figure_marks_the_chosen_layer():
    table = pd.DataFrame({"layer": range(5), "norm": [1.0, 2, 3, 4, 5], "heldout_d": [0.5, 2.0, 1.5, 1.0, 3.0],
                          "eligible": [False, True, True, True, False]})
    fig = plots.plot_refusal_layers(table, 1, "some/Model-X")
    ax = fig.axes[0]
    assert "model-x" in ax.get_title() and "Cohen's d" in ax.get_ylabel() and "layer" in ax.get_xlabel()
    assert "chosen: layer 1 (d = 2.00)" in plots.legend_labels(fig)
    star = next(line for line in ax.get_lines() if line.get_label().startswith("chosen"))
    assert list(star.get_xdata()) == [1] and list(star.get_ydata()) == [2.0]
    plt.close(fig)


# ------------------------------------------------------------------------ by the book: scores and ablation points

def _score_table():
    rows = []
    for pos, token in ((-2, "istant"), (-1, "\n")):
        for layer in range(5):
            rows.append(dict(model="m", position=pos, token=token, layer=layer, norm=1.0, bypass=-layer + pos,
                             induce=0.5 * layer, kl=0.02 * layer, pruned=layer >= 4, kl_ok=0.02 * layer < 0.1,
                             induce_ok=layer > 0, baseline_harmful=1.0, baseline_harmless=-2.0, n_val=4))
    return pd.DataFrame(rows)


def test_direction_scores_figure_has_three_panels_and_marks_the_choice():
    from introspection_utils.plotting import refusal as plots_refusal

    fig = plots_refusal.plot_direction_scores(_score_table(), -1, 3)
    assert len(fig.axes) == 3 and "m" in fig._suptitle.get_text() and "4 validation prompts" in fig._suptitle.get_text()
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("bypass") and titles[1].startswith("induce") and titles[2].startswith("kl")
    assert all("layer" in ax.get_xlabel() for ax in fig.axes) and "log-odds" in fig.axes[0].get_ylabel()
    star = next(line for line in fig.axes[0].get_lines() if line.get_label().startswith("chosen"))
    assert list(star.get_xdata()) == [3] and list(star.get_ydata()) == [-4]
    assert "chosen: position -1, layer 3" in plots.legend_labels(fig)
    plt.close(fig)


def test_ablation_points_figure_one_panel_per_concept():
    from introspection_utils.plotting import refusal as plots_refusal

    rows = []
    for concept in ("Bomb", "Sandwich"):
        for point, shift in (("none", 0.0), ("after", 1.0), ("before", 0.5)):
            for kind, value in (("introspection", 2.0), ("control", -1.0)):
                rows.append(dict(model="m", concept=concept, layer=3, scale=8.0, cos_direction=0.1, question_kind=kind,
                                 question="q",
                                 ablation=point, logit_diff=value + shift, baseline_logit_diff=0.0, delta=0.0))
    fig = plots_refusal.plot_ablation_points(pd.DataFrame(rows))
    assert len(fig.axes) == 2 and "'Bomb' × 8 at layer 3" in fig.axes[0].get_title()
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights[:3] == [2.0, 3.0, 2.5] and heights[3:] == [-1.0, 0.0, -0.5]
    plt.close(fig)
