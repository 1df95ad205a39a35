"""Run the notebook series headless with papermill.

    python -m introspection_utils.run --model ID --notebooks 02 04 -p scales "[0,2,4,8]" [--output runs/]
    python -m introspection_utils.run --all                       # the whole series on the embedded model
    python -m introspection_utils.run --findings data/findings/qwen2.5-coder-1.5b-instruct.toml   # `make findings`
    python -m introspection_utils.run --strip                     # remove outputs from notebooks/*.ipynb
    python -m introspection_utils.run --all --threads 1           # one CPU thread per kernel (a shared CPU)
    python -m introspection_utils.run --notebooks 11 --executor ray --address auto   # the atlas on a Ray cluster

Executed notebooks go to ``<output>/<model>/`` with ``timings.csv`` (each notebook's wall time); figures go to
``figures/<model>/`` (the runner passes ``figures_dir``; a notebook run by hand only shows them) and tables where
``results_dir`` says (default ``data/results/<model>/``). ``--findings FILE`` runs the series with the per-notebook
parameters of a TOML file (``model``, ``[all]``, ``["02"]``, ...) and writes everything under ``figures/<model>/``:
the figures, ``results/`` (tables with ``.meta.json``), ``notebooks/`` (executed copies) and ``timings.csv``.

Parameter values are Python/JSON literals (``"[0,2,4]"``, ``3``, ``None``, ``"'Sandwich'"``; a bare word is taken
as a string); a parameter that a notebook does not declare in its ``parameters`` cell is an error, raised before
anything runs. A failing cell fails the run with the notebook and cell named, and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import papermill
from papermill.exceptions import PapermillExecutionError

from introspection_utils.data import tomllib
from introspection_utils.embedded import DEFAULT_MODEL
from introspection_utils.paths import model_name

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = ROOT / "notebooks"
FIGURES_DIR = ROOT / "figures"
# Parameters the runner passes only to the notebooks that declare them: where tables go, and where sweeps run
# (``--executor``/``--address``, or ``executor``/``ray_address`` in a findings file; see docs/scale_out.md).
RUNNER_PLACED = ("results_dir", "executor", "ray_address")


class NotebookError(RuntimeError):
    """A notebook failed: ``notebook``, ``cell`` (0-based index among all cells), the error and the output path."""

    def __init__(self, notebook: str, cell: int | None, message: str, output: Path | None = None) -> None:
        self.notebook, self.cell, self.output = notebook, cell, output
        where = f"cell {cell}" if cell is not None else "before any cell ran"
        super().__init__(f"notebook {notebook} failed at {where}: {message}"
                         + (f" (executed copy: {output})" if output else ""))


@dataclass(frozen=True)
class RunRecord:
    notebook: str
    output: Path
    seconds: float


def parse_value(text: str) -> Any:
    """A parameter value from the command line: a Python/JSON literal, else the text itself as a string."""
    for parse in (ast.literal_eval, _json_literal):
        try:
            return parse(text)
        except (ValueError, SyntaxError):
            continue
    return text


def _json_literal(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(str(err)) from err


def notebooks(selection: Sequence[str] | None = None, folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The notebooks matching ``selection`` (prefixes like ``"02"`` or file names), in series order; all if ``None``."""
    found = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no notebooks in {folder}")
    if selection is None:
        return found
    chosen = []
    for item in selection:
        matches = [p for p in found if p.name.startswith(item) or p.stem == item or p.name == item]
        if len(matches) != 1:
            names = ", ".join(p.name for p in found)
            raise ValueError(f"notebook {item!r} matches {len(matches)} notebooks; choose from {names}")
        chosen.append(matches[0])
    return chosen


def declared_parameters(path: Path) -> dict[str, Any]:
    """The parameters a notebook declares in its cell tagged ``parameters`` (name → inferred type/default)."""
    return {p: info for p, info in papermill.inspect_notebook(str(path)).items()}


def run_notebook(path: Path, output_dir: Path, parameters: dict[str, Any], *, kernel: str | None = None,
                 timeout: int | None = 1800, progress: bool = False) -> RunRecord:
    """Execute one notebook with ``parameters`` into ``output_dir/<name>``; raise :class:`NotebookError` on failure."""
    declared = declared_parameters(path)
    if not declared:
        raise NotebookError(path.name, None, "it has no cell tagged 'parameters'")
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise NotebookError(path.name, None, f"unknown parameter(s) {unknown}; it declares {sorted(declared)}")
    output_dir.mkdir(parents=True, exist_ok=True)
    output = output_dir / path.name
    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(path), str(output), parameters=parameters, kernel_name=kernel,
                                   cwd=str(path.parent), progress_bar=progress, execution_timeout=timeout,
                                   log_output=False)
    except PapermillExecutionError as err:
        # papermill inserts an injected-parameters cell after the parameters cell: map back to the source cell.
        cell = err.cell_index - 1 if parameters and err.cell_index > _parameters_cell(path) else err.cell_index
        raise NotebookError(path.name, cell, f"{err.ename}: {err.evalue}", output) from err
    return RunRecord(path.name, output, time.perf_counter() - start)


