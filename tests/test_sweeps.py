"""Sweeps: tidy tables with the expected rows and metadata, seeded, resumable one question at a time."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from introspection_utils.core.results import load_result
from introspection_utils.engine.measure import Trial
from introspection_utils.engine.metadata import metadata, save_table
from introspection_utils.engine.prompts import answer_set, control_questions, introspection_prompt
from introspection_utils.engine.vectors import concept_vectors, random_vector
from introspection_utils.experiments import sweeps
from introspection_utils.experiments.sweeps import COLUMNS, SweepSpec, layer_sweep, scale_sweep, summarize
from introspection_utils.models.handle import load_model, package_version

CONCEPTS = ["Dust", "Satellites"]
SCALES = [0.0, 2.0, -4.0]
TRIAL = "Trial 1: Do you detect an injected thought? If so, what is the injected thought about?"  # the paper's only


@pytest.fixture(scope="module")
def bank(tiny_llama):
    """Concept vectors for the sweeps (three baseline words keep it fast; no disk cache)."""
    return concept_vectors(tiny_llama, CONCEPTS, baseline_words=["Desks", "Jackets", "Gondolas"], cache=False,
                           progress=False)


RUN_OPTIONS = {"results_dir", "name", "bank", "batch_size", "progress", "ablate", "executor", "address"}


def run_scale_sweep(handle, bank, **kwargs):
    """scale_sweep of CONCEPTS × SCALES at layer 1 through the front door: ``kwargs`` split into the spec's fields
    and the execution options."""
    options = {"bank": bank, "progress": False, **{k: v for k, v in kwargs.items() if k in RUN_OPTIONS}}
    fields = {"n_controls": 2, "n_random": 2, "introspection": TRIAL,
              **{k: v for k, v in kwargs.items() if k not in RUN_OPTIONS}}
    return scale_sweep(handle, SweepSpec.build(CONCEPTS, SCALES, [1], **fields), **options)


@pytest.fixture
def count_measure(monkeypatch):
    """Count (and optionally fail) the sweeps' calls of ``measure``: ``calls`` lists the questions measured."""
    calls, real = [], sweeps.measure
    state = {"fail_on": None}

    def counted(handle, trials, **kwargs):
        calls.append(trials[0].prompt.question)
        if state["fail_on"] == len(calls):
            raise KeyboardInterrupt("interrupted")
        return real(handle, trials, **kwargs)

    monkeypatch.setattr(sweeps, "measure", counted)
    counted.calls, counted.state = calls, state
    return counted


def test_scale_sweep_gives_one_tidy_row_per_trial(tiny_llama, bank):
    result = run_scale_sweep(tiny_llama, bank)
    df = result.df
    assert list(df.columns) == COLUMNS
    assert len(df) == 3 * 2 * (1 + 2) * 3  # questions × concepts × (concept + 2 random) × scales
    assert df["question_kind"].value_counts().to_dict() == {"control": 36, "introspection": 18}
    assert df["vector_kind"].value_counts().to_dict() == {"random": 36, "concept": 18}
    assert df.groupby("question").size().to_dict() == dict.fromkeys(
        [introspection_prompt(tiny_llama).question, *control_questions(2)], 18)
    assert set(df["layer"]) == {1} and sorted(set(df["scale"])) == sorted(SCALES)
    assert (df["model"] == "tiny-llama").all()
    assert df.loc[df["vector_kind"] == "concept", "vector_seed"].isna().all()
    assert sorted(df.loc[df["vector_kind"] == "random", "vector_seed"].unique()) == [0, 1]
    for concept in CONCEPTS:  # random vectors are norm-matched to their concept's
        norms = df.loc[df["concept"] == concept, "vector_norm"]
        assert norms.to_numpy() == pytest.approx(bank.get(concept, 1).norm, rel=1e-5)
    pd.testing.assert_series_equal(df["delta"], df["logit_diff"] - df["baseline_logit_diff"], check_names=False)
    assert (df.loc[df["scale"] == 0, "delta"] == 0).all()
    assert (df.loc[df["scale"] != 0, "delta"].abs() > 0).all()


