"""Run the notebook series headless with papermill: the command line of ``python -m introspection_utils.run``
(``make demo``, ``make findings``), one function per subcommand."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    check_model,
    check_tag,
    declared_parameters,
    default_model,
    default_threads,
    model_cached,
    notebooks,
    parse_value,
    placement,
    plan_runs,
    read_full_size,
    resolve_model,
    run_key,
)
from introspection_utils.apps.runner.documents import guide_markdown, listing, series_markdown, timings_markdown
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
    "ROOT", "RUNNER_PLACED", "TIMINGS_HEADER", "Interrupted", "NotebookError", "Placement", "RunRecord", "cell_timeout",
    "check_tag",
    "declared_parameters", "default_threads", "guide_markdown", "listing", "main", "notebooks", "parse_value",
    "placement", "plan_runs", "read_findings", "read_full_size", "resolve_model", "run_findings", "run_key",
    "run_notebook", "run_notebooks", "run_series", "series_markdown", "split_variants", "strip_outputs",
    "timings_markdown", "variant_name", "write_series_time", "write_timings",
]


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
                                     epilog="Details: docs/notebooks.md (the runner: where a run writes, "
                                            "-p, --tag, resume) and docs/design.md (\"Module notes\").")
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
    parser.add_argument("--cell-timeout", type=int, default=None, metavar="SECONDS",
                        help=f"the longest one cell may run (default {DEFAULT_CELL_TIMEOUT}, none with --findings: "
                             "its full-size cells can run for hours on a CPU; 0: no limit)")
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



def _strip(args: argparse.Namespace) -> int:
    for path in strip_outputs(notebooks()):
        print(f"stripped {path}")
    return 0


def _list(args: argparse.Namespace) -> int:
    print(listing())
    return 0


def _write_guide(args: argparse.Namespace) -> int:
    from introspection_utils.core.paths import replace_block

    replace_block(args.write_guide, "notebooks", guide_markdown(args.write_guide))
    print(f"wrote the notebook table of the experiment registry into {args.write_guide}")
    return 0


def _write_times(args: argparse.Namespace) -> int:
    from introspection_utils.core.paths import replace_block

    timings = (args.output or Path("runs")) / model_name(args.model or default_model()) / "timings.csv"
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


def _check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The flags that only make sense together, refused before anything starts (``parser.error`` exits 2)."""
    if args.address is not None and args.executor != "ray":
        parser.error("--address needs --executor ray")
    for flag, value, least in (("--threads", args.threads, 1), ("--jobs", args.jobs, 1),
                               ("--cell-timeout", args.cell_timeout, 0)):
        if value is not None and value < least:
            parser.error(f"{flag} must be >= {least}, got {value}")
    if args.notebooks_only and not args.findings:
        parser.error("--notebooks-only goes with --findings (use --notebooks NN ... otherwise)")
    if args.findings and (args.tag or args.full):
        parser.error("--tag and --full do not go with --findings (a findings run takes its parameters from its file "
                     "and writes under figures/<model>/)")


@dataclass
class ExecutionPlan:
    """How a run of the series executes, decided before any notebook runs: the model as typed (``None``: the
    default, or the findings file's) and as it loads, the parameters from ``-p``, how many notebooks at once and how
    many threads each, whether the small-model series runs side by side in warm kernels (``pool``, started early
    for the default model) and whether its model still has to be converted (``cold``)."""

    model: str | None
    series_model: str
    parameters: dict[str, Any]
    jobs: int
    small_series: bool
    cold: bool
    whole: Placement
    pool: Any = None  # a KernelPool started before the checks of the default model's series, or None
    prepare: Callable[[], None] | None = None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()  # run_notebooks closes it when it ran; a refused run never used it


