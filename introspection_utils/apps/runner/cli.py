"""Run the notebook series headless with papermill.

    make demo                                                     # the whole series on the embedded model
    .venv/bin/python -m introspection_utils.run --notebooks 02 04 -p scales "[0,2,4,8]"   # a run of its own
    .venv/bin/python -m introspection_utils.run --notebooks 02 --tag wide -p scales "[0,4,8,16,32]"
    .venv/bin/python -m introspection_utils.run --findings data/findings/qwen2.5-coder-1.5b-instruct.toml
    .venv/bin/python -m introspection_utils.run --strip           # remove outputs from notebooks/*.ipynb
    .venv/bin/python -m introspection_utils.run --notebooks 11 --executor ray --address auto   # the atlas on Ray

Where things go. The *reference run* — the embedded model with every notebook's defaults, no ``-p`` and no
``--tag`` (``make demo``) — writes the executed notebooks and ``timings.csv`` to ``<output>/<model>/`` and the
committed figures to ``figures/<model>/``. Every other run (any ``-p``, another model, a ``--tag``) is a run of its
own and never touches a committed file: executed notebooks, ``timings.csv``, ``figures/`` and ``results/`` all go
to ``<output>/<model>/<tag>/`` (``--tag NAME``; else ``p-<hash of the parameters>``, or ``default`` for another
model at its defaults), with ``parameters.json`` saying what was set. ``--findings FILE`` (``make findings``) runs
the series with a TOML file's parameters and writes under ``figures/<model>/``.

Before any kernel starts, everything is checked: each ``-p`` value is a Python/JSON literal (a bare word is a
string; ``"[0,2,"`` is an error naming the parameter), every parameter is declared by a notebook and has the type of
its default, the model name resolves (``load_model``'s names, with "did you mean"), the notebooks exist. A series
(``--all``, ``--findings``) skips notebooks already done with the same parameters, notebook and package code
(``--force`` reruns them); each notebook's wall time is written to ``timings.csv`` as it finishes, with the load
average. Ctrl-C stops with one line naming what was saved and the command that resumes.

This module is the command line and what it writes into documents (the timings table, the registry's list and
notebook table); the checks and plans are in ``run_checks``, the execution in ``run_execute``, the findings run in
``run_findings``, and every runner name is importable from here.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from introspection_utils.apps.runner.checks import (
    EXECUTION,
    FIGURES_DIR,
    FULL_SIZE,
    NOTEBOOKS_DIR,
    PACKAGE_DIR,
    ROOT,
    RUNNER_PLACED,
    NotebookError,
    Placement,
    _default_model,
    _model_cached,
    check_tag,
    declared_parameters,
    default_threads,
    notebooks,
    parse_value,
    placement,
    plan_runs,
    read_full_size,
    resolve_model,
    run_key,
)
from introspection_utils.apps.runner.execute import (
    DEFAULT_CELL_TIMEOUT,
    KERNEL_STARTUP,
    TIMINGS_HEADER,
    Interrupted,
    RunRecord,
    run_notebook,
    run_notebooks,
    run_series,
    variant_name,
    write_series_time,
    write_timings,
)
from introspection_utils.apps.runner.findings import read_findings, run_findings, split_variants
from introspection_utils.core.paths import model_name

# The runner's names, wherever they are defined (``run_checks``, ``run_execute``, ``run_findings``, here).
__all__ = [
    "DEFAULT_CELL_TIMEOUT", "EXECUTION", "FIGURES_DIR", "FULL_SIZE", "KERNEL_STARTUP", "NOTEBOOKS_DIR", "PACKAGE_DIR",
    "ROOT", "RUNNER_PLACED", "TIMINGS_HEADER", "Interrupted", "NotebookError", "Placement", "RunRecord", "check_tag",
    "declared_parameters", "default_threads", "guide_markdown", "listing", "main", "notebooks", "parse_value",
    "placement", "plan_runs", "read_findings", "read_full_size", "resolve_model", "run_findings", "run_key",
    "run_notebook", "run_notebooks", "run_series", "series_markdown", "split_variants", "strip_outputs",
    "timings_markdown", "variant_name", "write_series_time", "write_timings",
]


def series_markdown(path: Path) -> str:
    """``series.json`` (:func:`write_series_time`) as one line: the series' wall time cold and warm."""
    record = json.loads(Path(path).read_text())
    parts = []
    for kind, what in (("cold", "cold (empty cache: the model converted, every vector computed)"),
                       ("warm", "warm (cache filled, `FORCE=1`)")):
        if kind in record:
            r = record[kind]
            parts.append(f"{r['seconds'] / 60:.1f} min {what}, {r['notebooks']} notebooks {r['jobs']} at a time with "
                         f"{r['threads']} thread(s) each on {r['cpus']} CPU(s), load average {r['load_avg']} at "
                         "the end")
    if not parts:
        raise ValueError(f"{path} has no series time: run `make demo` first")
    return "`make demo` took " + "; ".join(parts) + "."


