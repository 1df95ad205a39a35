"""Figures: labelled axes with units, a legend, a title naming model, concept and layer, one palette, files under
``figures/<model>/``; readings computed from the numbers. Sweeps run on tiny-llama (fast, random weights)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from introspection_utils.engine import prompts
from introspection_utils.engine.vectors import concept_vectors  # noqa: E402
from introspection_utils.experiments import sweeps
from introspection_utils.plotting import series as plots
from introspection_utils.readings import sentences as readings  # noqa: E402
from introspection_utils.stats import shifts  # noqa: E402


@pytest.fixture(scope="module")
def scale_df(tiny_llama):
    spec = sweeps.SweepSpec.build(["Sandwich", "Water"], [0, 1, 2, 4], [1], n_controls=3, n_random=2,
                                  introspection=prompts.introspection_questions(["paper"]))
    return sweeps.scale_sweep(tiny_llama, spec, progress=False).df


@pytest.fixture(scope="module")
def layer_df(tiny_llama):
    spec = sweeps.SweepSpec.build(["Bomb"], [4.0], [0, 1], n_controls=2, n_random=1,
                                  introspection=prompts.introspection_questions(["paper"]))
    return sweeps.layer_sweep(tiny_llama, spec, progress=False).df


def _check_axes(ax, *, title_has=(), legend=True):
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    for word in title_has:
        assert word in ax.get_title(), (word, ax.get_title())
    if legend:
        assert ax.get_legend() is not None and ax.get_legend().get_texts()


def test_scale_sweep_figure_is_labelled(scale_df):
    fig = plots.plot_scale_sweep(scale_df, "Sandwich")
    ax = fig.axes[0]
    _check_axes(ax, title_has=("tiny-llama", "Sandwich", "layer 1"))
    assert "yes − no logit difference" in ax.get_ylabel()
    assert "scale" in ax.get_xlabel() and "raw concept vector" in ax.get_xlabel() and "‖v‖" in ax.get_xlabel()
    labels = plots.legend_labels(fig)
    for label in ("introspection question", "control mean (n=3)", "control questions (each)", "control ±1 std",
                  "no injection: introspection", "no injection: control mean", "random vector: introspection"):
        assert label in labels
    plt.close(fig)


def test_conditions_use_the_series_palette(scale_df):
    fig = plots.plot_scale_sweep(scale_df, "Water")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert matplotlib.colors.same_color(lines["introspection question"].get_color(), plots.PALETTE["introspection"])
    assert matplotlib.colors.same_color(lines["control mean (n=3)"].get_color(), plots.PALETTE["control"])
    random = lines["random vector: introspection"]
    assert matplotlib.colors.same_color(random.get_color(), plots.PALETTE["random"]) and random.get_alpha() < 1
    assert matplotlib.colors.same_color(lines["no injection: introspection"].get_color(), plots.PALETTE["baseline"])
    plt.close(fig)


def test_introspection_line_is_the_data(scale_df):
    fig = plots.plot_scale_sweep(scale_df, "Sandwich")
    line = next(x for x in fig.axes[0].get_lines() if x.get_label() == "introspection question")
    rows = scale_df[(scale_df.concept == "Sandwich") & (scale_df.vector_kind == "concept")
                    & (scale_df.question_kind == "introspection")].sort_values("scale")
    np.testing.assert_allclose(line.get_ydata(), rows["logit_diff"].to_numpy())
    plt.close(fig)


def test_layer_sweep_figure_is_labelled(layer_df):
    fig = plots.plot_layer_sweep(layer_df, "Bomb")
    _check_axes(fig.axes[0], title_has=("tiny-llama", "Bomb", "layers 0–1", "scale 4"))
    assert "layer" in fig.axes[0].get_xlabel()
    plt.close(fig)


def test_unknown_concept_or_ambiguous_layer_is_a_clear_error(scale_df, layer_df):
    with pytest.raises(ValueError, match="concept 'Dust' is not in the table"):
        plots.plot_scale_sweep(scale_df, "Dust")
    with pytest.raises(ValueError, match="several scales"):
        plots.plot_layer_sweep(pd.concat([layer_df, layer_df.assign(scale=8.0)]), "Bomb")


def test_save_figure_writes_png_under_figures_model(tmp_path, monkeypatch, scale_df, tiny_llama):
    monkeypatch.setenv("INTROSPECTION_FIGURES", str(tmp_path))
    fig = plots.plot_scale_sweep(scale_df, "Sandwich")
    path = plots.save_figure(fig, tiny_llama, "sweep")
    assert path == tmp_path / "tiny-llama" / "sweep.png" and path.stat().st_size > 1000
    assert plots.save_figure(fig, "google/gemma-2-9b-it", "x") == tmp_path / "gemma-2-9b-it" / "x.png"
    assert plots.save_figure(fig, tiny_llama, "y", folder=tmp_path / "own") == tmp_path / "own" / "y.png"
    with pytest.raises(ValueError, match="plain file name"):
        plots.save_figure(fig, tiny_llama, "a/b")
    plt.close(fig)


def test_default_figures_dir_is_repo_figures_model(monkeypatch, tiny_llama):
    monkeypatch.delenv("INTROSPECTION_FIGURES", raising=False)
    assert plots.figures_dir(tiny_llama) == plots.project_root() / "figures" / "tiny-llama"
    assert plots.results_dir(tiny_llama) == plots.project_root() / "data" / "results" / "tiny-llama"


def test_vector_figures_are_labelled(tiny_llama):
    bank = concept_vectors(tiny_llama, ["Sandwich", "Water", "Bomb"], progress=False)
    fig = plots.plot_vector_norms(bank)
    _check_axes(fig.axes[0], title_has=("tiny-llama", "Sandwich"))
    plt.close(fig)
    fig = plots.plot_cosine_matrix(bank, 1)
    _check_axes(fig.axes[0], title_has=("tiny-llama", "layer 1"), legend=False)
    assert fig.axes[1].get_ylabel().startswith("cosine similarity")  # the colour bar is the legend
    plt.close(fig)
    text = readings.describe_vectors(bank, 1)
    assert "layer 1" in text and "Most similar pair" in text


def test_logit_lens_figure_is_labelled(lens):
    fig = plots.plot_logit_lens(lens, "Sandwich")
    _check_axes(fig.axes[0], title_has=("tiny-llama", "Sandwich", "layer 1"))
    assert "injection layer 1" in plots.legend_labels(fig)
    plt.close(fig)
    assert "Sandwich (injected at layer 1" in readings.describe_lens(lens, "Sandwich")


def test_attention_figure_and_top_heads(maps):
    fig = plots.plot_attention_maps(maps)
    assert "tiny-llama" in fig._suptitle.get_text() and "Sandwich" in fig._suptitle.get_text()
    shown = [ax for ax in fig.axes if ax.get_title()]
    assert len(shown) == 6  # three conditions, three difference maps
    for ax in shown:
        _check_axes(ax)
    plt.close(fig)
    top = readings.attention_top_heads(maps, 3)
    assert len(top) == 3 and top["rise_vs_no_injection"].is_monotonic_decreasing
    row = top.iloc[0]
    rise = row["introspection_injected"] - row["introspection_no_injection"]
    assert row["rise_vs_no_injection"] == pytest.approx(rise)
    assert row["introspection_minus_control"] == pytest.approx(row["rise_vs_no_injection"] - row["control_rise"])
    assert "L" in readings.describe_attention(maps, k=2)
    assert readings.head_pairs(top, 2) == [(int(top.loc[0, "layer"]), int(top.loc[0, "head"])),
                                           (int(top.loc[1, "layer"]), int(top.loc[1, "head"]))]


def _frame(intro, control, baseline_intro, baseline_control, scales=(0, 1, 2, 4)):
    rows = []
    for s, i, c in zip(scales, intro, control, strict=True):
        rows.append(dict(model="m", concept="X", vector_kind="concept", vector_seed=pd.NA, vector_norm=1.0, layer=3,
                         scale=s, question_kind="introspection", question="q", logit_diff=i,
                         baseline_logit_diff=baseline_intro))
        for k, offset in enumerate((-0.1, 0.1)):
            rows.append(dict(model="m", concept="X", vector_kind="concept", vector_seed=pd.NA, vector_norm=1.0,
                             layer=3, scale=s, question_kind="control", question=f"c{k}", logit_diff=c + offset,
                             baseline_logit_diff=baseline_control))
    df = pd.DataFrame(rows)
    df["delta"] = df.logit_diff - df.baseline_logit_diff
    return df


def test_flip_scale_is_where_introspection_turns_yes_while_the_control_stays_no():
    df = _frame([-1, -0.5, 0.5, 2], [-2, -2, -1.5, 0.5], -1, -2)
    assert readings.sweep_flip_scale(df, "X") == 2
    assert "crosses zero to yes at scale 2" in readings.describe_scale_sweep(df, "X")
    scale, why = readings.choose_scale(df, "X")
    assert scale == 2 and "flips to yes at scale 2" in why


def test_flip_scale_is_per_curve_and_none_when_the_baseline_is_yes():
    # One definition (definitions.flip_scale): each curve flips on its own; whether the controls flip too
    # is the
    # introspection-specific shift's business, not the flip's.
    both = _frame([-1, -0.5, 0.5, 2], [-2, -1, 0.5, 1], -1, -2)
    assert readings.sweep_flip_scale(both, "X") == 2
    assert readings.sweep_flip_scale(both, "X", question_kind="control") == 2
    scale, why = readings.choose_scale(both, "X")
    assert scale == 4 and "control mean flips to yes at scale 2" in why  # S: 0, 0.5, 0.5, 1 → peak at 4
    already = _frame([0.5, 1, 2, 3], [-2, -2, -2, -2], 0.5, -2)
    assert readings.sweep_flip_scale(already, "X") is None
    assert "already leans yes" in readings.choose_scale(already, "X")[1]


def test_interference_readings_follow_the_numbers():
    below = _frame([-1, -2, -3, -4], [-2, -2, -2, -2], -1, -2)
    b = shifts.below_baseline(below, "X")
    assert b["fraction"] == 1.0 and b["min_delta"] == -3 and b["argmin"] == 4
    assert "below its baseline at most points" in readings.describe_below_baseline(below, "X")
    together = _frame([-1, 0, 1, 2], [-2, -1, 0, 1], -1, -2)
    assert shifts.curve_correlation(together, "X") == pytest.approx(1.0)
    assert "move together" in readings.describe_comovement(together, "X")
    apart = _frame([-1, 0, 1, 2], [1, 0, -1, -2], -1, -2)
    assert "do not clearly move together" in readings.describe_comovement(apart, "X")


def test_scale_sweep_draws_the_controls_prediction_for_the_introspection_curve(scale_df):
    """Beside the introspection curve: what a non-introspective question at its own baseline would do — the
    controls' least-squares line b + c·baseline at each scale (np.polyfit here), added to the wording's baseline."""
    fig = plots.plot_scale_sweep(scale_df, "Sandwich")
    line = next(x for x in fig.axes[0].get_lines() if x.get_label().startswith("controls' prediction for it"))
    rows = scale_df[(scale_df.concept == "Sandwich") & (scale_df.vector_kind == "concept")]
    expected = []
    for _, at in rows.groupby("scale"):
        controls, intro = at[at.question_kind == "control"], at[at.question_kind == "introspection"]
        c, b = np.polyfit(controls["baseline_logit_diff"], controls["delta"], 1)
        expected.append(float((intro["baseline_logit_diff"] * (1 + c) + b).mean()))
    np.testing.assert_allclose(line.get_ydata(), expected, atol=1e-9)
    assert matplotlib.colors.same_color(line.get_color(), plots.PALETTE["introspection"])
    plt.close(fig)


def test_atlas_figure_shows_I_its_interval_S_and_the_null():
    from test_verdicts import _atlas_cases, _table

    from introspection_utils.stats import verdicts

    concepts, randoms, base = _atlas_cases()
    df = _table(concepts, randoms=randoms, baseline=base)
    table = verdicts.verdicts(df, n_boot=100, mde=False)
    fig = plots.plot_atlas(table, verdicts.random_null(df))
    ax, ax_null = fig.axes
    _check_axes(ax, title_has=("hand", "4 concepts", "I beyond the random vectors' prediction"))
    labels = plots.legend_labels(fig)
    assert "introspection-specific (1)" in labels and "compression (1)" in labels
    assert "S, the contrast (not the verdict)" in labels and "random vectors' I, central 95%" in labels
    assert "I =" in ax.get_xlabel() and "I (logits at the largest scale)" in ax_null.get_xlabel()
    ranked = table.sort_values("I", ignore_index=True)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(ranked["concept"])
    plt.close(fig)


def _noisy_figure(noise: float):
    """Lines, a band, error bars, bars and an image whose values carry float noise of size ``noise``."""
    rng = np.random.default_rng(0)
    x = np.arange(8.0)
    y = np.sin(x) * 3 + 0.123456
    grid = rng.normal(size=(6, 9))
    jitter = np.random.default_rng(1).uniform(-noise, noise, size=64)
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(9, 3))
    a.plot(x, y + jitter[:8], marker="o", label="line")
    a.fill_between(x, y - 1 + jitter[8:16], y + 1 + jitter[16:24], alpha=0.2)
    a.errorbar(x, y + jitter[24:32], yerr=0.5 + jitter[32:40], fmt="s")
    a.legend()
    b.bar(np.arange(4), np.array([1.5, -0.7, 2.25, 0.3]) + jitter[40:44])
    c.imshow(grid + jitter[44:45], cmap="RdBu_r", vmin=-3, vmax=3)
    return fig


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_the_same_results_save_to_the_same_bytes_despite_float_noise(tmp_path, fmt):
    first = plots.save_figure(_noisy_figure(0.0), "m", "a", folder=tmp_path, format=fmt).read_bytes()
    second = plots.save_figure(_noisy_figure(1e-7), "m", "b", folder=tmp_path, format=fmt).read_bytes()
    plt.close("all")
    assert first == second
    assert b"matplotlib" not in first.lower() or fmt == "svg"  # no writer or version in the file (SVG: a comment)


def test_save_figure_formats_and_dpi_are_checked(tmp_path):
    fig = _noisy_figure(0.0)
    assert plots.save_figure(fig, "m", "x.svg", folder=tmp_path).suffix == ".svg"
    assert plots.save_figure(fig, "m", "x", folder=tmp_path, format="pdf", dpi=300).suffix == ".pdf"
    with pytest.raises(ValueError, match="format 'jpg' is not one of png, svg, pdf"):
        plots.save_figure(fig, "m", "x", folder=tmp_path, format="jpg")
    with pytest.raises(ValueError, match="dpi 5 must be a number from 20 to 1200"):
        plots.save_figure(fig, "m", "x", folder=tmp_path, dpi=5)
    plt.close("all")


def test_a_notebook_figure_is_saved_only_where_figures_dir_says(tmp_path, capsys):
    from introspection_utils.plotting.saving import save_notebook_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    for off in (None, ""):
        save_notebook_figure(fig, "tiny-llama", "00_x", off)
    assert capsys.readouterr().out == "" and not list(tmp_path.rglob("*.png"))
    save_notebook_figure(fig, "tiny-llama", "00_x", tmp_path / "figs")
    written = tmp_path / "figs" / "00_x.png"
    assert capsys.readouterr().out.strip() == str(written) and written.stat().st_size > 1000
    plt.close(fig)


def test_atlas_class_colours_are_told_apart_and_keep_the_conditions_meaning():
    """Orange means the controls and reddish purple the random vectors in every figure: no verdict class takes
    them, and the two shared shifts are far apart in colour (not orange beside vermillion)."""
    from matplotlib.colors import to_rgb

    from introspection_utils.plotting.style import CLASS_COLORS, PALETTE

    colours = list(CLASS_COLORS.values())
    assert len(set(colours)) == len(colours)
    assert PALETTE["control"] not in colours and PALETTE["random"] not in colours
    yes, suppression = (np.array(to_rgb(CLASS_COLORS[c])) for c in ("shared yes-shift", "shared suppression"))
    assert np.abs(yes - suppression).sum() > 1.0  # sum of RGB differences, 0..3


def test_sweep_panels_share_one_legend_under_the_panels(scale_df):
    fig = plots.sweep_panels(scale_df, ["Sandwich", "Water"], kind="scale")
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    assert "control mean (n=3)" in plots.legend_labels(fig)
    width = [ax.get_position().width for ax in fig.axes]
    assert min(width) > 0.35  # each panel keeps most of its half of the figure (a legend beside it took ~2/3)
    plt.close(fig)
