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
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from introspection_utils.core.data import tomllib
from introspection_utils.core.paths import content_hash, model_name

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS_DIR = ROOT / "notebooks"
FIGURES_DIR = ROOT / "figures"
# Parameters the runner passes only to the notebooks that declare them: where tables go, and where sweeps run
# (``--executor``/``--address``, or ``executor``/``ray_address`` in a findings file; see docs/scale_out.md).
RUNNER_PLACED = ("results_dir", "executor", "ray_address")
EXECUTION = ("executor", "ray_address")  # where the work runs, not what it computes: not part of a run's identity
FULL_SIZE = ROOT / "data" / "full_size.toml"  # --full: the full-size parameters of the demo-sized notebooks
PACKAGE_DIR = Path(__file__).resolve().parents[1]
DEFAULT_CELL_TIMEOUT = 1800  # seconds; --cell-timeout 0 for none
TIMINGS_HEADER = ["model", "notebook", "seconds", "cpus", "omp_num_threads", "load_avg", "key"]
# Started in every kernel: the package's progress bars as text (streamed to the runner's terminal, kept readable in
# the executed copies) instead of widgets nobody sees in a headless run.
KERNEL_STARTUP = ["import tqdm.auto, tqdm.std; tqdm.auto.tqdm = tqdm.std.tqdm"]
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_BARE_WORD = re.compile(r"^(?![-+.\d])[\w./:@~+-]+$")  # a name, a hub id or a path, taken as a string as it is
_PROGRESS_LINE = re.compile(r"\d+%\||\d+/\d+ \[|it/s|s/it")


class NotebookError(RuntimeError):
    """A notebook failed: ``notebook``, ``cell`` (0-based index among all cells), the error and the output path."""

    def __init__(self, notebook: str, cell: int | None, message: str, output: Path | None = None) -> None:
        self.notebook, self.cell, self.output = notebook, cell, output
        where = f"failed at cell {cell}" if cell is not None else "was not started"
        super().__init__(f"notebook {notebook} {where}: {message}" + (f" (executed copy: {output})" if output else ""))


class Interrupted(RuntimeError):
    """Ctrl-C during a run: ``done`` the records of notebooks that finished, ``current`` the one interrupted."""

    def __init__(self, done: list[RunRecord], current: str | None, folder: Path | None) -> None:
        self.done, self.current, self.folder = done, current, folder
        super().__init__(f"interrupted during {current}")


@dataclass(frozen=True)
class RunRecord:
    notebook: str
    output: Path
    seconds: float
    key: str = ""
    skipped: bool = False


# ------------------------------------------------------------------ checking what the user typed


def parse_value(text: str, name: str | None = None) -> Any:
    """A parameter value from the command line: a Python/JSON literal (``[0,2,4]``, ``3``, ``None``, ``true``,
    ``'Sandwich'``), or a bare word taken as a string (``Sandwich``, ``google/gemma-2-9b-it``, ``/path/model.gguf``).
    Anything else (``[0,2,``, ``list(range(3))``, ``ice cream`` unquoted) is a ``ValueError`` naming ``name``."""
    for parse in (ast.literal_eval, _json_literal):
        try:
            return parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    if not _BARE_WORD.match(text):
        what = f"parameter {name!r}" if name else "a parameter"
        raise ValueError(f"{what}: {text!r} is not a Python/JSON literal; write e.g. \"[0, 2, 4]\", 3, 0.5, None, "
                         f"\"'a string'\" (a bare word such as Sandwich is taken as a string)")
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
        item = str(item)
        matches = [p for p in found if p.name.startswith(item) or p.stem == item or p.name == item]
        if len(matches) != 1:
            names = ", ".join(p.name[:2] for p in found)
            raise ValueError(f"notebook {item!r} matches {len(matches)} notebooks; choose from {names}")
        chosen.append(matches[0])
    return chosen


def declared_parameters(path: Path) -> dict[str, Any]:
    """The parameters a notebook declares in its cell tagged ``parameters`` (name → papermill's description:
    ``default``, ``inferred_type_name``, ``help``)."""
    import papermill

    return {p: info for p, info in papermill.inspect_notebook(str(path)).items()}


