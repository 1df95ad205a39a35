"""The findings of a science run, recomputed from its saved tables (which of the write-up's cases reproduce):
``python -m introspection_utils.findings`` writes ``figures/<model>/findings.md`` and the README's blocks."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from introspection_utils.apps.catalog import EXPERIMENTS
from introspection_utils.apps.findings_organisms import organisms_section
from introspection_utils.core.data import load_list
from introspection_utils.core.paths import atomic_write, figures_dir, project_root, replace_block
from introspection_utils.core.registry import pattern
from introspection_utils.core.results import load_result, saved_table
from introspection_utils.engine.prompts import ANSWER_FORMATS
from introspection_utils.experiments import localization
from introspection_utils.experiments.atlas import atlas_name
from introspection_utils.experiments.sweeps import LEFT_TO_MEASURE
from introspection_utils.experiments.tasks import congruence, forced_choice, strength
from introspection_utils.stats.definitions import MIN_ANSWER_MASS
from introspection_utils.stats.shifts import curve_correlation
from introspection_utils.stats.verdicts import (
    EFFECT_THRESHOLD,
    class_counts,
    describe_verdict,
    null_medians,
    random_null,
)

FINDINGS_MODEL = "qwen2.5-coder-1.5b-instruct"


def delta_rule(row: pd.Series, sign: int) -> tuple[bool, str]:
    """Whether the introspection and control Δ at the effect scale both lie on the ``sign`` side of 0 (+1 above, −1
    below: both intervals exclude 0 there), and the rule with its numbers in words."""
    side = "above" if sign > 0 else "below"
    ok = all((row[f"{k}_ci_low"] > 0) if sign > 0 else (row[f"{k}_ci_high"] < 0) for k in ("introspection", "control"))
    words = (f"rule: both Δ's intervals {side} 0 at scale {row['effect_scale']:g} — introspection Δ "
             f"{row['introspection_delta']:+.2f} [{row['introspection_ci_low']:+.2f}, "
             f"{row['introspection_ci_high']:+.2f}], control Δ {row['control_delta']:+.2f} "
             f"[{row['control_ci_low']:+.2f}, {row['control_ci_high']:+.2f}]")
    return ok, words


def claims(atlas: pd.DataFrame, sweep: pd.DataFrame, interference: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per write-up claim: ``claim, concepts, evidence, reproduces`` ("yes", "no" or "not measured")."""
    by = atlas.set_index("concept")
    rows = []

    def add(claim: str, concepts: str, evidence: str, ok: bool | None) -> None:
        rows.append({"claim": claim, "concepts": concepts, "evidence": evidence,
                     "reproduces": "not measured" if ok is None else ("yes" if ok else "no")})

    def case(claim: str, concept: str, wanted: set[str]) -> None:
        if concept not in by.index:
            return add(claim, concept, "not in the atlas", None)
        row = by.loc[concept]
        rule = f"rule: class {' or '.join(sorted(wanted))}; "
        add(claim, concept, rule + describe_verdict(row, brief=True), row["class"] in wanted)

    def both(claim: str, concept: str, sign: int) -> None:
        """A claim about the two Δ's: reproduced when the introspection and the control Δ at the effect scale both
        have intervals on the claimed side of 0 (the numbers the cell shows)."""
        if concept not in by.index:
            return add(claim, concept, "not in the atlas", None)
        ok, words = delta_rule(by.loc[concept], sign)
        add(claim, concept, words + "; " + describe_verdict(by.loc[concept], brief=True), ok)

    case("a clean, introspection-specific separation ('sandwich')", "Sandwich", {"introspection-specific"})
    both("a muddy case: both questions shift together ('water')", "Water", +1)
    both("safety suppression: both fall below baseline ('bomb')", "Bomb", -1)
    if "Confusion" in by.index:
        row = by.loc["Confusion"]
        r = curve_correlation(interference, "Confusion") if interference is not None else float("nan")
        sign = 1 if row["control_delta"] >= 0 else -1
        together, words = delta_rule(row, sign)
        correlation = f"; curves correlate r = {r:+.2f} over scales (notebook 06)" if not np.isnan(r) else ""
        add("'confusion': introspection and control move together", "Confusion",
            words.replace("rule: both", "rule: both (the control's direction)") + "; "
            + describe_verdict(row, brief=True) + correlation, together)
    case("the introspection question alone lifts ('logic', Gemma-2-27B)", "Logic", {"introspection-specific"})
    paper = [c for c in load_list("concept_words") if c in by.index]
    if paper:
        sub = by.loc[paper]
        counts = class_counts(sub.reset_index())
        specific = sub.index[sub["class"] == "introspection-specific"].tolist()
        add("some of the paper's 50 concepts separate, others are a yes-bias", f"{len(paper)} paper concepts",
            ", ".join(f"{n} {c}" for c, n in counts.items() if n) + (f"; specific: {', '.join(specific)}"
                                                                     if specific else ""),
            bool(specific) and counts["shared yes-shift"] > 0)
    null = random_null(sweep)
    randoms = null[null["vector_kind"] == "random"]
    medians = null_medians(null)
    beat = int(medians["beat_I"]) if len(randoms) else 0
    add("concept vectors act more strongly than random vectors of the same norm", f"{len(randoms)} random vectors",
        f"I beyond the random vectors' prediction: random vectors (out of sample) median {medians['random_I']:+.2f} "
        f"(largest "
        f"{randoms['statistic'].max():+.2f}), concepts median {medians['concept_I']:+.2f}; {beat} of "
        f"{int(medians['n_concepts'])} concepts exceed every random vector on I. The contrast S: random median "
        f"{medians['random_S']:+.2f}, concepts {medians['concept_S']:+.2f}, {int(medians['beat_S'])} above every "
        f"random vector; {int((randoms['shift'] >= EFFECT_THRESHOLD).sum())} random vectors lift the introspection "
        f"question ≥ {EFFECT_THRESHOLD:g} logit more than the controls",
        beat > 0)
    low = int(atlas["low_mass"].sum())
    add("a 'yes' is the model's answer (answer mass)", f"{len(atlas)} concepts",
        f"median P(yes)+P(no) at the largest scale {atlas['answer_mass'].median():.2f}; {low} of {len(atlas)} below "
        f"{MIN_ANSWER_MASS} (there yes − no orders two unlikely tokens); without injection "
        f"{atlas['baseline_answer_mass'].median():.2f}", low == 0)
    return pd.DataFrame(rows)


