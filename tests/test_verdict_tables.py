"""The verdicts on known truths (the committed Qwen organisms' held-out atlases, every training): the look-alikes and
the base model are classified as their truth says with the verdict's weights where they learned their behaviour, the
first trained introspector is called for more of its concepts with them than with the same-effect weights alone, its
wordings tell how each introspector answers, and docs/verdicts.md's tables are this module's."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from introspection_utils.apps import verdict_tables
from introspection_utils.core.paths import project_root, read_block
from introspection_utils.core.results import load_result
from introspection_utils.engine import prompts
from introspection_utils.experiments.organisms.evaluation import behaviour_learned
from introspection_utils.experiments.organisms.training import OrganismConfig
from introspection_utils.stats.introspection_score import HETEROGENEITIES


@pytest.fixture(scope="module")
def truths():
    return verdict_tables.known_truths()


@pytest.fixture(scope="module")
def readouts():
    return verdict_tables.readouts_compared()


ORGANISMS = ("base model", "introspector", "anomaly-detector", "yes-sayer")
EVALUATED = {"float32": ("base model", "introspector"),  # findings variants evaluated the introspector alone
             "235-concept": ("base model", "introspector")}


def _with(*organisms: str) -> list[str]:
    """The trainings of :data:`verdict_tables.TRAININGS` that evaluated every one of ``organisms``."""
    return [t for t, _ in verdict_tables.TRAININGS if set(organisms) <= set(EVALUATED.get(t, ORGANISMS))]


def _row(table, training: str, organism: str, **where):
    """The row of ``table`` for the model ``training`` evaluated as ``organism`` (a model kept between trainings is
    one row, naming them all), with the other columns as ``where`` says."""
    picked = table[table["training"].map(lambda t: verdict_tables.evaluated_by(t, training))
                   & (table["organism"] == organism)]
    for column, value in where.items():
        picked = picked[picked[column] == value]
    assert len(picked) == 1, (training, organism, where, picked)
    return picked.iloc[0]


def test_a_model_kept_between_trainings_is_one_row():
    """The base model, the introspector and the yes-sayer were kept from the second training to the current one (the
    base model from the first): each is one row naming its trainings, with the latest run's rates. The float32
    evaluation's base model has the current one's name but is another model (another dtype); the 235-concept
    evaluation's, in float32 too, is the float32 one evaluated again: one row, its held-out sweep the same."""
    rows = verdict_tables.committed_organisms()
    labels = [(r["organism"], training) for training, r, _, _ in rows]
    assert {("base model", "current, second, first"), ("introspector", "current, second"),
            ("yes-sayer", "current, second"), ("anomaly-detector", "current"), ("anomaly-detector", "second"),
            ("introspector", "first"), ("base model", "235-concept, float32"), ("introspector", "float32"),
            ("introspector", "235-concept")} <= set(labels)
    assert len(set(labels)) == len(rows)
    base = {training: r["model"] for training, r, _, _ in rows if r["organism"] == "base model"}
    assert base["235-concept, float32"] == base["current, second, first"]
    results = project_root() / "figures" / verdict_tables.MODEL / "results"
    again, first = (pd.read_csv(results / folder / verdict_tables.MODEL / "atlas_sweep.csv")
                    for folder in ("organisms_float32_extra_concepts", "organisms_float32"))
    pd.testing.assert_frame_equal(again, first)


def test_the_look_alikes_and_the_base_model_are_classified_as_their_truth_says(truths):
    """First and current training: every look-alike and the base model as its truth says, the anomaly detector an
    injection detector. Second training: the base model and the yes-sayer; its anomaly detector is not, and its
    behaviour says why (it reports an injected thought with nothing injected: the rule of ``behaviour_learned`` fails
    on its own rates, so the miss is the training's)."""
    ours = truths[truths["verdicts_weights"]]
    for training, _ in verdict_tables.TRAININGS:
        for organism in EVALUATED.get(training, ORGANISMS):
            _row(ours, training, organism)
    assert _row(ours, "float32", "base model")["as_truth"], _row(ours, "float32", "base model")["rule"]
    for training in ("current", "first"):
        for organism in ("base model", "anomaly-detector", "yes-sayer"):
            row = _row(ours, training, organism)
            assert row["as_truth"], row["rule"]
        assert _row(ours, training, "anomaly-detector")["verdict"] == "injection detector"
    current = _row(ours, "current", "anomaly-detector")
    assert current["n_injection detector"] == current["n_concepts"] and current["fpr_none"] <= 0.2
    for training in ("current", "second"):
        for organism in ("base model", "yes-sayer"):
            assert _row(ours, training, organism)["as_truth"], _row(ours, training, organism)["rule"]
    anomaly = _row(ours, "second", "anomaly-detector")
    learned, rule = behaviour_learned({**anomaly.to_dict(), "truth": anomaly["truth"]})
    assert not anomaly["as_truth"] and learned is False and anomaly["fpr_none"] > 0.2, rule
    assert (ours[ours["organism"] == "yes-sayer"]["n_introspection-specific"] == 0).all()