def _type_error(name: str, value: Any, info: Mapping[str, Any]) -> str | None:
    """Why ``value`` cannot stand where the notebook's default of ``name`` stands, or ``None``."""
    try:
        default = ast.literal_eval(info.get("default", "None"))
    except (ValueError, SyntaxError):
        return None
    if default is None or value is None:
        return None
    kinds = [((list, tuple), (list, tuple), "a list such as [0, 2, 4]"), (bool, bool, "True or False"),
             ((int, float), (int, float), "a number"), (str, str, "a string")]
    for default_kind, allowed, described in kinds:
        if isinstance(default, default_kind):
            ok = isinstance(value, allowed) and not (allowed == (int, float) and isinstance(value, bool))
            if default_kind is str and isinstance(value, list):
                ok = True  # e.g. wordings = "all" or a list of ids
            return None if ok else (f"parameter {name!r} takes {described} (its default is {info['default']}), "
                                    f"got {value!r}")
    return None


def check_tag(tag: str | None) -> str | None:
    if tag is not None and not _TAG.match(tag):
        raise ValueError(f"--tag {tag!r}: use letters, digits, '.', '_' or '-' (up to 64), starting with a letter "
                         f"or digit")
    return tag


def resolve_model(model: str) -> str:
    """``model`` as ``load_model`` will name it (checked: an unknown name is a ``ValueError`` with "did you mean")."""
    from introspection_utils.models.handle import resolve_name

    return resolve_name(model)


# ------------------------------------------------------------------ planning a run