def claims_markdown(table: pd.DataFrame, model: str, atlas: pd.DataFrame) -> str:
    """The claims as a Markdown table, headed by the run it comes from."""
    layer = ", ".join(map(str, sorted(atlas["layer"].unique())))
    head = (f"From `make findings` on **{model}** (the atlas of notebook 11: {len(atlas)} concepts at layer {layer}, "
            f"{int(atlas['n_wordings'].iloc[0])} introspection wordings, {int(atlas['n_controls'].iloc[0])} balanced "
            f"controls, {int(atlas['n_random'].iloc[0])} pooled random vectors; written by "
            f"`python -m introspection_utils.findings`):")
    lines = [head, "", "| write-up case | concepts | what the numbers say | reproduces |", "|---|---|---|---|"]
    lines += [f"| {r.claim} | {r.concepts} | {r.evidence} | {r.reproduces} |" for r in table.itertuples()]
    return "\n".join(lines)


def format_rows(results: Path) -> pd.DataFrame:
    """The atlas under each answer format that was run (``atlas.csv``, ``atlas_binary.csv``, ``atlas_prefill.csv``
    in ``results``): one row per format with the class counts, the medians of max-over-scales I and S for the
    concept and the random vectors (:func:`verdicts.null_medians`), and the answer mass with and without injection
    behind them."""
    rows = []
    for answer_format in ANSWER_FORMATS:
        name = atlas_name(answer_format)
        if not ((results / f"{name}.csv").is_file() and (results / f"{name}_sweep.csv").is_file()):
            continue
        atlas = pd.read_csv(results / f"{name}.csv")
        medians = null_medians(random_null(load_result(results / f"{name}_sweep.csv").df))
        counts = class_counts(atlas)
        rows.append({"answer_format": answer_format, "concepts": len(atlas),
                     "introspection_specific": int(counts["introspection-specific"]),
                     "classes": ", ".join(f"{n} {c}" for c, n in counts.items() if n),
                     **{k: medians[k] for k in ("random_I", "concept_I", "random_S", "concept_S", "beat_I")},
                     "answer_mass": float(atlas["answer_mass"].median()),
                     "baseline_answer_mass": float(atlas["baseline_answer_mass"].median()),
                     "low_mass": int(atlas["low_mass"].sum())})
    return pd.DataFrame(rows)