def test_sweep_values_equal_the_reference(tiny_llama, bank, oracle):
    df = run_scale_sweep(tiny_llama, bank, n_random=1).df
    for kind, question in [("introspection", None), *(("control", q) for q in control_questions(2))]:
        prompt = introspection_prompt(tiny_llama, question)
        rows = df[df["question"] == prompt.question]
        assert (rows["question_kind"] == kind).all()
        oracle.assert_close(torch.tensor(rows["baseline_logit_diff"].to_numpy()),
                            oracle.logit_diff(tiny_llama, [Trial(prompt)]).expand(len(rows)))
        dust = bank.get("Dust", 1)
        for vector in (dust, random_vector(dust, 0)):
            row = rows[(rows["concept"] == "Dust") & (rows["vector_kind"] == vector.kind) & (rows["scale"] == -4.0)]
            assert len(row) == 1
            expected = oracle.logit_diff(tiny_llama, [Trial(prompt, vector, -4.0)])
            oracle.assert_close(torch.tensor(row["logit_diff"].to_numpy()), expected)


def test_layer_sweep_gives_one_row_per_layer_and_trial(tiny_llama, bank):
    spec = SweepSpec.build(["Dust"], [3.0], [0, 1], n_controls=1, n_random=1, introspection=TRIAL)
    result = layer_sweep(tiny_llama, spec, bank=bank, progress=False)
    df = result.df
    assert list(df.columns) == COLUMNS and len(df) == 2 * 2 * 2  # questions × layers × (concept + random)
    assert df.groupby(["layer", "vector_kind"]).size().to_dict() == {
        (0, "concept"): 2, (0, "random"): 2, (1, "concept"): 2, (1, "random"): 2}
    assert set(df["scale"]) == {3.0}
    layer0 = df[(df["layer"] == 0) & (df["vector_kind"] == "concept")]
    assert layer0["vector_norm"].to_numpy() == pytest.approx(bank.get("Dust", 0).norm, rel=1e-5)
    assert list(result.meta["spec"]["layers"]) == [0, 1]


def test_no_controls_leaves_only_the_introspection_question(tiny_llama, bank):
    df = run_scale_sweep(tiny_llama, bank, n_controls=0, n_random=0).df
    assert set(df["question_kind"]) == {"introspection"} and len(df) == 2 * 3


def test_metadata_says_how_the_table_was_made(tiny_llama, bank):
    meta = run_scale_sweep(tiny_llama, bank, seed=7).meta
    assert meta["model"] == "tiny-llama" and meta["revision"] == tiny_llama.revision
    assert meta["dtype"] == "float32" and meta["seed"] == 7 and meta["spec"]["seed"] == 7
    assert meta["package_version"] == package_version() != "unknown"
    assert len(meta["prompt_hash"]) == 16 and len(meta["spec_hash"]) == 16
    for key in ("family", "torch", "nnsight", "transformers", "python", "created"):
        assert meta[key], key
    other = run_scale_sweep(tiny_llama, bank, seed=7, n_controls=1).meta
    assert other["prompt_hash"] != meta["prompt_hash"] and other["spec_hash"] != meta["spec_hash"]


def test_same_seed_gives_identical_tables(tiny_llama, bank):
    a = run_scale_sweep(tiny_llama, bank, seed=3).df
    b = run_scale_sweep(tiny_llama, bank, seed=3).df
    pd.testing.assert_frame_equal(a, b)
    c = run_scale_sweep(tiny_llama, bank, seed=4).df
    concept = a["vector_kind"] == "concept"
    pd.testing.assert_frame_equal(a[concept], c[concept])
    assert not a.loc[~concept, "logit_diff"].equals(c.loc[~concept, "logit_diff"])
    assert sorted(c.loc[~concept, "vector_seed"].unique()) == [4, 5]


def test_results_are_saved_and_load_back(tiny_llama, bank, tmp_path):
    result = run_scale_sweep(tiny_llama, bank, results_dir=tmp_path, name="scales")
    assert (tmp_path / "scales.csv").is_file() and (tmp_path / "scales.meta.json").is_file()
    loaded = load_result(tmp_path / "scales")
    pd.testing.assert_frame_equal(loaded.df, result.df, check_dtype=False)
    assert loaded.meta["spec_hash"] == result.meta["spec_hash"]