def plan_runs(paths: Sequence[Path], parameters: dict[str, Any],
              per_notebook: Mapping[str, Mapping[str, Any]] | None = None, *,
              where_declared: Sequence[str] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """Each notebook with its parameters (``parameters`` plus its ``per_notebook`` entry, by prefix); raises when a
    notebook does not declare one of its own (``per_notebook``) parameters, when no notebook declares a series-wide
    one, when a value is not of its default's type, or when a ``per_notebook`` key names no notebook. Series-wide
    parameters and ``where_declared`` (the runner's own placements, e.g. ``results_dir``) go only to the notebooks
    that declare them."""
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
        if not declared:
            raise NotebookError(path.name, None, "it has no cell tagged 'parameters'")
        params = {k: v for k, v in parameters.items() if k in declared or k not in somewhere}
        params |= {k: v for prefix, extra in per_notebook.items() if path.name.startswith(prefix)
                   for k, v in extra.items()}
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise NotebookError(path.name, None, f"unknown parameter(s) {unknown}; it declares {sorted(declared)}")
        for name, value in params.items():
            problem = _type_error(name, value, declared[name])
            if problem:
                raise NotebookError(path.name, None, problem)
        plans.append((path, params))
    return plans


def _code_hash() -> str:
    """A hash of the package's source: a notebook done before a code change is not "done" after it."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def run_key(path: Path, parameters: Mapping[str, Any], code: str | None = None) -> str:
    """What a finished notebook was run with: its parameters, its own text and the package code."""
    notebook = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return content_hash({"parameters": {k: parameters[k] for k in sorted(parameters)}, "notebook": notebook,
                         "code": code or _code_hash()})


def default_threads() -> int:
    """CPU threads for each kernel: the CPUs this process may use minus the current 1-minute load (at least 1), so
    a shared or busy machine is not oversubscribed."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, min(cpus, round(cpus - load)))


# ------------------------------------------------------------------ executing


class _Progress:
    """papermill's hooks: "cell n of m" for each code cell, and the package's text progress bars passed through."""

    def __init__(self, name: str, n_code: int, stream: Any = None) -> None:
        self.name, self.n_code, self.seen, self.stream = name, n_code, 0, stream or sys.stderr
        self.open_line = False  # a progress line was written without its newline

    def on_cell_start(self, cell: Any, cell_index: int) -> None:
        if cell.cell_type == "code" and "injected-parameters" not in cell.metadata.get("tags", []):
            self.seen += 1
            first = cell.source.strip().splitlines()[0][:60] if cell.source.strip() else ""
            self._end_line()
            print(f"  {self.name[:2]} cell {self.seen}/{self.n_code}: {first}", flush=True)

    def _end_line(self) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.open_line = False

    def write(self, text: str) -> None:
        for part in re.split(r"(?<=[\r\n])", text):
            line = part.strip("\r\n")
            if _PROGRESS_LINE.search(line):
                self.stream.write("\r     " + line)
                self.open_line = True
        self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()


def _n_code_cells(path: Path) -> int:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return sum(c.cell_type == "code" and "parameters" not in c.metadata.get("tags", []) for c in nb.cells) + 1


def variant_name(path: Path, variant: str | None = None) -> str:
    """The executed copy's file name: the notebook's own, or ``<stem>.<variant>.ipynb`` for a findings variant
    (``11_atlas.binary.ipynb``)."""
    return path.name if not variant else f"{path.stem}.{variant}{path.suffix}"


def run_notebook(path: Path, output_dir: Path, parameters: dict[str, Any], *, kernel: str | None = None,
                 timeout: int | None = DEFAULT_CELL_TIMEOUT, progress: bool = True,
                 variant: str | None = None) -> RunRecord:
    """Execute one notebook with ``parameters`` into ``output_dir/<name>`` (:func:`variant_name`); raise
    :class:`NotebookError` on failure.

    ``timeout``: seconds per cell (``None`` or 0: none). ``progress``: print each code cell as it starts and the
    package's progress bars."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    plan_runs([path], parameters)
    output_dir.mkdir(parents=True, exist_ok=True)
    output = output_dir / variant_name(path, variant)
    hooks = _Progress(path.name, _n_code_cells(path)) if progress else None
    extra = {"on_cell_start": hooks.on_cell_start, "stderr_file": hooks} if hooks else {}
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(path), str(output), parameters=parameters, kernel_name=kernel, cwd=str(path.parent),
            progress_bar=False, execution_timeout=timeout or None, log_output=False,
            # the kernel's "running over TCP without encryption" warning once per notebook says nothing to act on
            # (the kernel listens on 127.0.0.1 only); its own log level goes to CRITICAL: after a Ctrl-C its shutdown
            # logs a ZMQ traceback and "KeyboardInterrupt caught in kernel" (the cells' own errors come back over ZMQ).
            extra_arguments=["--IPKernelApp.log_level=CRITICAL",
                             f"--IPKernelApp.exec_lines={json.dumps(KERNEL_STARTUP)}"],
            **extra)
    except PapermillExecutionError as err:
        if hooks:
            hooks._end_line()
        if err.ename == "KeyboardInterrupt":
            raise KeyboardInterrupt from err
        # papermill inserts an injected-parameters cell after the parameters cell: map back to the source cell.
        cell = err.cell_index - 1 if parameters and err.cell_index > _parameters_cell(path) else err.cell_index
        raise NotebookError(path.name, cell, f"{err.ename}: {err.evalue}", output) from err
    if hooks:
        hooks._end_line()
    return RunRecord(output.name, output, time.perf_counter() - start)


def _parameters_cell(path: Path) -> int:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))


def run_notebooks(paths: Sequence[Path], output_dir: Path, parameters: dict[str, Any], *,
                  per_notebook: Mapping[str, Mapping[str, Any]] | None = None, kernel: str | None = None,
                  timings: Path | None = None, model: str | None = None, skip_done: bool = False,
                  timeout: int | None = DEFAULT_CELL_TIMEOUT, variant: str | None = None) -> list[RunRecord]:
    """Execute ``paths`` in order into ``output_dir``, printing each wall time and writing it to ``timings`` as
    each finishes; every notebook's parameters are checked (:func:`plan_runs`) before anything runs. With
    ``skip_done``, a notebook whose executed copy and ``timings`` row show the same key (:func:`run_key`) is
    skipped. ``variant``: the executed copies and timings rows are named ``<stem>.<variant>`` (a findings variant).
    Ctrl-C raises :class:`Interrupted` with what finished."""
    plans = plan_runs(paths, parameters, per_notebook, where_declared=RUNNER_PLACED)
    done_keys = _done_keys(timings, model) if (skip_done and timings is not None) else {}
    code = _code_hash()
    records: list[RunRecord] = []
    current = None
    try:
        for path, params in plans:
            key = run_key(path, params, code)
            name = variant_name(path, variant)
            if done_keys.get(name) == key and (output_dir / name).is_file():
                print(f"skipping {name}: done with the same parameters and code (--force reruns it)", flush=True)
                records.append(RunRecord(name, output_dir / name, 0.0, key, skipped=True))
                continue
            current = name
            print(f"running {name} on {params.get('model')} ...", flush=True)
            record = run_notebook(path, output_dir, params, kernel=kernel, timeout=timeout, variant=variant)
            record = RunRecord(record.notebook, record.output, record.seconds, key)
            print(f"  done in {record.seconds:.1f} s -> {record.output}", flush=True)
            records.append(record)
            if timings is not None:
                write_timings([record], timings, model or str(params.get("model")))
            current = None
    except KeyboardInterrupt:
        raise Interrupted(records, current, output_dir) from None
    return records


def _done_keys(path: Path, model: str | None) -> dict[str, str]:
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {r["notebook"]: r.get("key") or "" for r in csv.DictReader(f) if model is None or r["model"] == model}


def write_timings(records: Sequence[RunRecord], path: Path, model: str) -> Path:
    """``path`` as a CSV, one row per notebook in series order (model, notebook, wall seconds, CPU count,
    OMP_NUM_THREADS, 1-minute load average when it finished, run key); rows of notebooks not run this time are kept
    from an earlier run of the same model. Skipped records leave their row as it was."""
    rows = {}
    if path.is_file():
        with open(path, newline="") as f:
            rows = {r["notebook"]: r for r in csv.DictReader(f) if r.get("model") == model}
    try:
        load = f"{os.getloadavg()[0]:.2f}"
    except OSError:
        load = ""
    for r in records:
        if r.skipped:
            continue
        rows[r.notebook] = {"model": model, "notebook": r.notebook, "seconds": f"{r.seconds:.1f}",
                            "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
                            "load_avg": load, "key": r.key}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TIMINGS_HEADER, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows[name] for name in sorted(rows))
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class Placement:
    """Where a run writes: ``folder`` (executed notebooks, timings.csv), and the parameters placing its figures and
    tables; ``reference`` when it is the run whose figures are committed (``make demo``)."""

    folder: Path
    parameters: dict[str, Any]
    reference: bool


def placement(model: str, overrides: Mapping[str, Any], *, output: Path = Path("runs"), tag: str | None = None,
              default_model: str | None = None) -> Placement:
    """Where a run of ``model`` with ``overrides`` (the ``-p`` values other than the model) goes: the reference run
    (``default_model``, no overrides, no tag) to ``output/<model>/`` with figures in ``figures/<model>/``; any other
    to ``output/<model>/<tag | p-hash | default>/`` with its own ``figures/`` and ``results/`` (explicit
    ``figures_dir`` / ``results_dir`` overrides win)."""
    if default_model is None:
        from introspection_utils.models.embedded import DEFAULT_MODEL as default_model
    check_tag(tag)
    base = Path(output).resolve() / model_name(model)  # absolute: the kernels run in notebooks/
    if model == default_model and not overrides and tag is None:
        return Placement(base, {"figures_dir": str(FIGURES_DIR / model_name(model))}, True)
    name = tag or (f"p-{content_hash(dict(sorted(overrides.items())))[:8]}" if overrides else "default")
    folder = base / name
    return Placement(folder, {"figures_dir": str(folder / "figures"), "results_dir": str(folder / "results")}, False)


def run_series(selection: Sequence[str] | None, *, model: str | None = None, parameters: dict[str, Any] | None = None,
               output: Path = Path("runs"), kernel: str | None = None,
               per_notebook: Mapping[str, Mapping[str, Any]] | None = None, tag: str | None = None,
               force: bool = False, timeout: int | None = DEFAULT_CELL_TIMEOUT) -> list[RunRecord]:
    """Run the selected notebooks (all if ``None``) on ``model``; stop at the first failure.

    Where it writes: :func:`placement`. ``parameters`` go to every notebook that declares them; ``per_notebook``
    adds parameters by notebook prefix (``{"02": {"scales": [0, 4]}}``). Everything is checked before the first
    kernel starts, and nothing is created when a check fails. Each notebook's wall time is printed and written to
    ``<folder>/timings.csv`` as it finishes. The whole series (``selection=None``) skips notebooks already done with
    the same key unless ``force``.
    """
    overrides = dict(parameters or {})
    model = resolve_model(model or _default_model())
    paths = notebooks(selection)
    changed = {**{k: v for k, v in overrides.items() if k not in EXECUTION},
               **({"per_notebook": dict(per_notebook)} if per_notebook else {})}
    place = placement(model, changed, output=output, tag=tag, default_model=_default_model())
    params = {"model": model, **place.parameters, **overrides}
    plan_runs(paths, params, per_notebook, where_declared=RUNNER_PLACED)  # raises before anything is created
    if not place.reference:
        place.folder.mkdir(parents=True, exist_ok=True)
        (place.folder / "parameters.json").write_text(json.dumps(
            {"model": model, "tag": tag, "parameters": overrides}, indent=1, sort_keys=True, default=str) + "\n")
    return run_notebooks(paths, place.folder, params, per_notebook=per_notebook, kernel=kernel,
                         timings=place.folder / "timings.csv", model=model, skip_done=selection is None and not force,
                         timeout=timeout)


def _default_model() -> str:
    from introspection_utils.models.embedded import DEFAULT_MODEL

    return DEFAULT_MODEL


def read_full_size(path: Path = FULL_SIZE) -> dict[str, dict[str, Any]]:
    """The full-size parameters (``--full``), one table per notebook prefix."""
    tables = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    if not all(isinstance(v, dict) for v in tables.values()):
        raise ValueError(f"{path}: only [\"NN\"] tables of parameters")
    return tables


def read_findings(path: Path) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    """A findings file: ``model = "..."``, ``[all]`` (parameters for every notebook) and one table per notebook
    prefix (``["02"]``), plus variants: ``["11.binary"]`` runs notebook 11 once more with its ``["11"]`` parameters
    updated by the variant's (executed copy ``11_atlas.binary.ipynb``). Returns ``(model, all, per_notebook)``, the
    variants' keys as written (see :func:`split_variants`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"findings file {path} does not exist (see data/findings/)")
    config = tomllib.loads(path.read_text(encoding="utf-8"))
    if not isinstance(config.get("model"), str):
        raise ValueError(f"{path}: needs a top-level model = \"...\"")
    tables = {k: v for k, v in config.items() if isinstance(v, dict)}
    others = sorted(set(config) - set(tables) - {"model"})
    if others:
        raise ValueError(f"{path}: unexpected top-level keys {others}; parameters go in [all] or [\"NN\"] tables")
    return config["model"], tables.pop("all", {}), tables


def split_variants(per_notebook: Mapping[str, Mapping[str, Any]]
                   ) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str, dict[str, Any]]]]:
    """``per_notebook`` as ``(base tables, [(prefix, variant, base | variant parameters), ...])``: a key
    ``"11.binary"`` is variant ``binary`` of notebook ``11``; a variant of a notebook with no base table, or an
    empty / non-identifier variant name, is an error."""
    base = {k: dict(v) for k, v in per_notebook.items() if "." not in k}
    variants = []
    for key, extra in per_notebook.items():
        if "." not in key:
            continue
        prefix, variant = key.split(".", 1)
        if prefix not in base:
            raise ValueError(f"findings variant [{key!r}] needs a [{prefix!r}] table of its notebook's parameters")
        if not variant.isidentifier():
            raise ValueError(f"findings variant [{key!r}]: the name after the dot must be a word, e.g. \"11.binary\"")
        variants.append((prefix, variant, {**base[prefix], **extra}))
    return base, variants


