"""What the runner writes into documents: ``make demo``'s wall time and the timings table (``--write-times``), the
registry's list (``--list``) and the notebook guide's table (``--write-guide``); :mod:`.cli` calls them."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from introspection_utils.apps.runner.checks import FIGURES_DIR, NOTEBOOKS_DIR, default_model
from introspection_utils.core.paths import model_name


def series_markdown(path: Path) -> str:
    """``series.json`` (:func:`write_series_time`) as one line: the series' wall time cold and warm, and how it ran
    (notebooks, jobs, threads, CPUs, the CPU with its bfloat16 instructions where the record has them) — said once
    when both runs share it, after each run when they differ."""
    record = json.loads(Path(path).read_text())
    runs = [(kind, what, record[kind]) for kind, what in (
        ("cold", "cold (empty cache: the model converted, every vector computed)"),
        ("warm", "warm (cache filled, `FORCE=1`)")) if kind in record]
    if not runs:
        raise ValueError(f"{path} has no series time: run `make demo` first")

    def setup(r: dict) -> str:
        cpu = f" ({r['device']}; bf16 instructions: {r['bf16']})" if r.get("device") else ""
        return (f"{r['notebooks']} notebooks {r['jobs']} at a time with {r['threads']} thread(s) each on "
                f"{r['cpus']} CPU(s){cpu}")
    shared = len({setup(r) for _, _, r in runs}) == 1
    parts = [f"{r['seconds'] / 60:.1f} min {what}" + ("" if shared else f", {setup(r)}")
             + f", load average {r['load_avg']} at the end" for _, what, r in runs]
    said_once = f"; {'both ' if len(runs) > 1 else ''}{setup(runs[0][2])}" if shared else ""
    return "`make demo` took " + "; ".join(parts) + said_once + "."


def timings_markdown(path: Path) -> str:
    """A ``timings.csv`` as the notebook guide's table (``docs/notebooks.md``): each notebook's wall time, the dtype
    its model loaded in, the load average when it started and when it finished, then the total, the threads and the
    dtypes (so a reader can plan by it and see how busy the machine was). A row recorded before the runner kept the
    dtype or the starting load shows them as unknown."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} has no rows: run `make demo` first")
    total = sum(float(r["seconds"]) for r in rows)
    loads = [float(r["load_avg"]) for r in rows if r.get("load_avg")]
    threads = sorted({r.get("omp_num_threads") or "?" for r in rows})
    cpus = sorted({r.get("cpus") or "?" for r in rows})
    dtypes = sorted({r.get("dtype") or "unknown" for r in rows})
    lines = ["| notebook | wall time | dtype | load average at its start | at its end |", "|---|---|---|---|---|"]
    lines += [f"| `{r['notebook']}` | {float(r['seconds']):.0f} s | {r.get('dtype') or 'unknown'} | "
              f"{r.get('load_start') or 'unknown'} | {r.get('load_avg') or 'unknown'} |" for r in rows]
    series = path.parent / "series.json"
    lines += ["", series_markdown(series)] if series.is_file() else []
    lines += ["", f"Their times add up to {total / 60:.1f} min for {len(rows)} notebooks of `{rows[0]['model']}` in "
                  f"{', '.join(dtypes)} on {', '.join(cpus)} CPU(s), {', '.join(threads)} thread(s) per kernel"
              + (f", load average {min(loads):.1f}–{max(loads):.1f} at their ends" if loads else "")
              + f"; written from `{path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}` by "
                f"`.venv/bin/python -m introspection_utils.run --write-times docs/notebooks.md README.md`."]
    return "\n".join(lines)



def listing() -> str:
    """The series as the registry holds it (``run --list``): per notebook, what computes it, the functions its
    readings come from, its figures and tables (``{part}``: filled in by the run), and its findings table and
    reader."""
    from introspection_utils.apps.catalog import EXPERIMENTS
    from introspection_utils.core.registry import name_of

    lines = []
    for e in EXPERIMENTS:
        findings = f'findings: ["{e.findings_table}"] parameters; ' + (
            f"readings from its tables by {name_of(e.findings)}" if e.findings else "no section of its own")
        lines += [f"{e.notebook} · {e.title}",
                  f"    computes: {', '.join(e.module_names)}",
                  f"    reads:    {', '.join(e.reading_names)}",
                  f"    figures:  {', '.join(e.figures)}",
                  f"    tables:   {', '.join(e.tables) or '(none)'}",
                  f"    {findings}"]
    return "\n".join(lines)



def guide_markdown(path: Path, figures_model: str | None = None) -> str:
    """The notebook guide's table from the registry, its links relative to ``path`` (the file it goes into, e.g.
    ``docs/notebooks.md``), each row with the figure of the reference run of ``figures_model`` (default: the
    embedded model) that the entry names (``guide_figure``)."""
    from introspection_utils.apps.catalog import EXPERIMENTS

    here = Path(path).resolve().parent
    notebooks_dir = Path(os.path.relpath(NOTEBOOKS_DIR, here)).as_posix()
    figures = Path(os.path.relpath(FIGURES_DIR / model_name(figures_model or default_model()), here)).as_posix()
    lines = ["| notebook | the question it answers | figure (embedded 135M model — pipeline demo only) |",
             "|---|---|---|"]
    lines += [f"| [`{e.notebook}`]({notebooks_dir}/{e.notebook}.ipynb) | {e.question} | "
              f'<img src="{figures}/{e.guide_figure}.png" width="260" alt="{e.alt}"> |' for e in EXPERIMENTS]
    return "\n".join(lines)
