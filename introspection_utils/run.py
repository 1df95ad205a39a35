"""Run the notebook series headless with papermill.

    python -m introspection_utils.run --model ID --notebooks 02 04 -p scales "[0,2,4,8]" [--output runs/]
    python -m introspection_utils.run --all                       # the whole series on the embedded model
    python -m introspection_utils.run --strip                     # remove outputs from notebooks/*.ipynb
    python -m introspection_utils.run --all --threads 1           # one CPU thread per kernel (a shared CPU)

Executed notebooks go to ``<output>/<model>/``; figures and tables go where each notebook's ``figures_dir`` and
``results_dir`` parameters say (default ``figures/<model>/`` and ``data/results/<model>/``). Parameter values are
Python/JSON literals (``"[0,2,4]"``, ``3``, ``None``, ``"'Sandwich'"``; a bare word is taken as a string); a parameter
that a notebook does not declare in its ``parameters`` cell is an error, raised before anything runs. A failing
cell fails the run with the notebook and cell named, and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from introspection_utils.models import DEFAULT_MODEL
from introspection_utils.paths import model_name

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


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
    import json

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
    import papermill

    return {p: info for p, info in papermill.inspect_notebook(str(path)).items()}


def run_notebook(path: Path, output_dir: Path, parameters: dict[str, Any], *, kernel: str | None = None,
                 timeout: int | None = 1800, progress: bool = False) -> RunRecord:
    """Execute one notebook with ``parameters`` into ``output_dir/<name>``; raise :class:`NotebookError` on failure."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

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
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))


def run_series(selection: Sequence[str] | None, *, model: str = DEFAULT_MODEL, parameters: dict[str, Any] | None = None,
               output: Path = Path("runs"), kernel: str | None = None) -> list[RunRecord]:
    """Run the selected notebooks (all if ``None``) on ``model`` into ``output/<model>/``; stop at the first failure.

    ``parameters`` are passed to every notebook (``model`` is added); each must be declared by each notebook.
    """
    params = {"model": model, **(parameters or {})}
    paths = notebooks(selection)
    for path in paths:  # every notebook's parameters are checked before anything runs
        unknown = sorted(set(params) - set(declared_parameters(path)))
        if unknown:
            raise NotebookError(path.name, None, f"unknown parameter(s) {unknown}; it declares "
                                                 f"{sorted(declared_parameters(path))}")
    out = output / model_name(model)
    records = []
    for path in paths:
        print(f"running {path.name} on {model} ...", flush=True)
        record = run_notebook(path, out, params, kernel=kernel)
        print(f"  done in {record.seconds:.1f} s -> {record.output}", flush=True)
        records.append(record)
    return records


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m introspection_utils.run", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model id (default {DEFAULT_MODEL})")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--notebooks", nargs="+", metavar="NN", help="notebook prefixes, e.g. 02 04")
    which.add_argument("--all", action="store_true", help="the whole series")
    which.add_argument("--strip", action="store_true", help="strip outputs from notebooks/*.ipynb and exit")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a notebook parameter (Python/JSON literal); repeatable")
    parser.add_argument("--output", type=Path, default=Path("runs"), help="where executed notebooks go (runs/)")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per kernel (sets OMP_NUM_THREADS); 1 is several times faster on a CPU "
                             "shared with other jobs")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the kernels papermill starts
    if args.strip:
        for path in strip_outputs(notebooks()):
            print(f"stripped {path}")
        return 0
    params = {name: parse_value(value) for name, value in args.parameter}
    model = str(params.pop("model", args.model))  # -p model ID works as well as --model ID
    try:
        records = run_series(None if args.all else args.notebooks, model=model, parameters=params,
                             output=args.output, kernel=args.kernel)
    except (NotebookError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    total = sum(r.seconds for r in records)
    print(f"{len(records)} notebook(s) ran in {total:.0f} s: " + ", ".join(f"{r.notebook} {r.seconds:.0f} s"
                                                                          for r in records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