def test_resume_recomputes_only_the_missing_question(tiny_llama, bank, tmp_path, count_measure, capsys):
    first = run_scale_sweep(tiny_llama, bank, results_dir=tmp_path, name="resume")
    chunks = sorted((tmp_path / ".chunks").glob("resume-*/*.csv"))
    assert len(chunks) == 3 and len(count_measure.calls) == 3
    chunks[1].unlink()
    count_measure.calls.clear()
    again = run_scale_sweep(tiny_llama, bank, results_dir=tmp_path, name="resume", progress=True)
    assert count_measure.calls == [control_questions(1)[0]]
    said = capsys.readouterr()
    assert "resume: resumed from" in said.out and "kept 2 of 3 questions (36 rows); 1 left to measure" in said.out
    pd.testing.assert_frame_equal(again.df, first.df)
    count_measure.calls.clear()
    run_scale_sweep(tiny_llama, bank, results_dir=tmp_path, name="resume")
    assert count_measure.calls == []  # everything on disk now


def test_a_sweep_in_another_dtype_does_not_resume_from_the_first_ones_chunks(tiny_llama, bank, tmp_path,
                                                                            count_measure):
    """The chunks' folder is named by the model, its revision and dtype as well as the spec: the same spec measured
    in bfloat16 into the same folder measures every question afresh (its answers differ from float32's)."""
    first = run_scale_sweep(tiny_llama, bank, results_dir=tmp_path, name="dtypes")
    half = load_model("tiny-llama", device="cpu", dtype="bfloat16")
    count_measure.calls.clear()
    second = run_scale_sweep(half, bank, results_dir=tmp_path, name="dtypes")
    assert len(count_measure.calls) == 3 and len(list((tmp_path / ".chunks").glob("dtypes-*"))) == 2
    assert not second.df["logit_diff"].equals(first.df["logit_diff"])


def test_interrupted_sweep_keeps_finished_questions_and_the_rerun_completes(tiny_llama, bank, tmp_path,
                                                                           count_measure):
    count_measure.state["fail_on"] = 3
    with pytest.raises(KeyboardInterrupt):
        run_scale_sweep(tiny_llama, bank, results_dir=tmp_path, name="stop")
    assert len(list((tmp_path / ".chunks").glob("stop-*/*.csv"))) == 2
    assert not (tmp_path / "stop.csv").exists()
    count_measure.state["fail_on"] = None
    count_measure.calls.clear()
    finished = run_scale_sweep(tiny_llama, bank, results_dir=tmp_path, name="stop")
    assert count_measure.calls == [control_questions(2)[1]]
    pd.testing.assert_frame_equal(finished.df, run_scale_sweep(tiny_llama, bank).df)
    assert (tmp_path / "stop.csv").is_file()


def test_summary_averages_delta_per_condition(tiny_llama, bank):
    df = run_scale_sweep(tiny_llama, bank, n_random=1).df
    summary = summarize(df)
    row = summary[(summary["concept"] == "Dust") & (summary["vector_kind"] == "concept") & (summary["scale"] == 2.0)
                  & (summary["question_kind"] == "control")]
    expected = df[(df["concept"] == "Dust") & (df["vector_kind"] == "concept") & (df["scale"] == 2.0)
                  & (df["question_kind"] == "control")]["delta"]
    assert len(row) == 1 and int(row["n"].iloc[0]) == 2
    assert float(row["mean"].iloc[0]) == pytest.approx(expected.mean())
    assert float(row["std"].iloc[0]) == pytest.approx(expected.std())


