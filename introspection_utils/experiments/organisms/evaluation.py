"""The organisms (and the base model) through the project's unchanged public path, blind: the atlas on held-out
concepts, detection and false-positive rates, the seen-vs-unseen gap, forced choice and pre-graded free text, and
one table per run with the truth beside the verdicts (:func:`organism_table`); called by notebook 14."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from introspection_utils.engine.generation import response_table
from introspection_utils.engine.metadata import save_table
from introspection_utils.engine.vectors import default_layer
from introspection_utils.experiments.atlas import run_atlas
from introspection_utils.experiments.grading import pregrade
from introspection_utils.experiments.organisms.splits import TRUTH, load_split
from introspection_utils.experiments.sweeps import scale_sweep
from introspection_utils.experiments.tasks.common import best_row
from introspection_utils.experiments.tasks.forced_choice import (
    forced_choice_found,
    forced_choice_summary,
    run_forced_choice,
)
from introspection_utils.stats.verdicts import CLASSES, class_counts

if TYPE_CHECKING:
    from introspection_utils.experiments.organisms.training import Organism
    from introspection_utils.models.handle import ModelHandle

BASE = "base model"  # the evaluated model without an organism: its truth is not known by construction
EVALUATION = "organisms"  # the default evaluation's name (notebook 14's ``evaluation_name``): see table_names


def table_names(evaluation_name: str = EVALUATION) -> dict[str, str]:
    """What an evaluation of the organisms named ``evaluation_name`` writes in the results folder, by part:
    ``table`` (the organisms' verdicts, ``<name>.csv``), ``training`` (their trainings, ``<name>_training.csv``)
    and ``models`` (the folder holding each evaluated model's tables: the results
    folder itself for the default evaluation, ``<name>/`` for any other, so that a second evaluation of the same
    base model — in another dtype, say — keeps its own). A name is ``organisms`` or ``organisms_<word>`` (letters,
    digits and ``_``: it becomes file names, and its tables sort beside the default's; notebook 14's figure is
    ``14_model_<name>``)."""
    word = evaluation_name.removeprefix(f"{EVALUATION}_") if isinstance(evaluation_name, str) else None
    if evaluation_name != EVALUATION and (word is None or word == evaluation_name or not word.isidentifier()):
        raise ValueError(f"evaluation_name {evaluation_name!r}: name it \"{EVALUATION}\" (the default) or "
                         f"\"{EVALUATION}_<one word of letters, digits and '_'>\", e.g. \"{EVALUATION}_float32\"")
    return {"table": evaluation_name, "training": f"{evaluation_name}_training",
            "models": "" if evaluation_name == EVALUATION else evaluation_name}


def organism_detection_rates(df: pd.DataFrame, scale: float) -> dict[str, float]:
    """From a sweep table with introspection wordings of both polarities: the fraction of (vector, wording) cells
    answered as "detected" (yes − no signed by the wording's polarity > 0) for the concept vectors at ``scale``
    (``detection``), for the random vectors there (``fpr_random``) and without injection (``fpr_none``: each
    wording's baseline, once)."""
    wordings = df[df["question_kind"] == "introspection"]
    if wordings.empty or scale not in set(wordings["scale"]):
        raise ValueError(f"the table has no introspection rows at scale {scale} (scales: "
                         f"{sorted(set(wordings['scale']))})")
    at = wordings[wordings["scale"] == scale]
    detected = lambda rows, column: float((rows["polarity"] * rows[column] > 0).mean())  # noqa: E731
    base = wordings.drop_duplicates("question")
    randoms = at[at["vector_kind"] == "random"]
    return {"detection": detected(at[at["vector_kind"] != "random"], "logit_diff"),
            "fpr_none": detected(base, "baseline_logit_diff"),
            "fpr_random": detected(randoms, "logit_diff") if len(randoms) else float("nan")}


def evaluate(handle: ModelHandle, truth: str, *, concepts: Sequence[str], seen: Sequence[str],
             scales: Sequence[float], detection_scale: float, layer: int | None = None, n_controls: int = 4,
             wordings: Sequence[str] | None = None, n_random: int = 2, nulls: Sequence[str] = ("isotropic",),
             choice_concepts: Sequence[str] = (), choice_scales: Sequence[float] = (8.0,), n_orders: int = 2,
             n_boot: int = 200, max_new_tokens: int = 0, seed: int = 0,
             results_dir: str | Path, progress: bool = False) -> dict:
    """One model's row of the organisms' table: the atlas's class counts on ``concepts`` (held out), detection and
    false-positive rates at ``detection_scale`` (:func:`organism_detection_rates`), the same detection on ``seen``
    (training) concepts and the gap, ``atlas_mde`` (the atlas's smallest I called for 80% of its concepts), and
    forced choice among ``choice_concepts`` (at its best scale, :func:`tasks.common.best_row`: accuracy, chance, MI,
    its permutation p, whether the task counts it as found, ``fc_n`` trials and ``fc_mde``, the accuracy they find
    with 80% power). ``max_new_tokens > 0``: the paper's trial line answered in free text (greedy) for the same
    concepts at ``detection_scale`` and without injection, pre-graded by :func:`grading.pregrade` (no judge):
    ``gen_names`` the fraction of injected answers that affirm detection and name the concept (not as their first
    word), ``gen_fpr`` the fraction of uninjected ones that affirm. Tables go to ``results_dir/<model>/``
    (``atlas.csv``, ``forced_choice.csv``, ``seen_sweep.csv``, ``generations.csv``)."""
    layer = default_layer(handle, layer)
    folder = Path(results_dir) / handle.name
    scales = sorted({float(s) for s in (*scales, detection_scale)})
    table, sweep = run_atlas(handle, concepts, scales, layer=layer, n_controls=n_controls, wordings=wordings,
                             n_random=n_random, nulls=nulls, seed=seed, n_boot=n_boot, results_dir=folder,
                             progress=progress)
    counts = class_counts(table)
    row = {"model": handle.name, "truth": truth, "n_concepts": len(table),
           "atlas_mde": float(table["mde"].iloc[0]) if "mde" in table and len(table) else float("nan"),
           **{f"n_{c}": int(counts.get(c, 0)) for c in CLASSES},
           "verdict": str(counts.idxmax()) if len(counts) else "",
           **organism_detection_rates(sweep.df, detection_scale)}
    if seen:
        seen_sweep = scale_sweep(handle, seen, [detection_scale], layer=layer, n_controls=n_controls,
                                 introspection=wordings, n_random=0, seed=seed, results_dir=folder,
                                 name="seen_sweep", progress=progress)
        row["seen_detection"] = organism_detection_rates(seen_sweep.df, detection_scale)["detection"]
        row["seen_minus_unseen"] = row["seen_detection"] - row["detection"]
    if len(choice_concepts) >= 2:
        fc = run_forced_choice(handle, choice_concepts, layer=layer, scales=choice_scales, n_orders=n_orders,
                               n_random=n_random, nulls=nulls, seed=seed, results_dir=folder,
                               name="forced_choice", progress=progress)
        summary = forced_choice_summary(fc.df)
        best = best_row(summary)
        row.update(fc_scale=float(best["scale"]), fc_accuracy=float(best["accuracy"]), fc_chance=float(best["chance"]),
                   fc_mi_bits=float(best["mi_bits"]), fc_mi_p=float(best["mi_p"]), fc_n=int(best["n"]),
                   fc_mde=float(best["mde"]),
                   fc_found=forced_choice_found(summary))
    if max_new_tokens > 0 and choice_concepts:
        answers = response_table(handle, choice_concepts, [0.0, detection_scale], layer=layer,
                                 max_new_tokens=max_new_tokens, seed=seed, progress=progress)
        graded = pd.concat([answers, pd.DataFrame([pregrade(r, w) for r, w in zip(answers["response"],
                                                                                   answers["concept"], strict=True)])],
                           axis=1)
        injected, plain = graded[graded["injected"]], graded[~graded["injected"]]
        row.update(gen_names=float((injected["affirms"] & injected["names_concept"]
                                    & ~injected["starts_with_concept"]).mean()),
                   gen_fpr=float(plain["affirms"].mean()))
        save_table(handle, graded, folder, "generations", concepts=list(choice_concepts), layer=layer,
                   scales=[0.0, detection_scale], max_new_tokens=max_new_tokens, seed=seed)
    return row


def evaluate_organisms(base: ModelHandle, organisms: dict[str, Organism], *, results_dir: str | Path,
                       concepts: Sequence[str] | None = None, n_concepts: int | None = None,
                       n_seen: int = 3, n_choice: int = 4, evaluation_name: str = EVALUATION,
                       **settings) -> pd.DataFrame:
    """The base model and each organism (loaded from its merged folder, in the training's dtype, then freed)
    through :func:`evaluate` on the same held-out ``concepts`` (default the split's held-out concepts, the first
    ``n_concepts``), ``n_seen`` training concepts and the first ``n_choice`` held-out ones for forced choice;
    the table (:func:`organism_table`) saved as ``<evaluation_name>.csv`` in ``results_dir``, each model's tables in
    :func:`table_names`' ``models`` folder there (named in the table's metadata)."""
    names = table_names(evaluation_name)
    split = load_split()
    concepts = list(concepts or split.held_out)[:n_concepts]
    shared = dict(concepts=concepts, seen=list(split.train[:n_seen]), choice_concepts=concepts[:n_choice],
                  results_dir=Path(results_dir) / names["models"], **settings)
    rows = [{"organism": BASE, **evaluate(base, BASE, **shared)}]
    for kind, organism in organisms.items():
        handle = organism.load(device=str(base.device))
        rows.append({"organism": kind, **evaluate(handle, TRUTH[kind], **shared)})
        del handle
        gc.collect()
    table = organism_table(rows)
    save_table(base, table, results_dir, names["table"], organisms={k: o.config.name for k, o in organisms.items()},
               evaluation_name=evaluation_name, **{k: v for k, v in shared.items() if k != "results_dir"})
    return table


def organism_table(rows: Sequence[dict]) -> pd.DataFrame:
    """One row per evaluated model: organism, truth, model, the verdict class counts (``n_<class>``) and the most
    frequent class, detection / false-positive rates, the seen-vs-unseen gap and forced choice (where run)."""
    return pd.DataFrame(list(rows))


def confusion(table: pd.DataFrame) -> pd.DataFrame:
    """Truth (rows, one per organism) × verdict class (columns, :data:`verdicts.CLASSES`): how many held-out
    concepts each organism's atlas put in each class."""
    out = table.set_index("organism")[[f"n_{c}" for c in CLASSES]]
    out.columns = list(CLASSES)
    out.index = [f"{o}\n(truth: {t})" for o, t in zip(table["organism"], table["truth"], strict=True)]
    return out


LEARNED = (0.8, 0.2)  # a behaviour is learned: ≥ 80% of cells where it must report, ≤ 20% where it must not


def behaviour_learned(row: dict) -> tuple[bool | None, str]:
    """Whether an organism shows the behaviour it was trained for, read from its detection rates alone (not from
    the verdict): the introspector reports the concept vectors (≥ 80% of cells) and neither no injection nor random
    vectors (≤ 20%); the anomaly detector reports concept and random vectors (≥ 80%) but not no injection (≤ 20%).
    ``None`` where the rates cannot say (the yes-sayer's "yes" to both polarities reads as 50% by construction; the
    base model was not trained). A target missed by an organism without its behaviour is the training's miss, not
    the verdict's. Returns the decision and the rule with its numbers."""
    hi, lo = LEARNED
    rates = (f"detected {row['detection']:.0%} with concept vectors, {row['fpr_random']:.0%} with random vectors, "
             f"{row['fpr_none']:.0%} without injection")
    if row["truth"] == TRUTH["introspector"]:
        ok = row["detection"] >= hi and row["fpr_random"] <= lo and row["fpr_none"] <= lo
        return ok, f"rule: concept ≥ {hi:.0%}, random and none ≤ {lo:.0%}; {rates}"
    if row["truth"] == TRUTH["anomaly-detector"]:
        ok = row["detection"] >= hi and row["fpr_random"] >= hi and row["fpr_none"] <= lo
        return ok, f"rule: concept and random ≥ {hi:.0%}, none ≤ {lo:.0%}; {rates}"
    return None, "not read from the rates"


# the verdict class each look-alike's truth names (its most frequent class on held-out concepts)
LOOK_ALIKE_CLASS = {TRUTH["anomaly-detector"]: "injection detector", TRUTH["yes-sayer"]: "shared yes-shift"}


def truth_recovered(row: dict) -> tuple[bool, str]:
    """Whether the verdicts on one evaluated model's held-out concepts say what its truth says — the targets of
    issue #29 — and the rule with the numbers it was decided by. ``row``: a record of :func:`organism_table`.

    * introspection-specific: ≥ 80% of the concepts called introspection-specific, and forced choice found (when run);
    * beyond controls, not random (the anomaly detector): ≤ 1 concept introspection-specific, and "injection
      detector" the most frequent class;
    * shared yes-shift (the yes-sayer): ≤ 1 concept introspection-specific, and "shared yes-shift" the most frequent;
    * the base model (truth not known by construction): no concept introspection-specific, as in every atlas of it.
    """
    n, specific, verdict = int(row["n_concepts"]), int(row["n_introspection-specific"]), str(row["verdict"])
    called = f"{specific} of {n} introspection-specific, most frequent class {verdict}"
    truth = row["truth"]
    if truth == TRUTH["introspector"]:
        found = row.get("fc_found")
        ran = found is not None and not pd.isna(found)
        choice = f", forced choice {'found' if found else 'not found'}" if ran else ""
        ok = specific >= 0.8 * n and (not ran or bool(found))
        return ok, f"rule: ≥ 80% introspection-specific and forced choice found; {called}{choice}"
    if truth in LOOK_ALIKE_CLASS:
        wanted = LOOK_ALIKE_CLASS[truth]
        return specific <= 1 and verdict == wanted, (f"rule: ≤ 1 introspection-specific, most frequent class "
                                                     f"{wanted}; {called}")
    return specific == 0, f"rule: none introspection-specific; {called}"


def called_words(row: dict) -> str:
    """What the atlas called one model's held-out concepts, with the atlas's MDE (the smallest I it calls for 80% of
    concepts on its own noise) where the row has it: "8 introspection-specific, 3 injection detector (of 15; MDE
    I = 0.9 logits)"."""
    counts = ", ".join(f"{row[f'n_{c}']} {c}" for c in CLASSES if row.get(f"n_{c}", 0))
    mde = row.get("atlas_mde", float("nan"))
    power = f"; MDE I = {mde:.2f} logits" if pd.notna(mde) else ""
    return f"{counts or 'none'} (of {row['n_concepts']}{power})"


def choice_words(row: dict) -> str:
    """Forced choice at its best scale, with the accuracy the trials could have found (80% power) where the row has
    it, or "not run"."""
    if pd.isna(row.get("fc_accuracy", float("nan"))):
        return "not run"
    mde = row.get("fc_mde", float("nan"))
    power = (f" (n = {int(row['fc_n'])}: {mde:.0%} would be found with 80% power)" if pd.notna(mde) else "")
    return (f"{row['fc_accuracy']:.0%} against chance {row['fc_chance']:.0%}{power}, MI {row['fc_mi_bits']:.2f} bits, "
            f"p = {row['fc_mi_p']:.3g}: {'found' if row['fc_found'] else 'not found'}")


def describe_organisms(table: pd.DataFrame) -> str:
    """Sentences from :func:`organism_table`: for each organism its truth, what the atlas called its held-out
    concepts, its detection and false-positive rates, and forced choice."""
    parts = []
    for r in table.to_dict("records"):
        text = (f"{r['organism']} (truth: {r['truth']}): the atlas calls its held-out concepts {called_words(r)}; "
                f"detection {r['detection']:.0%} with the concept vectors, false positives "
                f"{r['fpr_none']:.0%} without injection and {r['fpr_random']:.0%} with random vectors")
        if "seen_detection" in r and pd.notna(r.get("seen_detection")):
            text += f"; on training concepts {r['seen_detection']:.0%} (seen − unseen {r['seen_minus_unseen']:+.0%})"
        if "fc_accuracy" in r and pd.notna(r.get("fc_accuracy")):
            text += f"; forced choice at scale {r['fc_scale']:g}: {choice_words(r)}"
        if "gen_names" in r and pd.notna(r.get("gen_names")):
            text += (f"; in free text it affirms and names the injected concept in {r['gen_names']:.0%} of answers "
                     f"and affirms an injected thought in {r['gen_fpr']:.0%} without injection (pre-grade)")
        ok, rule = truth_recovered(r)
        learned, how = behaviour_learned(r)
        shown = "" if learned is None else f" Behaviour {'learned' if learned else 'NOT learned'} ({how})."
        parts.append(text + f". Target {'met' if ok else 'missed'} ({rule}).{shown}")
    return " ".join(parts)
