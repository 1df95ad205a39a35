"""The findings table is computed from the run's saved tables: each write-up claim's verdict follows the numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_verdicts import _scaled, _spread, _table

from introspection_utils.apps import findings, findings_organisms
from introspection_utils.core.paths import project_root, read_block
from introspection_utils.core.results import SweepResult
from introspection_utils.experiments import mechanisms
from introspection_utils.experiments.tasks import forced_choice
from introspection_utils.stats import verdicts


@pytest.fixture(scope="module")
def two_maps_tables(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("figures") / "tiny-llama" / "results"
    maps = [mechanisms.mechanism_maps(tiny_llama, c, 4.0, layer=0, n_controls=1) for c in ("Sandwich", "Water")]
    mechanisms.save_tables(tiny_llama, maps, folder)
    return maps, folder


def _run():
    rng = np.random.default_rng(3)
    # 100 random vectors of every size (a shared push in [−1.5, 1.5]): the nulls' prediction covers the concepts, and
    # a rank p-value reaches 1/101, small enough for five concepts to pass Benjamini–Hochberg
    randoms = [_scaled(rng.uniform(-1.5, 1.5) + rng.normal(0, 0.05, 12)) for _ in range(100)]
    controls = [0.1, 0.0, 0.05, 0.1, 0.0, 0.1, 0.05, 0.0]
    concepts = {"Sandwich": (_scaled([2.0, 2.1, 1.9, 2.0, *controls]), 4),
                "Water": (_scaled([1.0, 1.05, 0.95, 1.0, *(1 + c for c in controls)]), 4),
                "Bomb": (_scaled([-1.0, -1.1, -0.9, -1.0, *(-1 - c for c in controls)]), 4),
                "Confusion": (_scaled([1.0, 1.0, 1.1, 0.9, *(1 + c for c in controls)]), 4),
                "Logic": (_scaled([0.1] * 12), 4)}
    df = _table(concepts, randoms=randoms, baseline=_spread(4, 8))  # controls spanning 8 logits: the fit holds
    return verdicts.verdicts(df, n_boot=200, mde=False), df


def test_claims_follow_the_verdicts():
    atlas, df = _run()
    table = findings.claims(atlas, df, interference=df).set_index("claim")
    assert table["reproduces"].to_dict() == {
        "a clean, introspection-specific separation ('sandwich')": "yes",
        "a muddy case: both questions shift together ('water')": "yes",
        "safety suppression: both fall below baseline ('bomb')": "yes",
        "'confusion': introspection and control move together": "yes",
        "the introspection question alone lifts ('logic', Gemma-2-27B)": "no",
        "concept vectors act more strongly than random vectors of the same norm": "yes",
        "a 'yes' is the model's answer (answer mass)": "yes",
    }
    by = atlas.set_index("concept")
    # the stated rule, then the verdict in the one function that words a verdict
    assert table.loc["a clean, introspection-specific separation ('sandwich')", "evidence"] == (
        "rule: class introspection-specific; " + verdicts.describe_verdict(by.loc["Sandwich"], brief=True))
    water = table.loc["a muddy case: both questions shift together ('water')", "evidence"]
    w = by.loc["Water"]
    assert water.startswith(f"rule: both Δ's intervals above 0 at scale {w['effect_scale']:g} — introspection Δ "
                            f"{w['introspection_delta']:+.2f} [{w['introspection_ci_low']:+.2f}, ")
    assert table.loc["'confusion': introspection and control move together", "evidence"].endswith(
        verdicts.describe_verdict(by.loc["Confusion"], brief=True) + "; curves correlate r = +1.00 over scales "
        "(notebook 06)")
    random = table.loc["concept vectors act more strongly than random vectors of the same norm", "evidence"]
    assert "I beyond the random vectors' prediction: random vectors" in random and "The contrast S: random" in random
    low = findings.claims(atlas.assign(low_mass=True), df).set_index("claim")
    assert low.loc["a 'yes' is the model's answer (answer mass)", "reproduces"] == "no"


def test_write_reads_the_results_and_fills_the_readme(tmp_path, monkeypatch):
    atlas, df = _run()
    results = tmp_path / "figures" / "m" / "results"
    results.mkdir(parents=True)
    atlas.to_csv(results / "atlas.csv", index=False)
    SweepResult(df, {}).save(results / "atlas_sweep")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- findings:start -->\nold\n<!-- findings:end -->\nafter\n")
    monkeypatch.setenv("INTROSPECTION_FIGURES", str(tmp_path / "figures"))
    path = findings.write_findings("m", readme=readme)
    text = path.read_text()
    assert text.startswith("From `make findings` on **m**") and "| write-up case |" in text
    assert read_block(readme, "findings") == text.strip() and readme.read_text().endswith("after\n")
    assert "Notebook by notebook" not in text  # only the atlas was saved: no notebook readings to show
    assert isinstance(pd.read_csv(results / "atlas.csv"), pd.DataFrame)
    assert "| open | 5 |" in text and "| binary |" not in text  # one row per format that was run


def test_a_claim_about_both_deltas_follows_the_numbers_it_shows():
    """'Both fall below baseline' is reproduced only when both intervals are below 0 — a cell that shows an
    introspection Δ above 0 says "no", whatever the class."""
    atlas, _ = _run()
    row = atlas.set_index("concept").loc["Bomb"].copy()
    assert findings.delta_rule(row, -1)[0]
    row["introspection_delta"], row["introspection_ci_low"], row["introspection_ci_high"] = 0.39, 0.1, 0.7
    ok, words = findings.delta_rule(row, -1)
    assert not ok and "introspection Δ +0.39 [+0.10, +0.70]" in words


def test_the_formats_table_has_a_row_per_format_run(tmp_path):
    atlas, df = _run()
    for name in ("atlas", "atlas_prefill"):  # the open turn and the prefill readout; no binary run
        atlas.to_csv(tmp_path / f"{name}.csv", index=False)
        SweepResult(df, {}).save(tmp_path / f"{name}_sweep")
    rows = findings.format_rows(tmp_path)
    assert rows["answer_format"].tolist() == ["open", "prefill"]
    medians = verdicts.null_medians(verdicts.random_null(df))
    assert rows["random_I"].tolist() == [medians["random_I"]] * 2 and rows["concepts"].tolist() == [5, 5]
    assert rows["introspection_specific"].tolist() == [int((atlas["class"] == "introspection-specific").sum())] * 2
    text = findings.formats_markdown(rows)
    assert text.count("\n| open |") == 1 and text.count("\n| prefill |") == 1 and f"{medians['random_I']:+.2f}" in text


def test_the_readme_shows_the_committed_findings():
    """findings.md and the README's blocks are what `python -m introspection_utils.findings` computes now from the
    committed run's tables (every notebook's reading included): no number in them can go stale."""
    committed = project_root() / "figures" / findings.FINDINGS_MODEL / "findings.md"
    assert committed.is_file(), "run `make findings` and `python -m introspection_utils.findings`"
    document, table, agreement = findings.render_findings()
    assert committed.read_text() == document
    assert read_block(project_root() / "README.md", "findings") == table
    assert agreement is not None and read_block(project_root() / "README.md", "agreement") == agreement
    sections = {notebook: texts for notebook, _, _, texts in findings.series()}
    assert {"02", "04", "05", "06", "12"} <= set(sections) and all(sections.values())


def test_series_readings_are_the_notebooks_own(tmp_path, monkeypatch, two_maps_tables):
    """A results folder holding notebook 12's tables gives notebook 12's printed readings, word for word."""
    maps, folder = two_maps_tables
    monkeypatch.setenv("INTROSPECTION_FIGURES", str(folder.parent.parent))
    sections = {notebook: texts for notebook, _, _, texts in findings.series("tiny-llama")}
    assert sections == {"12": [mechanisms.describe(m) for m in maps] + [mechanisms.contrast(maps)]}
    assert "tiny-llama" in findings.agreement_markdown("tiny-llama")


def test_task_rows_are_the_notebooks_readings_and_rules(tmp_path):
    rng = np.random.default_rng(1)
    labels, n = ["a", "b", "c"], 300
    targets = rng.choice(labels, n)
    chosen = np.where(rng.random(n) < 0.6, targets, rng.choice(labels, n))
    df = pd.DataFrame({"condition": "concept", "null_kind": "", "layer": 1, "scale": 4.0, "target": targets,
                       "chosen": chosen})
    df["correct"] = df["target"] == df["chosen"]
    SweepResult(df, {}).save(tmp_path / "forced_choice")
    rows = findings.task_rows(tmp_path)
    summary = forced_choice.forced_choice_summary(df)
    assert rows.to_dict("records") == [{"task": "forced choice among concepts",
                                        "evidence": forced_choice.describe_forced_choice(summary), "found": "yes"}]
    assert "| forced choice among concepts |" in findings.tasks_markdown(rows)
    assert findings.task_rows(tmp_path / "nothing").empty


def _organisms_table(introspector_specific: int) -> pd.DataFrame:
    from introspection_utils.experiments.organisms.evaluation import BASE, organism_table
    from introspection_utils.experiments.organisms.splits import TRUTH

    def row(organism, truth, counts, verdict, **extra):
        return {"organism": organism, "truth": truth, "model": organism, "n_concepts": 10,
                **{f"n_{c}": counts.get(c, 0) for c in verdicts.CLASSES}, "verdict": verdict, "detection": 0.9,
                "fpr_none": 0.0, "fpr_random": 0.1, "seen_detection": 0.95, "seen_minus_unseen": 0.05,
                "fc_scale": 8.0, "fc_accuracy": 0.6, "fc_chance": 0.2, "fc_mi_bits": 1.2, "fc_mi_p": 0.001,
                "fc_found": True, "atlas_mde": 0.55, "fc_n": 50, "fc_mde": 0.37, **extra}
    return organism_table([
        row(BASE, BASE, {"shared yes-shift": 10}, "shared yes-shift", fc_found=False, atlas_mde=float("nan"),
            fc_mde=float("nan")),  # a table written before the MDE columns: the cells say nothing of power
        row("introspector", TRUTH["introspector"],
            {"introspection-specific": introspector_specific, "one-sided": 10 - introspector_specific},
            "introspection-specific" if introspector_specific >= 5 else "one-sided"),
        row("anomaly-detector", TRUTH["anomaly-detector"], {"injection detector": 9, "introspection-specific": 1},
            "injection detector"),
        row("yes-sayer", TRUTH["yes-sayer"], {"shared yes-shift": 8, "introspection-specific": 2},
            "shared yes-shift"),
    ])


def test_the_organisms_section_holds_each_model_to_its_truth(tmp_path):
    """Notebook 14's table read back: every model's target decided by the stated rule from the numbers shown — the
    introspector needs ≥ 80% called, the look-alikes ≤ 1 and their own class, the base model none."""
    SweepResult(_organisms_table(8), {}).save(tmp_path / "organisms")
    rows = findings_organisms.organism_rows(tmp_path).set_index("organism")
    assert rows["target"].to_dict() == {"base model": "met", "introspector": "met", "anomaly-detector": "met",
                                        "yes-sayer": "missed"}  # two called where ≤ 1 is allowed
    assert "2 of 10 introspection-specific" in rows.loc["yes-sayer", "rule"]
    SweepResult(_organisms_table(7), {}).save(tmp_path / "organisms")
    rows = findings_organisms.organism_rows(tmp_path)
    assert rows.set_index("organism").loc["introspector", "target"] == "missed"  # 70% < 80%
    text = findings_organisms.organisms_markdown(rows)
    assert text.startswith("## Verdicts on known truths (notebook 14)") and text.count("\n| ") == 5
    assert rows.set_index("organism")["learned"].to_dict() == {  # read from the rates alone, not from the verdict
        "base model": "n/a", "introspector": "yes", "anomaly-detector": "no", "yes-sayer": "n/a"}
    row = ("| introspector | introspection-specific | 7 introspection-specific, 3 one-sided (of 10; MDE I = 0.55 "
           "logits) | 90% / 10% / 0% | yes | +5% | 60% against chance 20% (n = 50: 37% would be found with 80% power), "
           "MI 1.20 bits, p = 0.001: found |")
    assert row in text and "missed (rule: ≥ 80% introspection-specific and forced choice found; 7 of 10" in text
    assert "| 10 shared yes-shift (of 10) |" in text
    assert "60% against chance 20%, MI 1.20 bits, p = 0.001: not found" in text
    assert findings_organisms.organism_rows(tmp_path / "nothing").empty
    assert "The anchor (arXiv 2511.21399" in text and "95%/85%/0%" in text and "Training (LoRA" not in text
    training = pd.DataFrame([{"kind": "introspector", "steps": 80, "first_loss": 2.48, "final_loss": 0.1234,
                              "train_seconds": 1500.0, "examples_per_s": 0.43, "tokens_per_s": 61.2, "load_avg": 2.1}])
    assert ("| introspector | 80 | 2.48 → 0.123 | not recorded (trained before the probe) | 25.0 min | 0.43 | 61 | "
            "2.1 |") in findings_organisms.organisms_markdown(rows, training)
    probed = training.assign(detected_concept=0.9, detected_random=0.25, detected_none=0.05)
    assert "| 2.48 → 0.123 | 90% / 25% / 5% | 25.0 min |" in findings_organisms.organisms_markdown(rows, probed)
    from introspection_utils.readings import saved
    [sentence] = saved.organism_sentences(tmp_path)  # findings.md's notebook 14 section: the notebook's own reading
    assert "introspector (truth: introspection-specific): the atlas calls its held-out concepts 7 " \
           "introspection-specific, 3 one-sided (of 10; MDE I = 0.55 logits)" in sentence
    assert sentence.count("Target missed") == 2
    assert "forced choice at scale 8: 60% against chance 20% (n = 50" in sentence
    assert "Behaviour NOT learned (rule: concept and random ≥ 80%, none ≤ 20%; detected 90% with concept vectors, " \
           "10% with random vectors" in sentence and sentence.count("Behaviour") == 2


def test_a_named_evaluation_of_the_organisms_has_its_own_rows(tmp_path):
    """A findings variant of notebook 14 (``evaluation_name``, e.g. the introspector trained in float32) writes its
    own tables; the README's section shows the default evaluation's rows, then the named one's, each of those
    labelled with its dtype and name, its target decided by the same rule; a table that does not name its
    evaluation is not one."""
    SweepResult(_organisms_table(8), {"dtype": "bfloat16", "spec": {}}).save(tmp_path / "organisms")
    named = _organisms_table(7).iloc[:2]
    SweepResult(named, {"dtype": "float32", "spec": {"evaluation_name": "organisms_float32"}}).save(
        tmp_path / "organisms_float32")
    SweepResult(named, {"dtype": "float32", "spec": {}}).save(tmp_path / "organisms_copy")
    assert findings_organisms.organism_evaluations(tmp_path) == ["organisms", "organisms_float32"]
    rows = findings_organisms.organism_rows(tmp_path, "organisms_float32").set_index("organism")
    assert rows["target"].to_dict() == {"base model (float32, `organisms_float32`)": "met",
                                        "introspector (float32, `organisms_float32`)": "missed"}  # 7 of 10
    default = findings_organisms.organism_rows(tmp_path)
    assert default["organism"].tolist()[:2] == ["base model", "introspector"]
    both = findings_organisms.organisms_markdown(pd.concat([default, rows.reset_index()], ignore_index=True))
    assert "comes from another evaluation of notebook 14" in both
    assert "| introspector (float32, `organisms_float32`) |" in both
    assert "another evaluation" not in findings_organisms.organisms_markdown(default)
    (tmp_path / "organisms.csv").unlink()
    assert findings_organisms.organism_evaluations(tmp_path) == ["organisms_float32"]


def test_a_notebook_that_resumed_its_sweeps_is_named_beside_the_series_time(tmp_path):
    """The series-time sentence adds up each notebook's last wall time; a notebook whose output says a sweep resumed
    every question from saved chunks (``sweeps.run_sweep``'s report) measured nothing new there, and is named."""
    from introspection_utils.experiments.sweeps import LEFT_TO_MEASURE

    (tmp_path / "11_atlas.ipynb").write_text(f'{{"text": "atlas_sweep: resumed from x: kept 18 of 18 questions '
                                             f'(9 rows); 0 {LEFT_TO_MEASURE}"}}')
    (tmp_path / "13_tasks.ipynb").write_text(f'{{"text": "kept 2 of 18 questions (9 rows); 16 {LEFT_TO_MEASURE}"}}')
    (tmp_path / "00_quickstart.ipynb").write_text('{"text": "no sweep here"}')
    assert findings.resumed_notebooks(tmp_path) == ["11_atlas.ipynb"]