def run_findings(path: Path, selection: Sequence[str] | None = None, *, model: str | None = None,
                 parameters: dict[str, Any] | None = None, root: Path = FIGURES_DIR, kernel: str | None = None,
                 force: bool = True, timeout: int | None = DEFAULT_CELL_TIMEOUT) -> list[RunRecord]:
    """The science run: the series with the parameters of findings file ``path``, everything under
    ``root/<model>/``: figures, ``results/`` (tables), ``notebooks/`` (executed copies), ``timings.csv`` and
    ``findings.json`` (the parameters used). ``model`` and ``parameters`` (for every notebook) override the file's
    (a smoke test on a tiny model). ``force=False`` skips notebooks already done with the same key."""
    file_model, common, per_notebook = read_findings(path)
    base, variants = split_variants(per_notebook)
    model = resolve_model(model or file_model)
    common = {**common, **(parameters or {})}
    folder = root / model_name(model)
    params = {"model": model, "figures_dir": str(folder), "results_dir": str(folder / "results"), **common}
    # a selection item "11.binary" runs that variant alone; "11" runs the notebook and its variants
    only = {str(item) for item in selection or () if "." in str(item)}
    unknown = sorted(only - {f"{prefix}.{name}" for prefix, name, _ in variants})
    if unknown:
        raise ValueError(f"no findings variant {unknown} in {path}; it has "
                         f"{[f'{prefix}.{name}' for prefix, name, _ in variants]}")
    plain = [item for item in selection or () if "." not in str(item)]
    paths = notebooks(plain) if selection is not None else notebooks()
    chosen = {p.name[:2] for p in paths}
    variants = [(prefix, name, extra) for prefix, name, extra in variants
                if prefix in chosen or f"{prefix}.{name}" in only]
    for prefix, _, extra in variants:  # every variant checked before the first kernel starts
        plan_runs(notebooks([prefix]), params, {prefix: extra}, where_declared=RUNNER_PLACED)
    records = []
    if paths:
        records = run_notebooks(paths, folder / "notebooks", params, per_notebook=base, kernel=kernel,
                                timings=folder / "timings.csv", model=model, skip_done=not force, timeout=timeout)
    for prefix, name, extra in variants:
        records += run_notebooks(notebooks([prefix]), folder / "notebooks", params, per_notebook={prefix: extra},
                                 kernel=kernel, timings=folder / "timings.csv", model=model, skip_done=not force,
                                 timeout=timeout, variant=name)
    (folder / "findings.json").write_text(json.dumps(
        {"findings_file": Path(path).name, "model": model, "all": common, "notebooks": per_notebook}, indent=1) + "\n")
    return records


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
    lines += ["", f"Total {total / 60:.1f} min for {len(rows)} notebooks of `{rows[0]['model']}` on {', '.join(cpus)} "
                  f"CPU(s), {', '.join(threads)} thread(s) per kernel"
              + (f", load average {min(loads):.1f}–{max(loads):.1f}" if loads else "")
              + f"; written from `{path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}` by "
                f"`.venv/bin/python -m introspection_utils.run --write-times docs/notebooks.md`."]
    return "\n".join(lines)


