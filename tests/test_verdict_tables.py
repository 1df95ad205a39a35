"""The verdicts on known truths (the committed Qwen organisms' held-out atlases): the look-alikes and the base model
are classified as their truth says with the verdict's weights, the trained introspector is called for more of its
concepts with them than with the same-effect weights alone, and docs/verdicts.md's table is this module's."""

from __future__ import annotations

import pytest

from introspection_utils.apps import verdict_tables
from introspection_utils.core.paths import project_root, read_block
from introspection_utils.stats.introspection_score import HETEROGENEITIES


@pytest.fixture(scope="module")
def truths():
    return verdict_tables.known_truths()


def test_the_look_alikes_and_the_base_model_are_classified_as_their_truth_says(truths):
    ours = truths[truths["verdicts_weights"]].set_index("organism")
    assert set(ours.index) == {"base model", "introspector", "anomaly-detector", "yes-sayer"}
    for organism in ("base model", "anomaly-detector", "yes-sayer"):
        assert ours.loc[organism, "as_truth"], ours.loc[organism, "rule"]
    assert ours.loc["anomaly-detector", "verdict"] == "injection detector"
    assert ours.loc["yes-sayer", "n_introspection-specific"] == 0


def test_the_varying_effect_alternative_is_what_finds_the_trained_introspector(truths):
    """With one effect assumed on every wording the introspector's held-out concepts are not called (the weights sit
    on the wordings it does not move); with the verdict's two alternatives most of them are, and no look-alike is
    called introspection-specific for more than one concept (the issue's bound)."""
    t = truths.set_index(["organism", "weights"])
    ours = t.loc[("introspector", verdict_tables.weights_label(HETEROGENEITIES))]
    same_effect = t.loc[("introspector", verdict_tables.weights_label([0.0]))]
    assert ours["n_introspection-specific"] > ours["n_concepts"] / 2 > same_effect["n_introspection-specific"]
    for organism in ("base model", "anomaly-detector", "yes-sayer"):
        assert t.loc[(organism, verdict_tables.weights_label(HETEROGENEITIES)), "n_introspection-specific"] <= 1


def test_docs_table_is_this_modules(truths):
    assert read_block(project_root() / verdict_tables.DOC, "known-truths") == verdict_tables.known_truths_markdown(
        truths)


def test_the_verdict_calls_no_concept_the_introspector_does_not_report():
    """The introspector's held-out concepts one by one: none whose vector it reports no more often than that concept's
    random vectors is called introspection-specific, and docs/verdicts.md's table is this module's."""
    table = verdict_tables.introspector_concepts()
    assert len(table) == 15 and table["detected_concept"].between(0, 1).all()
    not_reported = table[table["detected_concept"] <= table["detected_random"]]
    assert (not_reported["class"] != "introspection-specific").all(), not_reported
    assert read_block(project_root() / verdict_tables.DOC, "introspector-concepts") == (
        verdict_tables.introspector_concepts_markdown(table))
