"""Notebook 12's one call (mechanisms.mechanism_maps) on tiny-llama: its shift is the model's own
difference-in-differences, the attribution adds up to it, the saved tables give back the same readings, and its
figure is labelled."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from introspection_utils.engine.measure import measure
from introspection_utils.engine.prompts import paper_answers
from introspection_utils.experiments import mechanisms, patching
from introspection_utils.plotting import mechanisms as plots_mechanisms


@pytest.fixture(scope="module")
def two_maps(tiny_llama):
    return [mechanisms.mechanism_maps(tiny_llama, c, 4.0, layer=0, n_controls=2) for c in ("Sandwich", "Water")]


def test_shift_is_the_models_own_difference_in_differences(tiny_llama, two_maps):
    m = two_maps[0]
    trials = patching.concept_trials(tiny_llama, "Sandwich", 4.0, layer=0, n_controls=2)
    r = measure(tiny_llama, trials, answers=paper_answers())  # attribution reads one token per answer (linear)
    effect = (r.logit_diff - r.baseline).numpy()  # the introspection question first, then the controls
    assert m.shift == pytest.approx(float(effect[0] - effect[1:].mean()), abs=1e-4)
    # no softcap on Llama: the per-layer attribution (embedding and injection included) adds up to it
    assert float(m.did_layers["did"].sum()) == pytest.approx(m.shift, abs=1e-4)
    assert m.n_controls == 2 and m.agreement["n"] >= 3


def test_saved_tables_give_back_the_same_readings(tiny_llama, two_maps, tmp_path):
    written = mechanisms.save_tables(tiny_llama, two_maps, tmp_path)
    assert all(p.is_file() for p in written) and (tmp_path / "mechanisms_agreement.csv") in written
    loaded = mechanisms.load_maps(tmp_path)
    assert [m.concept for m in loaded] == ["Sandwich", "Water"]
    for before, after in zip(two_maps, loaded, strict=True):
        assert mechanisms.describe(after) == mechanisms.describe(before)
        assert after.agreement == pytest.approx(before.agreement)
        assert mechanisms.top_heads(after, 2) == mechanisms.top_heads(before, 2)
    assert mechanisms.contrast(loaded) == mechanisms.contrast(two_maps)
    table = mechanisms.agreement_table(two_maps)
    assert list(table.columns) == ["model", "concept", "layer", "scale", "n_controls", "shift", "pearson",
                                   "spearman", "n"]


def test_most_separated_and_the_ablation_reading(tiny_llama, two_maps, tmp_path):
    best = mechanisms.most_separated(two_maps)
    assert best.shift == max(m.shift for m in two_maps)
    heads = mechanisms.top_heads(best, 2)
    assert len(heads) == 2 and all(0 <= layer < 2 for layer, _ in heads)
    table = patching.head_ablation(tiny_llama, best.concept, 4.0, heads, layer=0, n_controls=2)
    text = mechanisms.describe_head_ablation(table)
    intact = patching.specific_shift(table).set_index("ablation").loc["none", "specific"]
    assert f"{intact:+.2f} logits with every head intact" in text and "zero-ablated" in text
    assert np.isclose(intact, best.shift, atol=1e-4)  # no ablation: the same trials as the maps
    table.to_csv(tmp_path / "ablation.csv", index=False)  # as notebook 05 saves it; the findings read it back
    assert mechanisms.describe_head_ablation(pd.read_csv(tmp_path / "ablation.csv")) == text


def test_the_mechanism_figure_is_labelled(two_maps):
    fig = plots_mechanisms.plot_mechanism_maps(two_maps)
    shown = [ax for ax in fig.axes if ax.get_title()]
    assert shown and all(ax.get_xlabel() or ax.get_ylabel() for ax in shown)
    assert any("Sandwich" in ax.get_title() for ax in shown) and any("Water" in ax.get_title() for ax in shown)
    plt.close(fig)


def test_an_interrupted_mechanism_run_resumes_pass_by_pass(tiny_llama, two_maps, tmp_path, monkeypatch):
    """Interrupted in real patching: the rerun reuses the attribution pass; the maps equal the uninterrupted ones."""
    real = mechanisms.activation_patching

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mechanisms, "activation_patching", interrupt)
    with pytest.raises(KeyboardInterrupt):
        mechanisms.mechanism_maps(tiny_llama, "Sandwich", 4.0, layer=0, n_controls=2, checkpoints=tmp_path)
    assert [p.name.split("-")[1] for p in (tmp_path / ".chunks").glob("mechanisms-*.pkl")] == ["attribution"]
    monkeypatch.setattr(mechanisms, "activation_patching", real)
    monkeypatch.setattr(mechanisms, "attribution_cells", lambda *a, **k: pytest.fail("recomputed the attribution"))
    resumed = mechanisms.mechanism_maps(tiny_llama, "Sandwich", 4.0, layer=0, n_controls=2, checkpoints=tmp_path)
    pd.testing.assert_frame_equal(resumed.attribution, two_maps[0].attribution)
    pd.testing.assert_frame_equal(resumed.patched, two_maps[0].patched)
    assert resumed.shift == two_maps[0].shift