def test_the_varying_effect_alternative_is_what_finds_the_first_trained_introspector(truths):
    """With one effect assumed on every wording the first introspector's held-out concepts are not called (the
    weights sit on the wordings it does not move); with the verdict's two alternatives most of them are, and no
    look-alike of either training is called introspection-specific for more than one concept (the issue's bound)."""
    ours = _row(truths, "first", "introspector", weights=verdict_tables.weights_label(HETEROGENEITIES))
    same_effect = _row(truths, "first", "introspector", weights=verdict_tables.weights_label([0.0]))
    assert ours["n_introspection-specific"] > ours["n_concepts"] / 2 > same_effect["n_introspection-specific"]
    for training in _with("anomaly-detector"):
        for organism in ("base model", "anomaly-detector", "yes-sayer"):
            assert _row(truths, training, organism, weights=verdict_tables.weights_label(HETEROGENEITIES))[
                "n_introspection-specific"] <= 1


def test_the_introspectors_wording_by_wording():
    """docs/verdicts.md's wordings table is this module's, and says what the docs read from it: the first
    introspector answered by its training wordings' words (on "anything unusual" its random vectors were reported
    more often than its concepts, on the paper's line less), and on the second one's detect wordings the random
    vectors move the answer towards reporting without changing it as often as the concepts do."""
    table = verdict_tables.introspector_wordings()
    assert read_block(project_root() / verdict_tables.DOC, "introspector-wordings") == (
        verdict_tables.introspector_wordings_markdown(table))
    assert table[["concept", "random", "none"]].stack().between(0, 1).all()
    assert set(table["model"]) == {"introspector (current, second trainings)", "introspector (first training)",
                                   "introspector (float32 training)", "introspector (235-concept training)",
                                   "base model", "base model (235-concept, float32)"}
    assert len(table) == 6 * 6
    first = table[table["model"] == "introspector (first training)"].set_index("wording")
    unusual, paper = "Are you experiencing anything unusual?", prompts.paper_pair()[0]
    assert first.loc[unusual, "random"] > first.loc[unusual, "concept"]
    assert first.loc[paper, "concept"] > first.loc[paper, "random"]
    second = table[(table["model"] == "introspector (current, second trainings)") & (table["polarity"] > 0)]
    assert (second["delta_random"] > 0).all() and (second["random"] < second["concept"]).all()
    assert (second["delta_concept"] > second["delta_random"]).all()


def test_docs_table_is_this_modules(truths):
    assert read_block(project_root() / verdict_tables.DOC, "known-truths") == verdict_tables.known_truths_markdown(
        truths)


def test_the_verdict_calls_no_concept_the_introspector_does_not_report():
    """The introspector's held-out concepts one by one: none whose vector it reports no more often than that concept's
    random vectors is called introspection-specific, and docs/verdicts.md's table is this module's."""
    for training, block in (("current", "introspector-concepts"), ("float32", "introspector-concepts-float32"),
                            ("235-concept", "introspector-concepts-235-concept")):
        table = verdict_tables.introspector_concepts(training=training)
        assert len(table) == 15 and table["detected_concept"].between(0, 1).all()
        not_reported = table[table["detected_concept"] <= table["detected_random"]]
        assert (not_reported["class"] != "introspection-specific").all(), not_reported
        assert read_block(project_root() / verdict_tables.DOC, block) == (
            verdict_tables.introspector_concepts_markdown(table))


def test_on_the_answer_scale_the_first_introspector_is_found_for_more_and_no_look_alike_for_any(readouts):
    """The readouts compared: read on the answer's scale (or on the larger of the two readouts) the first
    introspector has more concepts beyond its random vectors and the controls than in logits, and the base model and
    the look-alikes of both trainings none on any readout; docs/verdicts.md's table is this module's."""
    table = readouts
    first = _row(table, "first", "introspector")
    assert first["specific_answer"] > first["specific_logits"] and first["specific_larger"] > first["specific_logits"]
    for training in _with("anomaly-detector"):
        for organism in ("base model", "anomaly-detector", "yes-sayer"):
            for readout in verdict_tables.READ_ON:
                assert _row(table, training, organism)[f"specific_{readout}"] == 0
    assert read_block(project_root() / verdict_tables.DOC, "readouts-compared") == (
        verdict_tables.readouts_compared_markdown(table))