def timings_markdown(path: Path) -> str:
    """A ``timings.csv`` as the notebook guide's table (``docs/notebooks.md``): each notebook's wall time, the total,
    the threads and the load average when each finished (so a reader can plan by it and see how busy the machine
    was)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} has no rows: run `make demo` first")
    total = sum(float(r["seconds"]) for r in rows)
    loads = [float(r["load_avg"]) for r in rows if r.get("load_avg")]
    threads = sorted({r.get("omp_num_threads") or "?" for r in rows})
    cpus = sorted({r.get("cpus") or "?" for r in rows})
    lines = ["| notebook | wall time | load average at its end |", "|---|---|---|"]
    lines += [f"| `{r['notebook']}` | {float(r['seconds']):.0f} s | {r.get('load_avg') or '?'} |" for r in rows]
    series = path.parent / "series.json"
    lines += ["", series_markdown(series)] if series.is_file() else []
    lines += ["", f"Their times add up to {total / 60:.1f} min for {len(rows)} notebooks of `{rows[0]['model']}` on "
                  f"{', '.join(cpus)} CPU(s), {', '.join(threads)} thread(s) per kernel"
              + (f", load average {min(loads):.1f}–{max(loads):.1f}" if loads else "")
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
    figures = Path(os.path.relpath(FIGURES_DIR / model_name(figures_model or _default_model()), here)).as_posix()
    lines = ["| notebook | the question it answers | figure (embedded 135M model — pipeline demo only) |",
             "|---|---|---|"]
    lines += [f"| [`{e.notebook}`]({notebooks_dir}/{e.notebook}.ipynb) | {e.question} | "
              f'<img src="{figures}/{e.guide_figure}.png" width="260" alt="{e.alt}"> |' for e in EXPERIMENTS]
    return "\n".join(lines)



def strip_outputs(paths: Sequence[Path]) -> list[Path]:
    """Remove outputs and execution counts from notebooks in place; returns those that changed."""
    import nbformat

    changed = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        dirty = False
        for cell in nb.cells:
            if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
                cell.outputs, cell.execution_count, dirty = [], None, True
            for key in ("execution", "papermill"):
                if key in cell.metadata:
                    del cell.metadata[key]
                    dirty = True
        if dirty:
            nbformat.write(nb, path)
            changed.append(path)
    return changed



# ------------------------------------------------------------------ the command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m introspection_utils.run", description=__doc__.split("\n")[0],
                                     epilog="Details: the module docstring (python -c 'import "
                                            "introspection_utils.apps.runner.cli as r; help(r)') and the README.")
    parser.add_argument("--model", default=None, help="model id (default: the embedded smollm2-135m-instruct; "
                                                      "with --findings, the file's model)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--notebooks", nargs="+", metavar="NN", help="notebook prefixes, e.g. 02 04")
    which.add_argument("--all", action="store_true", help="the whole series (skips notebooks already done with the "
                                                          "same parameters and code; --force reruns them)")
    which.add_argument("--findings", type=Path, metavar="FILE",
                       help="the series with a findings file's parameters, all outputs under figures/<model>/ "
                            "(--notebooks-only NN ... for a part of it; -p and --model override the file)")
    which.add_argument("--strip", action="store_true", help="strip outputs from notebooks/*.ipynb and exit")
    which.add_argument("--write-times", type=Path, nargs="+", metavar="FILE",
                       help="put runs/<model>/timings.csv and series.json (the last make demo) into each FILE's "
                            "timings / demo_time block (docs/notebooks.md README.md) and exit")
    which.add_argument("--list", action="store_true",
                       help="list the series from the experiment registry (what each notebook computes, reads, "
                            "draws and saves, and its findings table) and exit")
    which.add_argument("--write-guide", type=Path, metavar="FILE",
                       help="put the registry's notebook table into FILE's notebooks block (docs/notebooks.md) "
                            "and exit")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a notebook parameter (Python/JSON literal); repeatable; makes the run one of its own "
                             "(runs/<model>/<tag or p-hash>/), never touching committed figures")
    parser.add_argument("--tag", default=None, help="name this run's folder: runs/<model>/<tag>/")
    parser.add_argument("--output", type=Path, default=None,
                        help="where executed notebooks go (runs/); with --findings, the root of <model>/ (figures/)")
    parser.add_argument("--notebooks-only", nargs="+", metavar="NN", default=None,
                        help="with --findings: run only these notebooks (11.binary: only that variant)")
    parser.add_argument("--full", action="store_true",
                        help="the full-size runs of the notebooks that make demo runs at demo size ("
                             "data/full_size.toml), into runs/<model>/full/ (or --tag)")
    parser.add_argument("--force", action="store_true", help="rerun notebooks already done with the same parameters")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per kernel (sets OMP_NUM_THREADS); default: the CPUs free now "
                             "(CPUs minus the load average, at least 1)")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="notebooks run at once, each in its own kernel (with 1 thread each unless --threads); "
                             "default: for --all on an embedded model the CPUs free now, else 1")
    parser.add_argument("--cell-timeout", type=int, default=DEFAULT_CELL_TIMEOUT, metavar="SECONDS",
                        help=f"the longest one cell may run (default {DEFAULT_CELL_TIMEOUT}; 0: no limit)")
    parser.add_argument("--executor", choices=("local", "ray"), default=None,
                        help="where the sweeps of the notebooks that declare `executor` (02, 03, 11) run: here "
                             "(local) or on the actors of a Ray cluster (ray; the `ray` extra)")
    parser.add_argument("--address", default=None, metavar="auto|HOST:PORT",
                        help="with --executor ray: the cluster to join (default: a new local one)")
    return parser



def _resume_command(argv: Sequence[str], err: Interrupted, series: bool) -> str:
    args = list(argv)
    if not series and "--notebooks" in args and err.current:
        i = args.index("--notebooks")
        j = i + 1
        while j < len(args) and not args[j].startswith("-"):
            j += 1
        chosen = args[i + 1:j]
        finished = {r.notebook[:2] for r in err.done}
        args[i + 1:j] = [n for n in chosen if str(n)[:2] not in finished] or chosen
    python = os.path.relpath(sys.executable) if Path(sys.executable).is_relative_to(Path.cwd()) else "python"
    return f"{python} -m introspection_utils.run " + shlex.join(args)



def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.strip:
        for path in strip_outputs(notebooks()):
            print(f"stripped {path}")
        return 0
    if args.list:
        print(listing())
        return 0
    if args.write_guide:
        from introspection_utils.core.paths import replace_block

        replace_block(args.write_guide, "notebooks", guide_markdown(args.write_guide))
        print(f"wrote the notebook table of the experiment registry into {args.write_guide}")
        return 0
    if args.write_times:
        from introspection_utils.core.paths import replace_block

        timings = (args.output or Path("runs")) / model_name(args.model or _default_model()) / "timings.csv"
        if not timings.is_file():
            print(f"error: {timings} does not exist: run `make demo` first", file=sys.stderr)
            return 1
        for path in args.write_times:  # docs/notebooks.md's table; README.md's one line (its demo_time block)
            text = path.read_text(encoding="utf-8")
            if "<!-- timings:start -->" in text:
                replace_block(path, "timings", timings_markdown(timings.resolve()))
            if "<!-- demo_time:start -->" in text:
                replace_block(path, "demo_time", series_markdown(timings.parent / "series.json"))
            print(f"wrote the timings of {timings} into {path}")
        return 0
    if args.address is not None and args.executor != "ray":
        parser.error("--address needs --executor ray")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.cell_timeout < 0:
        parser.error(f"--cell-timeout must be >= 0 seconds, got {args.cell_timeout}")
    if args.notebooks_only and not args.findings:
        parser.error("--notebooks-only goes with --findings (use --notebooks NN ... otherwise)")
    started = time.perf_counter()  # the series' wall time counts this process's own start-up too
    early = None  # warm kernels started before the checks (make demo on the default model)
    try:
        check_tag(args.tag)
        params = {name: parse_value(value, name) for name, value in args.parameter}
        if args.executor is not None:
            params["executor"] = args.executor
        if args.address is not None:
            params["ray_address"] = args.address
        model = params.pop("model", args.model)  # -p model ID works as well as --model ID
        model = None if model is None else str(model)
        # The small embedded models' series (make demo): side by side, in warm kernels (start-up is most of a
        # demo-sized notebook), one thread per kernel so that its figures are the same floats whatever the load (a
        # kernel's thread count changes the last bits, and so the committed PNGs). For the default model the
        # kernels start first, so that their imports overlap this process's own (checks, the model's name).
        if args.all and not args.findings and model is None:
            from introspection_utils.apps.runner.execute import KERNEL_ARGUMENTS
            from introspection_utils.apps.runner.kernels import KernelPool

            early_jobs = args.jobs or default_threads()
            if args.threads is not None or "OMP_NUM_THREADS" not in os.environ:
                os.environ["OMP_NUM_THREADS"] = str(args.threads or 1)  # before the kernels start: they inherit it
            early = KernelPool(args.kernel or "python3", KERNEL_ARGUMENTS, str(NOTEBOOKS_DIR))
            early.prestart(early_jobs)
        from introspection_utils.apps.runner.kernels import default_jobs
        from introspection_utils.models.embedded import EMBEDDED, QWEN_MODEL

        small = tuple(name for name in EMBEDDED if name != QWEN_MODEL)  # the 135M/270M models, not the 1.5B
        series_model = resolve_model(model or _default_model())
        small_series = bool(args.all) and series_model in small
        jobs = args.jobs or (early_jobs if early else
                             default_jobs(series_model, small, default_threads()) if small_series else 1)
        if args.threads is not None or "OMP_NUM_THREADS" not in os.environ:
            threads = args.threads or (1 if jobs > 1 or small_series else default_threads())
            os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the kernels papermill starts
        print(f"{jobs} notebook(s) at a time, {os.environ.get('OMP_NUM_THREADS')} thread(s) per kernel (CPUs "
              f"{os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; --jobs N / --threads N to choose)",
              flush=True)
        # a complete reference series (make demo) records its wall time, cold or warm, in series.json
        whole = placement(series_model, {k: v for k, v in params.items() if k not in EXECUTION},
                          output=args.output or Path("runs"), tag=args.tag or ("full" if args.full else None),
                          default_model=_default_model())
        cold = not _model_cached(series_model)
        prepare = None
        if cold and jobs > 1 and small_series:  # once, while the kernels start, not once per kernel side by side
            from introspection_utils.models import embedded

            def prepare() -> None:
                print(f"converting {series_model} into the cache once ...", flush=True)
                embedded.converted_dir(series_model)
        os.environ.setdefault("TQDM_MININTERVAL", "2")  # progress lines every 2 s, not every trial
        if args.findings:
            if args.tag or args.full:
                raise ValueError("--tag and --full do not go with --findings (a findings run takes its parameters "
                                 "from its file and writes under figures/<model>/)")
            records = run_findings(args.findings, args.notebooks_only, model=model, parameters=params,
                                   root=args.output or FIGURES_DIR, kernel=args.kernel, force=args.force,
                                   timeout=args.cell_timeout, jobs=jobs)
        else:
            per_notebook = read_full_size() if args.full else None
            records = run_series(None if args.all else args.notebooks, model=model, parameters=params,
                                 output=args.output or Path("runs"), kernel=args.kernel,
                                 tag=args.tag or ("full" if args.full else None), per_notebook=per_notebook,
                                 force=args.force, timeout=args.cell_timeout, jobs=jobs,
                                 reuse_kernels=early or small_series, prepare=prepare)
    except Interrupted as err:
        done = f"{len(err.done)} notebook(s) finished" + (f" ({err.folder}/timings.csv)" if err.done else "")
        series = bool(args.all or args.findings)
        print(f"\ninterrupted during {err.current or 'start-up'}: {done}; finished sweeps and checkpoints are kept. "
              f"Resume: {_resume_command(argv, err, series)}", file=sys.stderr)
        return 130
    except (NotebookError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if early is not None:
            early.close()  # run_notebooks closes it when it ran; a refused run never used it
    ran = [r for r in records if not r.skipped]
    total = sum(r.seconds for r in ran)
    skipped = len(records) - len(ran)
    wall = time.perf_counter() - started
    if args.all and whole.reference and ran and not skipped:
        write_series_time(whole.folder / "series.json", cold=cold, seconds=wall, jobs=jobs, notebooks=len(ran))
    print(f"{len(ran)} notebook(s) ran in {wall:.0f} s" + (f" (their own times add up to {total:.0f} s)"
                                                          if jobs > 1 and ran else "")
          + (f" ({skipped} already done, skipped)" if skipped else "")
          + (": " + ", ".join(f"{r.notebook} {r.seconds:.0f} s" for r in ran) if ran else ""))
    return 0



if __name__ == "__main__":
    sys.exit(main())