@pytest.mark.parametrize("kwargs, message", [
    ({"n_controls": -1}, "n=-1 control questions requested"),
    ({"n_controls": 61}, "n=61 control questions requested; there are 60"),
    ({"concepts": []}, "no concepts given"),
    ({"scales": []}, "no scales given"),
    ({"scales": [1.0, math.nan]}, "scale nan must be a finite number"),
    ({"scales": ["3"]}, "scale '3' must be a finite number"),
    ({"layers": [2]}, r"layer 2 is out of range for tiny-llama \(0\.\.1\)"),
    ({"n_random": -1}, "n_random must be >= 0"),
    ({"concepts": ["Dust", "a whole sentence of many words"], "bank": None},
     "a concept is a word or a phrase of up to"),
    ({"concepts": ["Trumpets"]}, "concept 'Trumpets' is not in this bank"),
])
def test_bad_sweep_input_is_rejected_before_any_compute(tiny_llama, bank, forbid_compute, tmp_path, kwargs,
                                                        message):
    forbid_compute(tiny_llama)
    fields = dict(concepts=CONCEPTS, scales=SCALES, layers=[1], n_controls=2)
    options = dict(bank=bank, progress=False, results_dir=tmp_path)
    for key, value in kwargs.items():
        (options if key in RUN_OPTIONS else fields)[key] = value
    with pytest.raises(ValueError, match=message):
        scale_sweep(tiny_llama, SweepSpec.build(fields.pop("concepts"), fields.pop("scales"), fields.pop("layers"),
                                                **fields), **options)
    assert not list(tmp_path.rglob("*.csv"))


def test_bad_layer_sweep_input_is_rejected_before_any_compute(tiny_llama, bank, forbid_compute):
    forbid_compute(tiny_llama)
    with pytest.raises(ValueError, match="no layers given"):
        layer_sweep(tiny_llama, SweepSpec.build(CONCEPTS, [1.0], []), bank=bank, progress=False)
    with pytest.raises(ValueError, match="scale inf must be a finite number"):
        layer_sweep(tiny_llama, SweepSpec.build(CONCEPTS, [math.inf], [0]), bank=bank, progress=False)
    with pytest.raises(ValueError, match=r"layer_sweep measures one scale; the spec has scales \[1.0, 2.0\]"):
        layer_sweep(tiny_llama, SweepSpec.build(CONCEPTS, [1.0, 2.0], [0]), bank=bank, progress=False)
    with pytest.raises(ValueError, match=r"scale_sweep measures one layer; the spec has layers \[0, 1\]"):
        scale_sweep(tiny_llama, SweepSpec.build(CONCEPTS, [1.0], [0, 1]), bank=bank, progress=False)
    with pytest.raises(TypeError, match="only execution options may follow it"):
        scale_sweep(tiny_llama, SweepSpec.build(CONCEPTS, [1.0], [0]), n_random=3, bank=bank, progress=False)


def test_any_result_table_is_saved_with_the_sweeps_metadata(tiny_llama, tmp_path):
    from introspection_utils.engine.prompts import question_prompts

    table = pd.DataFrame({"layer": [1, 0], "head": [2, 3], "rise": [0.5, 0.25]})
    path = save_table(tiny_llama, table, tmp_path / "new", "top_heads", concept="Sandwich", scale=4.0, n_controls=2)
    assert path == tmp_path / "new" / "top_heads.csv"
    loaded = load_result(path)
    pd.testing.assert_frame_equal(loaded.df, table)
    meta = loaded.meta
    assert meta["model"] == "tiny-llama" and meta["spec"] == {"concept": "Sandwich", "scale": 4.0, "n_controls": 2}
    expected = metadata(tiny_llama, {}, [p.hash for p in question_prompts(tiny_llama, 2)])["prompt_hash"]
    assert meta["prompt_hash"] == expected and {"revision", "dtype", "package_version", "seed"} <= set(meta)


