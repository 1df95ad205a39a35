"""The explorer's computing part, driven without a browser (tiny-llama)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from introspection_utils.apps.widgets import Explorer, ExplorerState  # noqa: E402


@pytest.fixture
def state(tiny_llama):
    return ExplorerState(tiny_llama, ["Sandwich", "Water"], scales=(0, 2, 8), n_controls=2)


def test_values_change_with_scale(state):
    at0, at8 = state.values("Sandwich", 1, 0), state.values("Sandwich", 1, 8)
    assert at0["value"] == pytest.approx(at0["baseline"])  # no injection at scale 0
    assert at8["value"] != pytest.approx(at0["value"])
    assert at8["control_mean"] != pytest.approx(at0["control_mean"])


def test_repeat_is_a_cache_hit_and_other_settings_reuse_the_sweep(state):
    state.values("Sandwich", 1, 2)
    assert (state.misses, state.hits) == (1, 0)
    first = state.values("Sandwich", 1, 2)
    again = state.values("Sandwich", 1, 2)
    state.values("Sandwich", 1, 8, question=state.controls[0], random=True)
    assert first == again and (state.misses, state.hits) == (1, 3)
    state.values("Sandwich", 0, 2)
    assert state.misses == 2 and set(state.cache) == {("Sandwich", 1), ("Sandwich", 0)}


def test_random_toggle_and_question_select_other_numbers(state):
    concept = state.values("Water", 1, 8)
    random = state.values("Water", 1, 8, random=True)
    control = state.values("Water", 1, 8, question=state.controls[1])
    assert random["introspection"] != pytest.approx(concept["introspection"])
    assert control["value"] != pytest.approx(concept["value"])
    assert control["introspection"] == pytest.approx(concept["introspection"])


def test_bad_inputs_are_clear_errors(state):
    with pytest.raises(ValueError, match="not on the explorer's grid"):
        state.values("Sandwich", 1, 3)
    with pytest.raises(ValueError, match="out of range"):
        state.values("Sandwich", 5, 2)
    with pytest.raises(ValueError, match="not one of the explorer's"):
        state.values("Dust", 1, 2)


def test_figure_marks_the_current_trial(state):
    fig = state.figure("Sandwich", 1, 8, random=True)
    marks = [line for line in fig.axes[0].get_lines() if line.get_marker() == "*"]
    v = state.values("Sandwich", 1, 8, random=True)
    assert len(marks) == 1 and marks[0].get_ydata()[0] == pytest.approx(v["value"])
    plt.close(fig)


def test_widget_callbacks_redraw_from_the_cache(state):
    ui = Explorer(state, layer=1)
    ui.render()
    misses = state.misses
    ui.scale.value = 8.0
    ui.random.value = True
    assert state.misses == misses
    v = state.values("Sandwich", 1, 8.0, random=True)
    assert "random vector" in ui.numbers.value and f"{v['introspection']:+.2f}" in ui.numbers.value
    ui.layer.value = 0
    assert state.misses == misses + 1


def test_numbers_include_the_controls_prediction_and_I(state):
    """The explorer's prediction is the controls' least-squares line (np.polyfit here) at the introspection
    question's own baseline, and I is the introspection answer's distance from it."""
    import numpy as np

    v = state.values("Water", 1, 8)
    rows = state.sweep("Water", 1)
    at = rows[(rows["scale"] == 8.0) & (rows["vector_kind"] == "concept")]
    controls, intro = at[at.question_kind == "control"], at[at.question_kind == "introspection"].iloc[0]
    if len(controls) >= 2 and controls["baseline_logit_diff"].nunique() > 1:
        c, b = np.polyfit(controls["baseline_logit_diff"], controls["delta"], 1)
    else:
        c, b = 0.0, controls["delta"].mean()
    assert v["predicted"] == pytest.approx(intro["baseline_logit_diff"] * (1 + c) + b)
    assert v["residual"] == pytest.approx(v["introspection"] - v["predicted"])
    text = state.describe(v)
    assert "controls' line predicts" in text and f"I = {v['residual']:+.2f}" in text
    assert "degenerate" in text  # two controls: the slope is not identified, and the line says so


def test_the_figure_is_an_image_and_only_a_controls_sweep_uses_an_output(state):
    """No ``Output`` widget while the notebook executes (a headless executor's mimic of one raced the cell's reply):
    the figure is PNG bytes in an ``Image``; the first render leaves the progress area untouched, and a control's
    new sweep clears its bar when done."""
    ui = Explorer(state, layer=1)
    ui.render()
    assert ui.figure.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert ui.progress.outputs == ()
    first = ui.figure.value
    ui.concept.value = "Water"  # a new (concept, layer): computed in the callback, with progress
    assert ui.figure.value != first and ui.progress.outputs == ()
    assert "ready · " in ui.status.value
    # Two controls: their baselines span too little for a fit; the sweep's warning is on the status line.
    assert "⚠" in ui.status.value and "spans" in ui.status.value


def test_the_answer_mass_is_said_once(state):
    v = state.values("Water", 1, 8)
    for mass in (0.09, 0.9):
        text = state.describe({**v, "answer_mass": mass})
        assert text.count("answer mass") == 1 and f"{mass:.2f}" in text
