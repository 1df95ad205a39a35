"""The tables docs/verdicts.md shows, rebuilt from the committed sweeps (no model run): the plasmode table (power and
false-positive rates on the model's own noise, :mod:`introspection_utils.stats.plasmode`), the verdicts on known
truths (the model organisms' held-out atlases, with the verdict's two alternative weights and with each alone) and
the trained introspector's held-out concepts one by one (its behaviour beside the verdict), every training's
introspector wording by wording beside the base model, and the known-truths test on each readout of
:mod:`introspection_utils.stats.readouts` (a comparison; the verdict reads logits).

    python -m introspection_utils.apps.verdict_tables [plasmode] [known-truths]   # default: both
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np
import pandas as pd

from introspection_utils.core.paths import project_root, replace_block
from introspection_utils.core.results import load_result
from introspection_utils.experiments.organisms.evaluation import (
    EVALUATION,
    organism_detection_rates,
    table_names,
    truth_recovered,
)
from introspection_utils.stats.introspection_score import HETEROGENEITIES
from introspection_utils.stats.plasmode import Panel, panel, report
from introspection_utils.stats.readouts import READOUTS, readout_p
from introspection_utils.stats.verdicts import ALPHA, CLASSES, benjamini_hochberg, class_counts, verdicts

DOC = "docs/verdicts.md"  # the file whose blocks :func:`main` writes (plasmode; known-truths and the organisms' tables)
SWEEPS = ("atlas_sweep", "atlas_binary_sweep", "atlas_prefill_sweep")
MODEL = "qwen2.5-coder-1.5b-instruct"
# The organisms' trainings whose held-out atlases are committed: the current one (``organisms.csv``, written by
# notebook 14) and the earlier ones (each run's table as it wrote it, kept when the organisms were retrained so they
# can be compared): the first (adapters from layer 17 up, 12 training wordings), the second (adapters from 19 up, 20
# wordings; 4 random vectors a concept). A model kept from one training to the next (the base model; the second's
# introspector and yes-sayer) is the same model in each: the tables show it once, with the trainings that evaluated
# it, its latest run's held-out atlas and detection rates (an earlier run's own rates stay in its committed table).
# "float32": the current training's introspector recipe trained and evaluated in float32 (notebook 14's findings
# variant ["14.float32"], its own evaluation name), beside the current ones trained in bfloat16; its base model is
# evaluated in float32 too, so it is a model of its own here. "235-concept": the float32 introspector's recipe trained
# on 235 concepts (the split's 35 and the training file's 200 extra nouns) for 400 steps, the last 100 decaying its
# learning rate (the variant ["14.float32_extra_concepts"]); its base model is the float32 one.
TRAININGS = (("current", "organisms"), ("235-concept", "organisms_float32_extra_concepts"),
             ("float32", "organisms_float32"), ("second", "organisms_second"), ("first", "organisms_first"))
SHOWN = ("introspection-specific", "injection detector", "shared yes-shift", "shared suppression", "compression")


def report_markdown(table: pd.DataFrame, *, alpha: float = ALPHA) -> str:
    """The plasmode table (:func:`plasmode.report` rows of one or more panels) as ``docs/verdicts.md`` shows it."""
    lines = []
    for (model, fmt), group in table.groupby(["model", "answer_format"], sort=False):
        methods = list(dict.fromkeys(group["method"]))
        first = group.iloc[0]
        r = int(first["n_nulls"])
        lines += [f"**{model}, {fmt} format** ({first['n_concepts']} concepts, {r} norm-matched random vectors; "
                  f"α = {alpha:g}, Benjamini–Hochberg across concepts for \"called\"; the smallest rank p-value is "
                  f"1/{r + 1} = {1 / (r + 1):.3f}, in the leave-one-out 1/{r - 1} = {1 / (r - 1):.3f}"
                  + (" — above α, so no held-out null can be a false positive there" if 1 / (r - 1) > alpha else "")
                  + "):", "",
                  "| quantity | planted | truth | " + " | ".join(methods) + " |",
                  "|---|---|---|" + "---|" * len(methods)]
        for quantity, rows in group.groupby("quantity", sort=False):
            values = [rows[rows["method"] == m]["value"].iloc[0] if (rows["method"] == m).any() else None
                      for m in methods]  # the population test reads the verdict's statistic only
            cells = ["—" if v is None else (f"{v:.2f}" if "MDE" in quantity else f"{v:.1%}") if np.isfinite(v)
                     else "not reached" for v in values]
            lines.append(f"| {quantity} | {rows['effect'].iloc[0]} | {rows['truth'].iloc[0]} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).strip()


def committed_panels(model: str = MODEL, sweeps: Sequence[str] = SWEEPS) -> list[Panel]:
    """The panels of a model's committed atlas sweeps (``figures/<model>/results/<sweep>.csv``) that exist."""
    folder = project_root() / "figures" / model / "results"
    return [panel(pd.read_csv(folder / f"{name}.csv")) for name in sweeps if (folder / f"{name}.csv").exists()]