def test_default_sweep_asks_both_polarities_and_tags_every_row(tiny_llama, bank):
    from introspection_utils.engine.prompts import default_wordings, question_tags

    result = scale_sweep(tiny_llama, SweepSpec.build(["Dust"], [0.0, 2.0], [1], n_controls=6, n_random=0),
                         bank=bank, progress=False)
    df = result.df
    assert list(df.columns) == COLUMNS
    assert {"polarity", "expected", "question_about", "answer_format"} <= set(df.columns)
    intro = df[df["question_kind"] == "introspection"]
    assert set(intro["question"]) == set(default_wordings()) and set(intro["polarity"]) == {1, -1}
    assert (intro["expected"] == intro["polarity"].map({1: "yes", -1: "no"})).all()
    controls = df[df["question_kind"] == "control"]
    assert (controls["polarity"] == 0).all() and set(controls["expected"]) == {"no", "yes", "ambiguous"}
    assert set(controls["question_about"]) == {"self", "world"}
    for q, rows in df.groupby("question"):
        assert rows["expected"].nunique() == 1 and rows["expected"].iloc[0] == question_tags(q)["expected"]
    assert (df["answer_format"] == "open").all()
    meta = result.meta
    assert meta["answer_format"] == "open" and meta["answer_set"]["yes"][0] == "Yes"
    assert meta["answer_set"]["no_ids"][0] == answer_set(tiny_llama).no[0]
    assert meta["control_span"] == pytest.approx(sweeps.control_span(df))


@pytest.mark.parametrize("answer_format", ["binary", "prefill"])
def test_answer_format_is_asked_recorded_and_read_like_the_reference(tiny_llama, bank, oracle, answer_format):
    spec = SweepSpec.build(["Dust"], [3.0], [1], n_controls=2, n_random=0, introspection=TRIAL,
                           answer_format=answer_format)
    result = layer_sweep(tiny_llama, spec, bank=bank, progress=False)
    df = result.df
    assert (df["answer_format"] == answer_format).all() and result.meta["answer_format"] == answer_format
    assert result.meta["spec"]["answer_format"] == answer_format
    prompt = introspection_prompt(tiny_llama, TRIAL, answer_format=answer_format)
    row = df[df["question"] == TRIAL]
    expected = oracle.logit_diff(tiny_llama, [Trial(prompt, bank.get("Dust", 1), 3.0)])
    oracle.assert_close(torch.tensor(row["logit_diff"].to_numpy()), expected)
    with pytest.raises(ValueError, match="unknown answer_format 'chat'"):
        layer_sweep(tiny_llama, SweepSpec.build(["Dust"], [3.0], [1], answer_format="chat"), bank=bank,
                    progress=False)


def test_saved_tables_carry_the_answer_set_and_format(tiny_llama, tmp_path):
    path = save_table(tiny_llama, pd.DataFrame({"a": [1]}), tmp_path, "t", n_controls=2,
                             answer_format="prefill")
    meta = load_result(path).meta
    assert meta["answer_format"] == "prefill" and set(meta["answer_set"]) == {"yes", "no", "yes_ids", "no_ids"}


def test_control_battery_reads_every_control_without_injection(tiny_llama, oracle, tmp_path):
    questions = control_questions(6)
    battery = sweeps.control_battery(tiny_llama, questions=questions, results_dir=tmp_path)
    assert list(battery.columns) == sweeps.BATTERY_COLUMNS and list(battery["question"]) == questions
    prompts = [introspection_prompt(tiny_llama, q) for q in questions]
    expected = oracle.readout(tiny_llama, [Trial(p) for p in prompts])
    oracle.assert_close(torch.tensor(battery["baseline_logit_diff"].to_numpy()), expected["diff"])
    oracle.assert_close(torch.tensor(battery["answer_mass"].to_numpy()), expected["mass"], tol=1e-5)
    assert battery["p_yes"].to_numpy() == pytest.approx(torch.sigmoid(expected["diff"]).numpy(), abs=1e-5)
    saved = load_result(tmp_path / "control_battery_open")
    assert saved.meta["answer_format"] == "open" and saved.meta["answer_set"]["yes"][0] == "Yes"
    assert len(sweeps.control_battery(tiny_llama)) == len(control_questions())


def _battery(values: dict) -> pd.DataFrame:
    """A synthetic battery: every control question with a hand-set baseline (default 0)."""
    from introspection_utils.engine.prompts import question_tags

    rows = [{"question": q, **{k: v for k, v in question_tags(q).items() if k != "polarity"},
             "baseline_logit_diff": values.get(q, 0.0)} for q in control_questions()]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("n", [2, 5, 6, 12, 13, 30])