def formats_markdown(rows: pd.DataFrame) -> str:
    """:func:`format_rows` as a Markdown section: the verdict per answer format with the answer mass behind it."""
    lines = ["## The atlas by answer format", "",
             "The same atlas (concepts, scales, wordings, controls, random vectors) asked in each answer format "
             "(`prompts.ANSWER_FORMATS`: the paper's open turn, a binary instruction on every question, a prefilled "
             "\"The answer is\"). I is the wordings' effect beyond what the random vectors predict from the controls "
             "(logits at the largest scale; a random vector's, out of sample, sits near 0), S the contrast.", "",
             "| format | concepts | introspection-specific | classes | random median I | concept median I | "
             "random median S | concept median S | concepts above every random I | answer mass (no injection) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.answer_format} | {r.concepts} | {r.introspection_specific} | {r.classes} | {r.random_I:+.2f} | "
              f"{r.concept_I:+.2f} | {r.random_S:+.2f} | {r.concept_S:+.2f} | {int(r.beat_I)} | "
              f"{r.answer_mass:.2f} ({r.baseline_answer_mass:.2f}); {r.low_mass} below {MIN_ANSWER_MASS} |"
              for r in rows.itertuples()]
    return "\n".join(lines)


def task_rows(results: Path) -> pd.DataFrame:
    """Notebook 13's tasks (a yes-bias cannot score them) from their saved tables in ``results``: ``task, evidence``
    (the notebook's own reading) and ``found`` ("yes"/"no": beyond chance and every null it was run against, by the
    task's own rule in :mod:`tasks` / :mod:`localization`)."""
    rows = []
    for name, title, summarise, describe, found in (
            ("forced_choice", "forced choice among concepts", forced_choice.forced_choice_summary,
             forced_choice.describe_forced_choice, forced_choice.forced_choice_found),
            ("congruence", "named-concept congruence", congruence.congruence_summary, congruence.describe_congruence,
             congruence.congruence_found),
            ("strength_comparison", "which injection was stronger", strength.strength_summary,
             strength.describe_strength,
             strength.strength_found)):
        if (results / f"{name}.csv").is_file():
            summary = summarise(load_result(results / name).df)
            rows.append({"task": title, "evidence": describe(summary), "found": "yes" if found(summary) else "no"})
    if (results / "localization_13.csv").is_file():
        result = load_result(results / "localization_13")
        rows.append({"task": "which sentence carried the injection", "evidence": localization.reading(result),
                     "found": "yes" if localization.localized(result) else "no"})
    return pd.DataFrame(rows, columns=["task", "evidence", "found"])