def listing() -> str:
    """The series as the registry holds it (``run --list``): per notebook, what computes it, the functions its
    readings come from, its figures and tables (``{part}``: filled in by the run), and its findings table and
    reader."""
    from introspection_utils.core.registry import EXPERIMENTS

    lines = []
    for e in EXPERIMENTS:
        findings = f'findings: ["{e.findings_table}"] parameters; ' + (
            f"readings from its tables by {e.findings}" if e.findings else "no section of its own")
        lines += [f"{e.notebook} · {e.title}",
                  f"    computes: {', '.join(e.modules)}",
                  f"    reads:    {', '.join(e.readings)}",
                  f"    figures:  {', '.join(e.figures)}",
                  f"    tables:   {', '.join(e.tables) or '(none)'}",
                  f"    {findings}"]
    return "\n".join(lines)


def guide_markdown(path: Path, figures_model: str | None = None) -> str:
    """The notebook guide's table from the registry, its links relative to ``path`` (the file it goes into, e.g.
    ``docs/notebooks.md``), each row with the figure of the reference run of ``figures_model`` (default: the
    embedded model) that the entry names (``guide_figure``)."""
    from introspection_utils.core.registry import EXPERIMENTS

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
                                            "introspection_utils.apps.run as r; help(r)') and the README.")
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
    which.add_argument("--write-times", type=Path, metavar="FILE",
                       help="put runs/<model>/timings.csv (the last make demo) into FILE's timings block "
                            "(docs/notebooks.md) and exit")
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
                        help="the full-size runs of the notebooks that make demo runs at demo size (07, 08, 10: "
                             "data/full_size.toml), into runs/<model>/full/ (or --tag)")
    parser.add_argument("--force", action="store_true", help="rerun notebooks already done with the same parameters")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per kernel (sets OMP_NUM_THREADS); default: the CPUs free now "
                             "(CPUs minus the load average, at least 1)")
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
        replace_block(args.write_times, "timings", timings_markdown(timings.resolve()))
        print(f"wrote the timings of {timings} into {args.write_times}")
        return 0
    if args.address is not None and args.executor != "ray":
        parser.error("--address needs --executor ray")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.cell_timeout < 0:
        parser.error(f"--cell-timeout must be >= 0 seconds, got {args.cell_timeout}")
    if args.notebooks_only and not args.findings:
        parser.error("--notebooks-only goes with --findings (use --notebooks NN ... otherwise)")
    try:
        check_tag(args.tag)
        params = {name: parse_value(value, name) for name, value in args.parameter}
        if args.executor is not None:
            params["executor"] = args.executor
        if args.address is not None:
            params["ray_address"] = args.address
        model = params.pop("model", args.model)  # -p model ID works as well as --model ID
        model = None if model is None else str(model)
        if args.threads is not None or "OMP_NUM_THREADS" not in os.environ:
            threads = args.threads or default_threads()
            os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the kernels papermill starts
            print(f"threads per kernel: {threads} (CPUs {os.cpu_count()}, load average "
                  f"{os.getloadavg()[0]:.1f}; --threads N to choose)", flush=True)
        os.environ.setdefault("TQDM_MININTERVAL", "2")  # progress lines every 2 s, not every trial
        if args.findings:
            if args.tag or args.full:
                raise ValueError("--tag and --full do not go with --findings (a findings run takes its parameters "
                                 "from its file and writes under figures/<model>/)")
            records = run_findings(args.findings, args.notebooks_only, model=model, parameters=params,
                                   root=args.output or FIGURES_DIR, kernel=args.kernel, force=args.force,
                                   timeout=args.cell_timeout)
        else:
            per_notebook = read_full_size() if args.full else None
            records = run_series(None if args.all else args.notebooks, model=model, parameters=params,
                                 output=args.output or Path("runs"), kernel=args.kernel,
                                 tag=args.tag or ("full" if args.full else None), per_notebook=per_notebook,
                                 force=args.force, timeout=args.cell_timeout)
    except Interrupted as err:
        done = f"{len(err.done)} notebook(s) finished" + (f" ({err.folder}/timings.csv)" if err.done else "")
        series = bool(args.all or args.findings)
        print(f"\ninterrupted during {err.current or 'start-up'}: {done}; finished sweeps and checkpoints are kept. "
              f"Resume: {_resume_command(argv, err, series)}", file=sys.stderr)
        return 130
    except (NotebookError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    ran = [r for r in records if not r.skipped]
    total = sum(r.seconds for r in ran)
    skipped = len(records) - len(ran)
    print(f"{len(ran)} notebook(s) ran in {total:.0f} s" + (f" ({skipped} already done, skipped)" if skipped else "")
          + (": " + ", ".join(f"{r.notebook} {r.seconds:.0f} s" for r in ran) if ran else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
