"""The findings' section on known truths (notebook 14): each evaluation of the model organisms, default and named,
with each model's target read by its rule, the anchor's numbers and the trainings as measured; a part of
:mod:`introspection_utils.apps.findings`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from introspection_utils.core.data import data_dir
from introspection_utils.core.results import saved_meta, saved_table
from introspection_utils.experiments.organisms import evaluation as organisms_evaluation
from introspection_utils.experiments.organisms.probe import DETECTED


def organism_evaluations(results: Path) -> list[str]:
    """The evaluations of notebook 14 in ``results`` by name (:func:`organisms.evaluation.table_names`): the default
    one (``organisms.csv``) where it is there, then every named one (a findings variant's ``evaluation_name``: a
    table whose metadata names it), in name order."""
    default = organisms_evaluation.EVALUATION
    named = [name for meta in sorted(results.glob(f"{default}_*.meta.json"))
             if saved_meta(results / (name := meta.name.removesuffix(".meta.json"))).get("spec", {}).get(
                 "evaluation_name") == name]
    return [default] * (results / f"{default}.csv").is_file() + named


def _evaluation_label(results: Path, evaluation_name: str) -> str:
    """What a named evaluation's rows say after their organism: the dtype it ran in and its name ("" for the
    default evaluation)."""
    if evaluation_name == organisms_evaluation.EVALUATION:
        return ""
    return f" ({saved_meta(results / evaluation_name)['dtype']}, `{evaluation_name}`)"


def organism_rows(results: Path, evaluation_name: str = organisms_evaluation.EVALUATION) -> pd.DataFrame:
    """Notebook 14's table of evaluation ``evaluation_name`` (``<name>.csv`` in ``results``,
    :func:`organisms.evaluation.table_names`) with each model's target read by
    :func:`organisms.evaluation.truth_recovered`: ``target`` ("met"/"missed") and ``rule`` (with its numbers); a
    named evaluation's organisms carry its dtype and name (:func:`organism_evaluations`)."""
    table = saved_table(results / organisms_evaluation.table_names(evaluation_name)["table"])
    if table is None:
        return pd.DataFrame()
    table = table.assign(organism=table["organism"] + _evaluation_label(results, evaluation_name),
                         evaluation=evaluation_name)
    records = table.to_dict("records")
    decided = [organisms_evaluation.truth_recovered(r) for r in records]
    learned = [organisms_evaluation.behaviour_learned(r) for r in records]
    return table.assign(target=["met" if ok else "missed" for ok, _ in decided], rule=[rule for _, rule in decided],
                        learned=["n/a" if ok is None else ("yes" if ok else "no") for ok, _ in learned],
                        learned_rule=[rule for _, rule in learned])


ORGANISM_ANCHOR = "2511.21399"  # data/anchor_numbers.csv's rows of the trained introspector (Fonseca Rivera)


def organisms_markdown(rows: pd.DataFrame, training: pd.DataFrame | None = None) -> str:
    """:func:`organism_rows` as a Markdown section: truth by construction beside the verdicts, the rates, forced
    choice and the target each model was held to; then the anchor's numbers (``data/anchor_numbers.csv``) and, with
    ``training`` (``organisms_training.csv`` and each named evaluation's), each organism's training as measured when
    it was trained."""
    lines = ["## Verdicts on known truths (notebook 14)", "",
             "Three LoRA organisms trained on this model with a truth known by construction (a concept introspector, "
             "an anomaly detector that reports any injection, a yes-sayer), and the base model, each through the "
             "unchanged atlas on held-out concepts (never trained on) with random vectors, blind to which is which. "
             "Detection: the fraction of (vector, wording) cells answered \"detected\" at the detection scale "
             "(yes − no signed by the wording's polarity > 0). *Behaviour learned* is read from those rates alone "
             "(`evaluation.behaviour_learned`): a target missed by an organism that did not learn its behaviour is "
             "the training's miss, not the verdict's. Every training of the organisms whose evaluation is committed, "
             "the verdicts recomputed on each, what changed between them, and why the verdict misses an introspector "
             "whose answers are specific: [docs/verdicts.md](docs/verdicts.md#verdicts-on-known-truths).", "",
             *(["A model followed by a dtype and a name comes from another evaluation of notebook 14 (a findings "
                "variant's `evaluation_name`: its own organisms, and its base model, in that dtype).", ""]
               if "evaluation" in rows and (rows["evaluation"] != organisms_evaluation.EVALUATION).any() else []),
             "| model | truth | what the atlas called the held-out concepts | detected: concepts / random / none | "
             "behaviour learned | seen − unseen | forced choice | target |", "|---|---|---|---|---|---|---|---|"]
    for r in rows.to_dict("records"):
        gap = f"{r['seen_minus_unseen']:+.0%}" if pd.notna(r.get("seen_minus_unseen")) else "not run"
        lines.append(f"| {r['organism']} | {r['truth']} | {organisms_evaluation.called_words(r)} | "
                     f"{r['detection']:.0%} / {r['fpr_random']:.0%} / {r['fpr_none']:.0%} | {r['learned']} | {gap} | "
                     f"{organisms_evaluation.choice_words(r)} | {r['target']} ({r['rule']}) |")
    anchors = pd.read_csv(data_dir() / "anchor_numbers.csv", comment="#")
    for a in anchors[anchors["source"].str.contains(ORGANISM_ANCHOR, regex=False)].itertuples():
        lines += ["", f"The anchor ({a.source}, {a.model}, {a.setup}): {a.metric} {a.value}."]
    if training is not None and len(training):
        lines += ["", "Training (LoRA, measured by the run; `organisms_training.csv`, and a named evaluation's "
                  "`<name>_training.csv`):", "",
                  "| organism | steps | loss first → last 5 | probe at the end: detected concept / random / none | "
                  "wall time | examples/s | tokens/s | load average |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {t.kind} | {t.steps} | {t.first_loss:.2f} → {t.final_loss:.3f} | {_probe_cell(t)} | "
                  f"{t.train_seconds / 60:.1f} min | {t.examples_per_s:.2f} | {t.tokens_per_s:.0f} | {t.load_avg:.1f} |"
                  for t in training.itertuples()]
    return "\n".join(lines)


def _probe_cell(row: Any) -> str:
    """The training's last behaviour probe (training concepts; ``organisms.probe.behaviour_probe``), or why none."""
    rates = [getattr(row, column, float("nan")) for column in DETECTED]
    if any(pd.isna(r) for r in rates):
        return "not recorded (trained before the probe)"
    return " / ".join(f"{r:.0%}" for r in rates)


def organisms_section(results: Path) -> str:
    """The section for every evaluation of :func:`organism_evaluations` in ``results`` (their rows, then their
    trainings, in that order), or "" where there is none."""
    evaluations = organism_evaluations(results)
    rows = pd.concat([organism_rows(results, name) for name in evaluations] or [pd.DataFrame()], ignore_index=True)
    trainings = [t.assign(kind=t["kind"] + _evaluation_label(results, name)) for name in evaluations
                 if (t := saved_table(results / organisms_evaluation.table_names(name)["training"])) is not None]
    if not len(rows):
        return ""
    return organisms_markdown(rows, pd.concat(trainings, ignore_index=True) if trainings else None)