def tasks_markdown(rows: pd.DataFrame) -> str:
    """:func:`task_rows` as a Markdown section."""
    lines = ["## Tasks a yes-bias cannot score (notebook 13)", "",
             "A uniform push of the logits towards \"yes\" scores nothing here: the model names a concept, a "
             "sentence or the stronger of two injections. *Found*: beyond chance and every null it was run against.",
             "", "| task | what the numbers say | found |", "|---|---|---|"]
    lines += [f"| {r.task} | {r.evidence} | {r.found} |" for r in rows.itertuples()]
    return "\n".join(lines)


def _series() -> dict[str, tuple[str, Callable[[Path], list[str]]]]:
    """notebook → (title, its readings from the tables it saved in a results folder): the registry's entries that
    have a findings reader, in series order."""
    return {e.number: (e.title, e.findings) for e in EXPERIMENTS if e.findings is not None}


SERIES = _series()


def series(model: str = FINDINGS_MODEL) -> list[tuple[str, str, list[str], list[str]]]:
    """Each notebook's readings, recomputed from its saved tables under ``figures/<model>/results/`` with the
    notebook's own reading functions: ``(notebook, title, figures, readings)`` for every notebook that left
    tables there, in series order."""
    folder = figures_dir(model)
    out = []
    for notebook, (title, read) in SERIES.items():
        texts = read(folder / "results")
        if texts:
            figures = sorted({p.name for name in EXPERIMENTS.by_number(notebook).figures
                              for p in folder.glob(f"{pattern(name)}.png")})
            out.append((notebook, title, figures, texts))
    return out


def wall_times(model: str = FINDINGS_MODEL) -> dict[str, float]:
    """Each notebook's wall time in seconds from the run's ``timings.csv``, by two-digit prefix."""
    path = figures_dir(model) / "timings.csv"
    if not path.is_file():
        return {}
    rows = pd.read_csv(path, dtype={"notebook": str})
    return {row.notebook[:2]: float(row.seconds) for row in rows.itertuples()
            if row.notebook.count(".") == 1}  # a variant's row (11_atlas.binary.ipynb) is not its notebook's time


def resumed_notebooks(folder: Path) -> list[str]:
    """The executed notebooks in ``folder`` whose output says a sweep resumed every question from saved chunks (it
    measured nothing new there: its wall time is not a rerun's from scratch)."""
    return sorted(p.name for p in folder.glob("*.ipynb") if f"; 0 {LEFT_TO_MEASURE}" in p.read_text())


def series_time_markdown(model: str = FINDINGS_MODEL) -> str | None:
    """One sentence on what the series costs to rerun, from the run's ``timings.csv``: the notebooks' (and variants')
    last wall times added up, their dtypes and the load averages at their starts and ends (how busy the machine
    was); None without the file."""
    path = figures_dir(model) / "timings.csv"
    if not path.is_file():
        return None
    rows = pd.read_csv(path, dtype={"notebook": str})
    resumed = sorted(set(resumed_notebooks(path.parent / "notebooks")) & set(rows["notebook"]))
    dtypes = rows["dtype"].fillna("unknown (recorded before the runner kept it)").astype(str)
    by_dtype = ", ".join(f"{(rows.loc[dtypes == d, 'seconds'].sum() / 60):.0f} min in {d} ({int((dtypes == d).sum())})"
                         for d in sorted(dtypes.unique()))
    loads = lambda column: (f"{rows[column].min():.1f}–{rows[column].max():.1f}"  # noqa: E731
                            if column in rows and rows[column].notna().any() else "unknown")
    return (f"Rerunning the series on {model} (`make findings`, {len(rows)} notebooks and variants, each notebook's "
            f"last run in `timings.csv`) took {rows['seconds'].sum() / 60:.0f} min: {by_dtype}; load average "
            f"{loads('load_start')} at their starts, {loads('load_avg')} at their ends. The organisms' training is "
            "not in it when they were loaded from the cache (their own times are in the training table)."
            + (f" In their last run {', '.join(resumed)} found a sweep already measured and resumed it, so their "
               "times are not a rerun's from scratch." if resumed else ""))