def _parameters_cell(path: Path) -> int:
    nb = nbformat.read(path, as_version=4)
    return next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))


def run_series(selection: Sequence[str] | None, *, model: str = DEFAULT_MODEL, parameters: dict[str, Any] | None = None,
               output: Path = Path("runs"), kernel: str | None = None,
               per_notebook: Mapping[str, Mapping[str, Any]] | None = None) -> list[RunRecord]:
    """Run the selected notebooks (all if ``None``) on ``model`` into ``output/<model>/``; stop at the first failure.

    ``parameters`` are passed to every notebook (``model`` is added, and ``figures_dir`` = ``figures/<model>/``
    unless given); ``per_notebook`` adds parameters by notebook prefix (``{"02": {"scales": [0, 4]}}``). Each must
    be declared by its notebook. Each notebook's wall time is printed and written to ``output/<model>/timings.csv``.
    """
    params = {"model": model, "figures_dir": str(FIGURES_DIR / model_name(model)), **(parameters or {})}
    out = output / model_name(model)
    records = run_notebooks(notebooks(selection), out, params, per_notebook=per_notebook, kernel=kernel)
    write_timings(records, out / "timings.csv", model)
    return records


def run_notebooks(paths: Sequence[Path], output_dir: Path, parameters: dict[str, Any], *,
                  per_notebook: Mapping[str, Mapping[str, Any]] | None = None, kernel: str | None = None
                  ) -> list[RunRecord]:
    """Execute ``paths`` in order into ``output_dir``, printing each wall time; every notebook's parameters are
    checked (:func:`plan_runs`) before anything runs."""
    records = []
    for path, params in plan_runs(paths, parameters, per_notebook, where_declared=RUNNER_PLACED):
        print(f"running {path.name} on {params.get('model')} ...", flush=True)
        record = run_notebook(path, output_dir, params, kernel=kernel)
        print(f"  done in {record.seconds:.1f} s -> {record.output}", flush=True)
        records.append(record)
    return records