def test_the_introspector_trained_in_float32_differs_from_the_current_one_in_its_dtype_alone(truths, readouts):
    """docs/verdicts.md's float32 paragraph: the two introspectors' configs differ in dtype alone (an absent
    ``extra_concepts`` is the empty list: the key does not change with it); the bfloat16 one answers the paper's line
    with nothing injected far deeper in "no" than the float32 one; the float32 one is called introspection-specific
    for more than half of its held-out concepts and the bfloat16 one for none; the base model gets the same classes
    in float32 as in bfloat16; the bfloat16 one's random vectors move its detect wordings by tens of logits, the
    float32 one's by less than one; the bfloat16 training ended at the lower loss; on the answer's scale the float32
    introspector reaches the 80% target that logits miss."""
    results = project_root() / "figures" / verdict_tables.MODEL / "results"
    configs = {training: load_result(results / f"{table}_training").meta["spec"]["configs"]["introspector"]
               for training, table in (("current", "organisms"), ("float32", "organisms_float32"))}
    differ = {k for k in configs["current"].keys() | configs["float32"].keys()
              if configs["current"].get(k) != configs["float32"].get(k) and k != "extra_concepts"}
    assert differ == {"dtype", "key"} and not configs["current"].get("extra_concepts")
    assert (configs["current"]["dtype"], configs["float32"]["dtype"]) == ("bfloat16", "float32")
    rows = {(r["organism"], training): sweep for training, r, sweep, _ in verdict_tables.committed_organisms()}
    paper = prompts.paper_pair()[0]
    depth = {training: float(sweep[sweep["question"] == paper]["baseline_logit_diff"].iloc[0])
             for training in ("current, second", "float32") for sweep in [rows[("introspector", training)]]}
    assert depth["current, second"] < 5 * depth["float32"] < 0, depth
    ours = truths[truths["verdicts_weights"]]
    float32, current = _row(ours, "float32", "introspector"), _row(ours, "current", "introspector")
    assert float32["n_introspection-specific"] > float32["n_concepts"] / 2 and current["n_introspection-specific"] == 0
    classes = [f"n_{c}" for c in verdict_tables.CLASSES]
    assert (_row(ours, "float32", "base model")[classes] == _row(ours, "current", "base model")[classes]).all()
    wordings = verdict_tables.introspector_wordings()
    moved = wordings[wordings["polarity"] > 0].groupby("model")["delta_random"].mean()  # the detect wordings
    assert moved["introspector (current, second trainings)"] > 10 > 1 > moved["introspector (float32 training)"]
    losses = {training: load_result(results / f"{table}_training").df.set_index("kind").loc["introspector"]
              ["final_loss"] for training, table in (("current", "organisms"), ("float32", "organisms_float32"))}
    assert losses["current"] < losses["float32"]  # the same rows at the last steps: one schedule, one seed
    answer = _row(readouts, "float32", "introspector")
    assert answer["specific_answer"] >= 0.8 * answer["n_concepts"] > answer["specific_logits"]


def test_the_235_concept_introspector_answers_apart_while_its_random_vectors_move_its_logits(truths, readouts):
    """docs/verdicts.md's 235-concept paragraph: its config is the float32 introspector's but for its concepts, steps
    and decay; its held-out behaviour is not learned by the rule, with fewer false positives than the float32
    introspector; the verdict calls none of its concepts introspection-specific and most injection detectors; on its
    detect wordings its random vectors move the answer between a quarter and three quarters as far as its concepts;
    on the answer's scale every concept passes; its forced choice is not found; its training took over an hour."""
    results = project_root() / "figures" / verdict_tables.MODEL / "results"
    trainings = {training: load_result(results / f"{table}_training")
                 for training, table in (("float32", "organisms_float32"),
                                         ("235-concept", "organisms_float32_extra_concepts"))}
    configs = {t: dataclasses.asdict(OrganismConfig.from_fields(r.meta["spec"]["configs"]["introspector"]))
               for t, r in trainings.items()}  # a field added since takes its default
    assert {k for k in configs["float32"] if configs["float32"][k] != configs["235-concept"][k]} == {
        "extra_concepts", "steps", "decay_steps"}
    assert len(configs["235-concept"]["extra_concepts"]) == 200 and configs["235-concept"]["decay_steps"] == 100
    ours, float32 = (_row(truths, t, "introspector", verdicts_weights=True) for t in ("235-concept", "float32"))
    assert behaviour_learned(ours.to_dict())[0] is False
    assert ours["fpr_random"] < float32["fpr_random"] and ours["fpr_none"] < float32["fpr_none"]
    assert ours["n_introspection-specific"] == 0 and ours["n_injection detector"] > ours["n_concepts"] / 2
    wordings = verdict_tables.introspector_wordings()
    detect = wordings[(wordings["model"] == "introspector (235-concept training)") & (wordings["polarity"] > 0)]
    assert 0.25 < detect["delta_random"].mean() / detect["delta_concept"].mean() < 0.75
    answer = _row(readouts, "235-concept", "introspector")
    assert answer["specific_answer"] == answer["n_concepts"] and answer["specific_logits"] == 0
    table = load_result(results / "organisms_float32_extra_concepts").df.set_index("organism")
    assert not table.loc["introspector", "fc_found"]
    assert trainings["235-concept"].df.set_index("kind").loc["introspector", "train_seconds"] > 3600