def weights_label(alternatives: Sequence[float]) -> str:
    """How the tables name a set of alternatives of the score's weights (their heterogeneities)."""
    return "heterogeneity " + " and ".join(f"{h:g}" for h in alternatives)


def committed_organisms(model: str = MODEL) -> list[tuple[str, dict, pd.DataFrame, float]]:
    """``(trainings, row, sweep, detection_scale)`` for every model evaluated by a training of :data:`TRAININGS` whose
    table is committed, once: ``trainings`` names the trainings that evaluated it, latest first ("current, second":
    a model kept from one training to the next), ``row`` its row of the latest one's table (organism, truth, model
    name, rates as that run wrote them), ``sweep`` its held-out ``atlas_sweep.csv`` (in the latest one's models
    folder, named by its table's metadata, :func:`organisms.evaluation.table_names`; a table written before
    evaluations had names: the results folder) and the scale that run read detection at. A model is its name and
    the dtype it was evaluated in: the base model evaluated in another dtype is another model, evaluated again in
    the same dtype by another evaluation the same one."""
    results = project_root() / "figures" / model / "results"
    found: dict[tuple[str, str], list] = {}
    for training, table in TRAININGS:
        if (results / f"{table}.csv").exists():
            organisms = load_result(results / table)
            spec = organisms.meta["spec"]
            models = results / table_names(spec.get("evaluation_name", EVALUATION))["models"]
            for r in organisms.df.to_dict("records"):
                model_key = (r["model"], organisms.meta["dtype"])
                if model_key in found:
                    found[model_key][0].append(training)
                else:
                    found[model_key] = [[training], r, pd.read_csv(models / r["model"] / "atlas_sweep.csv"),
                                        float(spec["detection_scale"])]
    return [(", ".join(trainings), r, sweep, scale) for trainings, r, sweep, scale in found.values()]


def evaluated_by(trainings: str, training: str) -> bool:
    """Whether a row of :func:`committed_organisms` (its ``trainings``) was evaluated by ``training``."""
    return training in trainings.split(", ")


def known_truths(model: str = MODEL, alternatives: Sequence[Sequence[float]] = (
        HETEROGENEITIES, *((h,) for h in HETEROGENEITIES))) -> pd.DataFrame:
    """The verdicts on the committed organisms' held-out atlases (each training of :data:`TRAININGS` whose table is
    committed in ``figures/<model>/results/`` names them; each one's ``atlas_sweep.csv`` beside it), recomputed for
    every set of ``alternatives`` of the score's weights (default: the verdict's, then each alone): one row per
    (model, alternatives) with ``training`` (the trainings that evaluated it), ``organism, truth, weights``
    (:func:`weights_label`), ``verdicts_weights`` (True for the verdict's), ``n_concepts``, the class counts
    ``n_<class>``, ``verdict`` (the most frequent class), the detection rates (``detection, fpr_random, fpr_none``, as
    the latest run wrote them) and ``as_truth`` / ``rule`` (:func:`organisms.evaluation.truth_recovered`, forced
    choice as that run found it)."""
    rows = []
    for training, r, sweep, _ in committed_organisms(model):
        for hs in alternatives:
            counts = class_counts(verdicts(sweep, n_boot=1, mde=False, heterogeneity=tuple(hs)))
            row = {"training": training, "organism": r["organism"], "truth": r["truth"],
                   "weights": weights_label(hs), "verdicts_weights": tuple(hs) == tuple(HETEROGENEITIES),
                   "n_concepts": int(counts.sum()), **{f"n_{c}": int(counts.get(c, 0)) for c in CLASSES},
                   "verdict": str(counts.idxmax()), "fc_found": r.get("fc_found"),
                   **{k: r[k] for k in ("detection", "fpr_random", "fpr_none")}}
            ok, rule = truth_recovered(row)
            rows.append({**row, "as_truth": ok, "rule": rule})
    return pd.DataFrame(rows)