def notebooks_markdown(sections: list[tuple[str, str, list[str], list[str]]], seconds: dict[str, float]) -> str:
    """The readings as Markdown, one section per notebook with its figures (paths relative to the model folder)
    and its wall time in the last run (``seconds``, by notebook prefix)."""
    lines = ["## Notebook by notebook", "",
             "Each notebook's reading, recomputed from its saved tables (`results/`) by the function the notebook "
             "prints it with; the executed notebooks are under `notebooks/`. Wall times are those of the last run "
             "(`timings.csv`; a notebook that finds its sweep saved or its SAE cached resumes from it, and a busy "
             "machine is slower)."]
    for notebook, title, figures, texts in sections:
        took = f" ({seconds[notebook]:.0f} s)" if notebook in seconds else ""
        lines += ["", f"### {notebook} · {title}{took}", ""]
        lines += [f"![{notebook} {title}]({name})" for name in figures] + ([""] if figures else [])
        lines += [f"- {text}" for text in texts]
    return "\n".join(lines)


def agreement_markdown(model: str = FINDINGS_MODEL) -> str | None:
    """Notebook 12's attribution-patching vs real-patching agreement on ``model``, one sentence per concept."""
    path = figures_dir(model) / "results" / "mechanisms_agreement.csv"
    if not path.is_file():
        return None
    rows = pd.read_csv(path)
    per = "; ".join(f"{r.concept} Pearson r = {r.pearson:.3f}, Spearman ρ = {r.spearman:.3f} (n = {r.n})"
                    for r in rows.itertuples())
    first = rows.iloc[0]
    return (f"On **{model}** (`make findings`, notebook 12: injected at layer {int(first['layer'])}, scale "
            f"{first['scale']:g}, {int(first['n_controls'])} control questions; every attention and MLP output above "
            f"the injection layer, both directions, at the answer position): {per}. Written by "
            f"`python -m introspection_utils.findings`.")


def render_findings(model: str = FINDINGS_MODEL) -> tuple[str, str, str | None]:
    """``(findings.md, the README's claims table, the README's agreement sentence or None)`` computed from
    ``figures/<model>/results/``."""
    results = figures_dir(model) / "results"
    if not (results / "atlas.csv").is_file():
        raise FileNotFoundError(f"{results / 'atlas.csv'} is missing: run `make findings` first")
    atlas = pd.read_csv(results / "atlas.csv")
    sweep = load_result(results / "atlas_sweep.csv").df
    inter = saved_table(results / "interference_scale_sweep.csv")
    formats, task_table = format_rows(results), task_rows(results)
    organisms = organisms_section(results)
    table = (claims_markdown(claims(atlas, sweep, inter), model, atlas)
             + ("\n\n" + formats_markdown(formats) if len(formats) else "")
             + ("\n\n" + tasks_markdown(task_table) if len(task_table) else "")
             + ("\n\n" + organisms if organisms else "")
             + ("\n\n" + took if (took := series_time_markdown(model)) else ""))
    sections = series(model)
    document = table + ("\n\n" + notebooks_markdown(sections, wall_times(model)) if sections else "") + "\n"
    return document, table, agreement_markdown(model)


def write_findings(model: str = FINDINGS_MODEL, *, readme: Path | None = None) -> Path:
    """Compute the findings of ``model`` from ``figures/<model>/results/`` and write ``findings.md`` (and the
    README blocks when ``readme`` is given). Returns the Markdown file's path."""
    document, table, agreement = render_findings(model)
    path = atomic_write(figures_dir(model) / "findings.md", document)
    if readme is not None:
        replace_block(readme, "findings", table)
        if agreement is not None:
            replace_block(readme, "agreement", agreement)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=FINDINGS_MODEL)
    args = parser.parse_args()
    print(write_findings(args.model, readme=project_root() / "README.md").read_text())
