"""The findings of a science run, computed from its saved tables: which of the write-up's cases reproduce on a model.

``python -m introspection_utils.findings [MODEL]`` reads ``figures/<model>/results/`` (written by ``make findings``:
the atlas of notebook 11 and the interference sweep of notebook 06), writes ``figures/<model>/findings.md`` and
puts the same table in the README between ``<!-- findings:start -->`` and ``<!-- findings:end -->``. Every number
in it comes from those tables; nothing is typed by hand.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from introspection_utils.data import load_list
from introspection_utils.paths import atomic_write, figures_dir, project_root, replace_block
from introspection_utils.readings import curve_correlation
from introspection_utils.sweeps import load_result
from introspection_utils.verdicts import EFFECT_THRESHOLD, MIN_ANSWER_MASS, class_counts, random_null

FINDINGS_MODEL = "qwen2.5-coder-1.5b-instruct"


def _verdict(row: pd.Series) -> str:
    return (f"{row['class']} (S = {row['shift']:+.2f} at scale {row['peak_scale']:g}, q = {row['q_value']:.2g}; "
            f"at scale {row['effect_scale']:g} introspection Δ {row['introspection_delta']:+.2f}, control Δ "
            f"{row['control_delta']:+.2f}; answer mass {row['answer_mass']:.2f})")


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
        add(claim, concept, _verdict(by.loc[concept]), by.loc[concept, "class"] in wanted)

    case("a clean, introspection-specific separation ('sandwich')", "Sandwich", {"introspection-specific"})
    case("a muddy case: both questions shift together ('water')", "Water", {"shared yes-shift"})
    case("safety suppression: both fall below baseline ('bomb')", "Bomb", {"shared suppression"})
    if "Confusion" in by.index:
        row = by.loc["Confusion"]
        r = curve_correlation(interference, "Confusion") if interference is not None else float("nan")
        together = row["class"] in {"shared yes-shift", "shared suppression"}
        add("'confusion': introspection and control move together", "Confusion",
            _verdict(row) + (f"; curves correlate r = {r:+.2f} over scales (notebook 06)" if not np.isnan(r) else ""),
            together)
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
    randoms = null[null["vector_kind"] == "random"]["statistic"]
    beat = int((atlas["shift"] > randoms.max()).sum()) if len(randoms) else 0
    add("concept vectors act more strongly than random vectors of the same norm", f"{len(randoms)} random vectors",
        f"largest introspection-specific shift of a random vector {randoms.max():+.2f} (median {randoms.median():+.2f}"
        f"); {beat} of {len(atlas)} concepts exceed every random vector; {int((randoms >= EFFECT_THRESHOLD).sum())} "
        f"random vectors lift the introspection question ≥ {EFFECT_THRESHOLD:g} logit more than the controls",
        beat > 0)
    low = int(atlas["low_mass"].sum())
    add("a 'yes' is the model's answer (answer mass)", f"{len(atlas)} concepts",
        f"median P(yes)+P(no) at the peak scale {atlas['answer_mass'].median():.2f}; {low} of {len(atlas)} below "
        f"{MIN_ANSWER_MASS} (there yes − no orders two unlikely tokens); without injection "
        f"{atlas['baseline_answer_mass'].median():.2f}", low == 0)
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, model: str, atlas: pd.DataFrame) -> str:
    """The claims as a Markdown table, headed by the run it comes from."""
    layer = ", ".join(map(str, sorted(atlas["layer"].unique())))
    head = (f"From `make findings` on **{model}** (the atlas of notebook 11: {len(atlas)} concepts at layer {layer}, "
            f"{int(atlas['n_wordings'].iloc[0])} introspection wordings, {int(atlas['n_controls'].iloc[0])} balanced "
            f"controls, {int(atlas['n_random'].iloc[0])} pooled random vectors; written by "
            f"`python -m introspection_utils.findings`):")
    lines = [head, "", "| write-up case | concepts | what the numbers say | reproduces |", "|---|---|---|---|"]
    lines += [f"| {r.claim} | {r.concepts} | {r.evidence} | {r.reproduces} |" for r in table.itertuples()]
    return "\n".join(lines)


def write(model: str = FINDINGS_MODEL, *, readme: Path | None = None) -> Path:
    """Compute the findings of ``model`` from ``figures/<model>/results/`` and write ``findings.md`` (and the
    README block when ``readme`` is given). Returns the Markdown file's path."""
    folder = figures_dir(model)
    results = folder / "results"
    if not (results / "atlas.csv").is_file():
        raise FileNotFoundError(f"{results / 'atlas.csv'} is missing: run `make findings` first")
    atlas = pd.read_csv(results / "atlas.csv")
    sweep = load_result(results / "atlas_sweep.csv").df
    interference = results / "interference_scale_sweep.csv"
    inter = load_result(interference).df if interference.is_file() else None
    text = markdown(claims(atlas, sweep, inter), model, atlas)
    path = atomic_write(folder / "findings.md", text + "\n")
    if readme is not None:
        replace_block(readme, "findings", text)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=FINDINGS_MODEL)
    args = parser.parse_args()
    print(write(args.model, readme=project_root() / "README.md").read_text())