def known_truths_markdown(table: pd.DataFrame) -> str:
    """:func:`known_truths` as the table ``docs/verdicts.md`` shows."""
    head = ("| training | organism | truth | detected: concept / random / none | weights | " + " | ".join(SHOWN)
            + " | other | as its truth says |\n|---|---|---|---|---|" + "---|" * (len(SHOWN) + 2))
    lines = [head]
    for r in table.to_dict("records"):
        shown = [r[f"n_{c}"] for c in SHOWN]
        weights = r["weights"] + (" (the verdict's)" if r["verdicts_weights"] else " alone")
        rates = " / ".join(f"{r[k]:.0%}" for k in ("detection", "fpr_random", "fpr_none"))
        lines.append(f"| {r['training']} | {r['organism']} | {r['truth']} | {rates} | {weights} | "
                     + " | ".join(map(str, shown))
                     + f" | {r['n_concepts'] - sum(shown)} | {'yes' if r['as_truth'] else 'no'} |")
    return "\n".join(lines)


def introspector_wordings(model: str = MODEL) -> pd.DataFrame:
    """What each evaluation wording gets from each training's introspector and from the base model, on the held-out
    concepts at the run's detection scale: how often it is answered as reporting an injected thought with the
    concept's vector, with random vectors and without injection (``concept``, ``random``, ``none``: the rule of
    :func:`organisms.evaluation.organism_detection_rates`, one wording at a time), and how far the vectors move its
    answer (``delta_concept``, ``delta_random``: the mean of polarity × ``delta``, the change of yes − no from its
    no-injection value, logits)
    — one row per (model, wording). An organism that learned to report injected concepts does so whatever the
    wording's words; one that learned its training wordings' words does not. A vector can move a wording far
    without changing its answer (from a deep "no" to a shallower one): the verdict reads the movement, the rates
    the answer."""
    committed = committed_organisms(model)
    models = [(f"introspector ({training} training{'s' * (',' in training)})", sweep, scale)
              for training, r, sweep, scale in committed if r["organism"] == "introspector"]
    models += [("base model" + ("" if evaluated_by(training, TRAININGS[0][0]) else f" ({training})"), sweep, scale)
               for training, r, sweep, scale in committed if r["organism"] == "base model"]
    rows = []
    for label, sweep, scale in models:
        at = sweep[(sweep["question_kind"] == "introspection") & (sweep["scale"] == scale)]
        moved = at["polarity"] * at["delta"]
        for question, rows_of in sweep[sweep["question_kind"] == "introspection"].groupby("question", sort=False):
            rates = organism_detection_rates(rows_of, scale)
            mine = at["question"] == question
            rows.append({"model": label, "wording": question, "polarity": int(rows_of["polarity"].iloc[0]),
                         "concept": rates["detection"], "random": rates["fpr_random"], "none": rates["fpr_none"],
                         "delta_concept": float(moved[mine & (at["vector_kind"] != "random")].mean()),
                         "delta_random": float(moved[mine & (at["vector_kind"] == "random")].mean())})
    return pd.DataFrame(rows)


def introspector_wordings_markdown(table: pd.DataFrame) -> str:
    """:func:`introspector_wordings` as ``docs/verdicts.md`` shows it: a wording a row; for each model, its detected
    rates (concept / random / none) and its moves (concept / random, logits)."""
    models = list(dict.fromkeys(table["model"]))
    head = " | ".join(f"{m}: detected | {m}: moved" for m in models)
    lines = [f"| evaluation wording | polarity | {head} |", "|---|---|" + "---|" * 2 * len(models)]
    for wording, rows_of in table.groupby("wording", sort=False):
        by = rows_of.set_index("model")
        cells = " | ".join(
            " / ".join(f"{by.loc[m, c]:.0%}" for c in ("concept", "random", "none")) + " | "
            + " / ".join(f"{by.loc[m, c]:+.1f}" for c in ("delta_concept", "delta_random")) for m in models)
        lines.append(f"| {wording} | {int(rows_of['polarity'].iloc[0]):+d} | {cells} |")
    return "\n".join(lines)


READ_ON = {"logits": ("logits",), "answer": ("answer scale",), "larger": tuple(READOUTS)}  # the table's readouts