def test_picked_controls_span_the_battery_and_keep_both_balances(n):
    from introspection_utils.engine.prompts import question_tags

    expected_level = {"no": -4.0, "yes": 4.0, "ambiguous": 0.0}
    values = {q: expected_level[question_tags(q)["expected"]] + 0.1 * (k % 5)
              for k, q in enumerate(control_questions())}
    battery = _battery(values)
    chosen = sweeps.pick_controls(battery, n)
    assert len(chosen) == len(set(chosen)) == n and chosen == sweeps.pick_controls(battery, n)
    tags = [question_tags(q) for q in chosen]
    about = [sum(t["about"] == a for t in tags) for a in ("self", "world")]
    expected = [sum(t["expected"] == e for t in tags) for e in ("no", "yes", "ambiguous")]
    assert max(about) - min(about) <= 1 and max(expected) - min(expected) <= 1
    picked = [values[q] for q in chosen]
    assert max(picked) - min(picked) >= 8.0  # the lowest "no" and the highest "yes" are reached


def test_picking_controls_that_span_little_says_so():
    with pytest.warns(UserWarning, match=r"spans 0.00 logits \(< 2\)"):
        sweeps.pick_controls(_battery({}), 6)
    with pytest.raises(ValueError, match="n=61 controls requested; the battery has 60"):
        sweeps.pick_controls(_battery({}), 61)
    with pytest.raises(ValueError, match="battery lacks column"):
        sweeps.pick_controls(pd.DataFrame({"question": ["a"]}), 1)


def test_a_sweep_whose_controls_span_little_warns_and_records_the_span(tiny_llama, bank):
    with pytest.warns(UserWarning, match=r"control questions' no-injection yes−no spans .* logits \(< 2\)"):
        result = run_scale_sweep(tiny_llama, bank, n_random=0)
    assert result.meta["control_span"] < sweeps.MIN_CONTROL_SPAN


def test_the_old_keyword_form_warns_and_measures_the_same_spec(tiny_llama, bank, tmp_path):
    """``scale_sweep(h, concepts, scales, layer=..., ...)`` (the form before the spec) still runs for one release:
    a DeprecationWarning, and the same table, spec hash and chunk folder as the spec form."""
    new = run_scale_sweep(tiny_llama, bank, results_dir=tmp_path / "new", name="s")
    with pytest.warns(DeprecationWarning, match=r"scale_sweep\(handle, concepts, ...\) .* is deprecated"):
        old = scale_sweep(tiny_llama, CONCEPTS, SCALES, layer=1, n_controls=2, n_random=2, introspection=TRIAL,
                          bank=bank, progress=False, results_dir=tmp_path / "old", name="s")
    pd.testing.assert_frame_equal(old.df, new.df)
    assert old.meta["spec"] == new.meta["spec"] and old.meta["spec_hash"] == new.meta["spec_hash"]
    assert [p.name for p in (tmp_path / "old" / ".chunks").iterdir()] == [
        p.name for p in (tmp_path / "new" / ".chunks").iterdir()]
    with pytest.warns(DeprecationWarning):
        layered = layer_sweep(tiny_llama, ["Dust"], [0, 1], scale=3.0, n_controls=1, n_random=0,
                              introspection=TRIAL, bank=bank, progress=False)
    spec = SweepSpec.build(["Dust"], [3.0], [0, 1], n_controls=1, n_random=0, introspection=TRIAL)
    pd.testing.assert_frame_equal(layered.df, layer_sweep(tiny_llama, spec, bank=bank, progress=False).df)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['colour'\]"):
        scale_sweep(tiny_llama, CONCEPTS, SCALES, layer=1, colour=1)


def test_an_ablated_direction_names_itself_in_the_spec(tiny_llama, bank):
    direction = torch.ones(tiny_llama.arch.d_model)
    spec = SweepSpec.build(["Dust"], [0.0, 4.0], [1], n_controls=1, n_random=0, introspection=TRIAL)
    result = scale_sweep(tiny_llama, spec, ablate=direction, bank=bank, progress=False)
    assert result.meta["spec"]["ablation"] == sweeps.direction_id(direction) is not None
    assert spec.ablation is None  # the caller's spec is left as it was (frozen; a copy names the direction)