def plan_runs(paths: Sequence[Path], parameters: dict[str, Any],
              per_notebook: Mapping[str, Mapping[str, Any]] | None = None, *,
              where_declared: Sequence[str] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """Each notebook with its parameters (``parameters`` plus its ``per_notebook`` entry, by prefix); raises when a
    notebook does not declare one of its own (``per_notebook``) parameters, when no notebook declares a series-wide
    one, or when a ``per_notebook`` key names no notebook. Series-wide parameters and ``where_declared`` (the
    runner's own placements, e.g. ``results_dir``) go only to the notebooks that declare them."""
    per_notebook = dict(per_notebook or {})
    unmatched = [k for k in per_notebook if not any(p.name.startswith(k) for p in notebooks())]
    if unmatched:
        raise ValueError(f"parameters for unknown notebook(s) {unmatched}")
    plans = []
    declared_by = {path: declared_parameters(path) for path in paths}
    # A series-wide parameter goes to the notebooks that declare it (`--all -p n_controls 20`); one that none of
    # them declares is still an error.
    somewhere = set(where_declared) | {k for k in parameters if any(k in d for d in declared_by.values())}
    for path in paths:
        declared = declared_by[path]
        params = {k: v for k, v in parameters.items() if k in declared or k not in somewhere}
        params |= {k: v for prefix, extra in per_notebook.items() if path.name.startswith(prefix)
                   for k, v in extra.items()}
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise NotebookError(path.name, None, f"unknown parameter(s) {unknown}; it declares {sorted(declared)}")
        plans.append((path, params))
    return plans


def write_timings(records: Sequence[RunRecord], path: Path, model: str) -> Path:
    """``path`` as a CSV, one row per notebook in series order (model, notebook, wall seconds, CPU count,
    OMP_NUM_THREADS); rows of notebooks not run this time are kept from an earlier run of the same model."""
    header = ["model", "notebook", "seconds", "cpus", "omp_num_threads"]
    rows = {}
    if path.is_file():
        with open(path, newline="") as f:
            rows = {r["notebook"]: r for r in csv.DictReader(f) if r.get("model") == model}
    for r in records:
        rows[r.notebook] = {"model": model, "notebook": r.notebook, "seconds": f"{r.seconds:.1f}",
                            "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "")}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows[name] for name in sorted(rows))
    return path


def read_findings(path: Path) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    """A findings file: ``model = "..."``, ``[all]`` (parameters for every notebook) and one table per notebook
    prefix (``["02"]``). Returns ``(model, all, per_notebook)``."""
    config = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(config.get("model"), str):
        raise ValueError(f"{path}: needs a top-level model = \"...\"")
    tables = {k: v for k, v in config.items() if isinstance(v, dict)}
    others = sorted(set(config) - set(tables) - {"model"})
    if others:
        raise ValueError(f"{path}: unexpected top-level keys {others}; parameters go in [all] or [\"NN\"] tables")
    return config["model"], tables.pop("all", {}), tables


def run_findings(path: Path, selection: Sequence[str] | None = None, *, model: str | None = None,
                 parameters: dict[str, Any] | None = None, root: Path = FIGURES_DIR, kernel: str | None = None
                 ) -> list[RunRecord]:
    """The science run: the series with the parameters of findings file ``path``, everything under
    ``root/<model>/``: figures, ``results/`` (tables), ``notebooks/`` (executed copies), ``timings.csv`` and
    ``findings.json`` (the parameters used). ``model`` and ``parameters`` (for every notebook) override the file's
    (a smoke test on a tiny model)."""
    file_model, common, per_notebook = read_findings(path)
    model = model or file_model
    common = {**common, **(parameters or {})}
    folder = root / model_name(model)
    params = {"model": model, "figures_dir": str(folder), "results_dir": str(folder / "results"), **common}
    records = run_notebooks(notebooks(selection), folder / "notebooks", params, per_notebook=per_notebook,
                            kernel=kernel)
    write_timings(records, folder / "timings.csv", model)
    (folder / "findings.json").write_text(json.dumps(
        {"findings_file": Path(path).name, "model": model, "all": common, "notebooks": per_notebook}, indent=1) + "\n")
    return records


def strip_outputs(paths: Sequence[Path]) -> list[Path]:
    """Remove outputs and execution counts from notebooks in place; returns those that changed."""
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m introspection_utils.run", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None,
                        help=f"model id (default {DEFAULT_MODEL}; with --findings, the file's model)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--notebooks", nargs="+", metavar="NN", help="notebook prefixes, e.g. 02 04")
    which.add_argument("--all", action="store_true", help="the whole series")
    which.add_argument("--findings", type=Path, metavar="FILE",
                       help="the series with a findings file's parameters, all outputs under figures/<model>/ "
                            "(--notebooks-only NN ... for a part of it; -p and --model override the file)")
    which.add_argument("--strip", action="store_true", help="strip outputs from notebooks/*.ipynb and exit")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a notebook parameter (Python/JSON literal); repeatable")
    parser.add_argument("--output", type=Path, default=None,
                        help="where executed notebooks go (runs/); with --findings, the root of <model>/ (figures/)")
    parser.add_argument("--notebooks-only", nargs="+", metavar="NN", default=None,
                        help="with --findings: run only these notebooks")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per kernel (sets OMP_NUM_THREADS); 1 is several times faster on a CPU "
                             "shared with other jobs")
    parser.add_argument("--executor", choices=("local", "ray"), default=None,
                        help="where the sweeps of the notebooks that declare `executor` (02, 03, 11) run: here "
                             "(local) or on the actors of a Ray cluster (ray; the `ray` extra)")
    parser.add_argument("--address", default=None, metavar="auto|HOST:PORT",
                        help="with --executor ray: the cluster to join (default: a new local one)")
    args = parser.parse_args(argv)
    if args.address is not None and args.executor != "ray":
        parser.error("--address needs --executor ray")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the kernels papermill starts
    if args.strip:
        for path in strip_outputs(notebooks()):
            print(f"stripped {path}")
        return 0
    params = {name: parse_value(value) for name, value in args.parameter}
    if args.executor is not None:
        params["executor"] = args.executor
    if args.address is not None:
        params["ray_address"] = args.address
    model = params.pop("model", args.model)  # -p model ID works as well as --model ID
    model = None if model is None else str(model)
    try:
        if args.findings:
            records = run_findings(args.findings, args.notebooks_only, model=model, parameters=params,
                                   root=args.output or FIGURES_DIR, kernel=args.kernel)
        else:
            records = run_series(None if args.all else args.notebooks, model=model or DEFAULT_MODEL, parameters=params,
                                 output=args.output or Path("runs"), kernel=args.kernel)
    except (NotebookError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    total = sum(r.seconds for r in records)
    print(f"{len(records)} notebook(s) ran in {total:.0f} s: " + ", ".join(f"{r.notebook} {r.seconds:.0f} s"
                                                                          for r in records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