def readouts_compared(model: str = MODEL) -> pd.DataFrame:
    """The verdict's test on each committed organism's held-out atlas read in logits (the verdict's), on the answer's
    scale and on the larger of the two (:data:`READ_ON`, :func:`readouts.readout_p`): how many concepts are beyond
    their random vectors and the controls (``specific_<readout>``: Benjamini–Hochberg over the larger p ≤ α, the
    condition of "introspection-specific") and beyond their random vectors alone (``beyond_random_<readout>``) — one
    row per evaluated model (``training``: the trainings that evaluated it). A comparison for the statistic: the
    plasmode table gives each readout's power and false-positive rates on the model's own noise."""
    rows = []
    for training, r, sweep, _ in committed_organisms(model):
        p, counts = panel(sweep), {}
        for name, readouts in READ_ON.items():
            p_random, p_controls = readout_p(p.concept_delta, p.null_delta, p.design, p.groups, readouts)
            counts[f"specific_{name}"] = int((benjamini_hochberg(np.maximum(p_random, p_controls)) <= ALPHA).sum())
            counts[f"beyond_random_{name}"] = int((benjamini_hochberg(p_random) <= ALPHA).sum())
        rows.append({"training": training, "organism": r["organism"], "truth": r["truth"], "n_concepts":
                     len(p.concepts), **counts})
    return pd.DataFrame(rows)


def readouts_compared_markdown(table: pd.DataFrame) -> str:
    """:func:`readouts_compared` as ``docs/verdicts.md`` shows it."""
    lines = ["| training | organism | truth | beyond random vectors and controls: logits / answer scale / larger | "
             "beyond random vectors alone: logits / answer scale / larger |", "|---|---|---|---|---|"]
    lines += [f"| {r['training']} | {r['organism']} | {r['truth']} | "
              + " | ".join(" / ".join(str(r[f"{kind}_{name}"]) for name in READ_ON) + f" of {r['n_concepts']}"
                           for kind in ("specific", "beyond_random")) + " |"
              for r in table.to_dict("records")]
    return "\n".join(lines)


def introspector_concepts(model: str = MODEL, training: str = TRAININGS[0][0]) -> pd.DataFrame:
    """The introspector of ``training`` (:data:`TRAININGS`), its held-out concepts one by one: what it does (the
    fraction of the evaluation's wordings it answers as reporting an injected thought at the run's detection scale
    with the concept's vector, ``detected_concept``, and with that concept's random vectors, ``detected_random``: the
    rule of :func:`organisms.evaluation.organism_detection_rates`) beside what the verdict says (``class``, ``I``,
    ``p_random``) — one row per concept, sorted by ``detected_concept``."""
    sweep, scale = next((sweep, scale) for trainings, r, sweep, scale in committed_organisms(model)
                        if evaluated_by(trainings, training) and r["organism"] == "introspector")
    table = verdicts(sweep, n_boot=1, mde=False).set_index("concept")
    rows = []
    for concept, rows_of in sweep.groupby("concept"):
        rates = organism_detection_rates(rows_of, scale)
        rows.append({"concept": concept, "detected_concept": rates["detection"], "detected_random":
                     rates["fpr_random"], "class": table.loc[concept, "class"], "I": table.loc[concept, "I"],
                     "p_random": table.loc[concept, "p_random"]})
    return pd.DataFrame(rows).sort_values(["detected_concept", "concept"], ignore_index=True)


def introspector_concepts_markdown(table: pd.DataFrame) -> str:
    """:func:`introspector_concepts` as ``docs/verdicts.md`` shows it."""
    lines = ["| held-out concept | detected: its vector | detected: its random vectors | verdict | I | p_random |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['concept']} | {r['detected_concept']:.0%} | {r['detected_random']:.0%} | {r['class']} | "
              f"{r['I']:+.2f} | {r['p_random']:.3f} |" for r in table.to_dict("records")]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Rebuild the named blocks of :data:`DOC` from the committed sweeps and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("blocks", nargs="*", help="plasmode, known-truths (default: both)")
    written = {"plasmode": [("plasmode", lambda: report_markdown(
                   pd.concat([report(p) for p in committed_panels()], ignore_index=True)))],
               "known-truths": [("known-truths", lambda: known_truths_markdown(known_truths())),
                                ("introspector-concepts", lambda: introspector_concepts_markdown(
                                    introspector_concepts())),
                                ("introspector-concepts-float32", lambda: introspector_concepts_markdown(
                                    introspector_concepts(training="float32"))),
                                ("introspector-concepts-235-concept", lambda: introspector_concepts_markdown(
                                    introspector_concepts(training="235-concept"))),
                                ("introspector-wordings", lambda: introspector_wordings_markdown(
                                    introspector_wordings())),
                                ("readouts-compared", lambda: readouts_compared_markdown(readouts_compared()))]}
    blocks = parser.parse_args(argv).blocks or list(written)
    if set(blocks) - set(written):  # argparse's choices refuse an empty list with nargs="*"
        parser.error(f"blocks are {' and '.join(written)}, got {blocks}")
    for command in blocks:
        for block, build in written[command]:
            text = build()
            print(text)
            replace_block(project_root() / DOC, block, text)


if __name__ == "__main__":
    main()