def plan_execution(args: argparse.Namespace) -> ExecutionPlan:
    """Parameters parsed and checked (values, the model, its layers) before any kernel starts, then the job and
    thread policy: the small embedded models' series (make demo) runs side by side in warm kernels, one thread per
    kernel, so that its figures are the same floats whatever the load (a kernel's thread count changes the last
    bits, and so the committed PNGs); otherwise one notebook at a time with the CPUs free now."""
    from introspection_utils.apps.runner.kernels import default_jobs
    from introspection_utils.models.embedded import EMBEDDED, QWEN_MODEL

    check_tag(args.tag)
    params = {name: parse_value(value, name) for name, value in args.parameter}
    if args.executor is not None:
        params["executor"] = args.executor
    if args.address is not None:
        params["ray_address"] = args.address
    model = params.pop("model", args.model)  # -p model ID works as well as --model ID
    model = None if model is None else str(model)
    if model is not None or params:
        check_model(model or default_model(), params)  # before the kernels below start
    pool, early_jobs = None, None
    if args.all and not args.findings and model is None:  # the kernels' imports overlap this process's own
        from introspection_utils.apps.runner.execute import KERNEL_ARGUMENTS
        from introspection_utils.apps.runner.kernels import KernelPool

        early_jobs = args.jobs or default_threads()
        if args.threads is not None or "OMP_NUM_THREADS" not in os.environ:
            os.environ["OMP_NUM_THREADS"] = str(args.threads or 1)  # before the kernels start: they inherit it
        pool = KernelPool(args.kernel or "python3", KERNEL_ARGUMENTS, str(NOTEBOOKS_DIR))
        pool.prestart(early_jobs)
    small = tuple(name for name in EMBEDDED if name != QWEN_MODEL)  # the 135M/270M models, not the 1.5B
    series_model = resolve_model(model or default_model())
    small_series = bool(args.all) and series_model in small
    jobs = args.jobs or early_jobs or (default_jobs(series_model, small, default_threads()) if small_series else 1)
    if args.threads is not None or "OMP_NUM_THREADS" not in os.environ:
        threads = args.threads or (1 if jobs > 1 or small_series else default_threads())
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the kernels papermill starts
    whole = placement(series_model, {k: v for k, v in params.items() if k not in EXECUTION},
                      output=args.output or Path("runs"), tag=args.tag or ("full" if args.full else None),
                      default_model=default_model())
    cold = not model_cached(series_model)
    prepare = None
    if cold and jobs > 1 and small_series:  # once, while the kernels start, not once per kernel side by side
        from introspection_utils.models import embedded

        def prepare() -> None:
            print(f"converting {series_model} into the cache once ...", flush=True)
            embedded.converted_dir(series_model)
    return ExecutionPlan(model, series_model, params, jobs, small_series, cold, whole, pool, prepare)


def cell_timeout(args: argparse.Namespace) -> int | None:
    """The seconds one cell may run (``None``: no limit): ``--cell-timeout`` as given (0: none), else
    :data:`DEFAULT_CELL_TIMEOUT` for a series and no limit for a findings run, whose full-size cells (notebook 14's
    evaluation in float32 runs for hours on a small CPU) would otherwise be stopped with their work half done."""
    if args.cell_timeout is not None:
        return args.cell_timeout or None
    return None if args.findings else DEFAULT_CELL_TIMEOUT


def _execute(args: argparse.Namespace, plan: ExecutionPlan) -> list[RunRecord]:
    print(f"{plan.jobs} notebook(s) at a time, {os.environ.get('OMP_NUM_THREADS')} thread(s) per kernel (CPUs "
          f"{os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; --jobs N / --threads N to choose)", flush=True)
    os.environ.setdefault("TQDM_MININTERVAL", "2")  # progress lines every 2 s, not every trial
    if args.findings:
        return run_findings(args.findings, args.notebooks_only, model=plan.model, parameters=plan.parameters,
                            root=args.output or FIGURES_DIR, kernel=args.kernel, force=args.force,
                            timeout=cell_timeout(args), jobs=plan.jobs)
    return run_series(None if args.all else args.notebooks, model=plan.model, parameters=plan.parameters,
                      output=args.output or Path("runs"), kernel=args.kernel,
                      tag=args.tag or ("full" if args.full else None),
                      per_notebook=read_full_size() if args.full else None, force=args.force,
                      timeout=cell_timeout(args), jobs=plan.jobs, reuse_kernels=plan.pool or plan.small_series,
                      prepare=plan.prepare)


def _report(args: argparse.Namespace, plan: ExecutionPlan, records: list[RunRecord], wall: float) -> None:
    """One line on what ran; a complete reference series (make demo) records its wall time in series.json."""
    ran = [r for r in records if not r.skipped]
    total = sum(r.seconds for r in ran)
    skipped = len(records) - len(ran)
    if args.all and plan.whole.reference and ran and not skipped:
        write_series_time(plan.whole.folder / "series.json", cold=plan.cold, seconds=wall, jobs=plan.jobs,
                          notebooks=len(ran))
    print(f"{len(ran)} notebook(s) ran in {wall:.0f} s" + (f" (their own times add up to {total:.0f} s)"
                                                          if plan.jobs > 1 and ran else "")
          + (f" ({skipped} already done, skipped)" if skipped else "")
          + (": " + ", ".join(f"{r.notebook} {r.seconds:.0f} s" for r in ran) if ran else ""))


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``--notebooks``, ``--all``, ``--findings``: plan, execute, report; Ctrl-C names what was kept and how to
    resume."""
    started = time.perf_counter()  # the series' wall time counts this process's own start-up too
    plan = None
    try:
        plan = plan_execution(args)
        records = _execute(args, plan)
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
        if plan is not None:
            plan.close()
    _report(args, plan, records, time.perf_counter() - started)
    return 0


COMMANDS = {"strip": _strip, "list": _list, "write_guide": _write_guide, "write_times": _write_times}


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: one function per subcommand (``--strip``, ``--list``, ``--write-guide``, ``--write-times``;
    any run of notebooks is :func:`_run`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    for flag, command in COMMANDS.items():
        if getattr(args, flag):
            return command(args)
    _check_flags(parser, args)
    return _run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
