"""The runner's execution: each notebook through papermill, failures named by notebook and cell, timings written as
each finishes, notebooks already done skipped; :mod:`.cli` and :mod:`.findings` call it."""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from introspection_utils.apps.runner.checks import (
    EXECUTION,
    RUNNER_PLACED,
    NotebookError,
    code_hash,
    declared_parameters,
    default_model,
    notebooks,
    placement,
    plan_runs,
    resolve_model,
    run_key,
)

DEFAULT_CELL_TIMEOUT = 1800  # seconds; --cell-timeout 0 for none

# load_start / load_avg: the 1-minute load average when the notebook started / finished (the machine is often shared;
# with --jobs N the notebooks beside it count too); dtype: what its model loaded in (its dtype parameter, resolved).
TIMINGS_HEADER = ["model", "notebook", "seconds", "dtype", "cpus", "omp_num_threads", "load_start", "load_avg", "key"]

# Started in every kernel: the package's progress bars as text (streamed to the runner's terminal, kept readable in
# the executed copies) instead of widgets nobody sees in a headless run.
KERNEL_STARTUP = ["import tqdm.auto, tqdm.std; tqdm.auto.tqdm = tqdm.std.tqdm"]
# The kernel's "running over TCP without encryption" warning once per notebook says nothing to act on (the kernel
# listens on 127.0.0.1 only); its own log level goes to CRITICAL: after a Ctrl-C its shutdown logs a ZMQ traceback
# and "KeyboardInterrupt caught in kernel" (the cells' own errors come back over ZMQ).
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=CRITICAL", f"--IPKernelApp.exec_lines={json.dumps(KERNEL_STARTUP)}"]

_PROGRESS_LINE = re.compile(r"\d+%\||\d+/\d+ \[|it/s|s/it")



class Interrupted(RuntimeError):
    """Ctrl-C during a run: ``done`` the records of notebooks that finished, ``current`` the one interrupted."""

    def __init__(self, done: list[RunRecord], current: str | None, folder: Path | None) -> None:
        self.done, self.current, self.folder = done, current, folder
        super().__init__(f"interrupted during {current}")



@dataclass(frozen=True)
class RunRecord:
    """One notebook's run: its executed copy, wall time and run key; the 1-minute load average when it started and
    finished (``None``: not read) and the dtype its model loaded in (``""``: it has no ``dtype`` parameter)."""

    notebook: str
    output: Path
    seconds: float
    key: str = ""
    skipped: bool = False
    load_start: float | None = None
    load_end: float | None = None
    dtype: str = ""



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
                self.stream.write(f"\r  {self.name[:2]} " + line)  # named: notebooks may run side by side
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
                 variant: str | None = None, warm: Any = None) -> RunRecord:
    """Execute one notebook with ``parameters`` into ``output_dir/<name>`` (:func:`variant_name`); raise
    :class:`NotebookError` on failure.

    ``timeout``: seconds per cell (``None`` or 0: none). ``progress``: print each code cell as it starts and the
    package's progress bars. ``warm``: a :class:`~introspection_utils.apps.runner.kernels.WarmKernel` to run in
    (reset first if it ran a notebook before) instead of a new kernel."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    plan_runs([path], parameters)
    output_dir.mkdir(parents=True, exist_ok=True)
    output = output_dir / variant_name(path, variant)
    hooks = _Progress(path.name, _n_code_cells(path)) if progress else None
    extra = {"on_cell_start": hooks.on_cell_start, "stderr_file": hooks} if hooks else {}
    dtype = notebook_dtype(path, parameters)
    from introspection_utils.engine.throughput import load_average  # here: `run --help` must not import torch

    load_start, start = load_average(), time.perf_counter()
    if warm is not None:
        if warm.used:
            warm.reset()
        warm.used = True
        extra["km"] = warm.km
    try:
        papermill.execute_notebook(
            str(path), str(output), parameters=parameters, kernel_name=kernel, cwd=str(path.parent),
            progress_bar=False, execution_timeout=timeout or None, log_output=False,
            extra_arguments=KERNEL_ARGUMENTS, **extra)
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
    return RunRecord(output.name, output, time.perf_counter() - start, load_start=load_start,
                     load_end=load_average(), dtype=dtype)


def notebook_dtype(path: Path, parameters: Mapping[str, Any]) -> str:
    """The dtype ``path``'s model loads in with ``parameters``: its ``dtype`` parameter (the one passed, else the
    notebook's default) as ``load_model`` resolves it on this machine ("auto": bfloat16 where the CPU or GPU runs it
    fast); ``""`` for a notebook that declares no ``dtype``."""
    declared = declared_parameters(path)
    if "dtype" not in declared:
        return ""
    value = parameters["dtype"] if "dtype" in parameters else ast.literal_eval(declared["dtype"].get("default")
                                                                                 or "None")
    from introspection_utils.models.handle import resolve_dtype  # here: `run --help` must not import torch

    return str(resolve_dtype(value)).removeprefix("torch.")



def _parameters_cell(path: Path) -> int:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))



def run_notebooks(paths: Sequence[Path], output_dir: Path, parameters: dict[str, Any], *,
                  per_notebook: Mapping[str, Mapping[str, Any]] | None = None, kernel: str | None = None,
                  timings: Path | None = None, model: str | None = None, skip_done: bool = False,
                  timeout: int | None = DEFAULT_CELL_TIMEOUT, variant: str | None = None,
                  jobs: int = 1, reuse_kernels: Any = False, prepare: Any = None) -> list[RunRecord]:
    """Execute ``paths`` in order into ``output_dir``, printing each wall time and writing it to ``timings`` as
    each finishes; every notebook's parameters are checked (:func:`plan_runs`) before anything runs. ``jobs``: up
    to that many notebooks at once (:mod:`~introspection_utils.apps.runner.kernels`); ``reuse_kernels``: each kernel
    runs the next notebook too, reset in between (:class:`~introspection_utils.apps.runner.kernels.WarmKernel`; or a
    :class:`~introspection_utils.apps.runner.kernels.KernelPool` the caller started early), the first ``jobs`` started
    before ``prepare()`` (e.g. converting the model) so that their imports overlap it. With
    ``skip_done``, a notebook whose executed copy and ``timings`` row show the same key (:func:`run_key`) is
    skipped. ``variant``: the executed copies and timings rows are named ``<stem>.<variant>`` (a findings variant).
    Ctrl-C raises :class:`Interrupted` with what finished."""
    plans = plan_runs(paths, parameters, per_notebook, where_declared=RUNNER_PLACED)
    done_keys = _done_keys(timings, model) if (skip_done and timings is not None) else {}
    code = code_hash()
    records: list[RunRecord] = []
    tasks = []
    for path, params in plans:
        key = run_key(path, params, code)
        name = variant_name(path, variant)
        if done_keys.get(name) == key and (output_dir / name).is_file():
            print(f"skipping {name}: done with the same parameters and code (--force reruns it)", flush=True)
            records.append(RunRecord(name, output_dir / name, 0.0, key, skipped=True))
            continue
        tasks.append((name, path, params, key))

    kernels = None
    if reuse_kernels and paths:
        from introspection_utils.apps.runner.kernels import KernelPool

        if isinstance(reuse_kernels, KernelPool):  # started by the caller (already importing)
            kernels = reuse_kernels
        else:
            kernels = KernelPool(kernel or _kernel_name(paths[0]), KERNEL_ARGUMENTS, str(paths[0].parent))
            kernels.prestart(min(jobs, len(tasks)))
    if prepare is not None and tasks:
        prepare()

    def run_one(path: Path, params: dict[str, Any], key: str) -> RunRecord:
        print(f"running {variant_name(path, variant)} on {params.get('model')} ...", flush=True)
        warm = kernels.take() if kernels else None
        try:
            record = run_notebook(path, output_dir, params, kernel=kernel, timeout=timeout, variant=variant,
                                  warm=warm)
        except BaseException:
            if warm is not None:
                warm.shutdown()  # a failed or interrupted notebook's kernel is not reused
            raise
        if warm is not None:
            kernels.give_back(warm)
        return replace(record, key=key)

    def finished(name: str, record: RunRecord) -> None:
        print(f"  {name} done in {record.seconds:.1f} s -> {record.output}", flush=True)
        records.append(record)
        if timings is not None:
            write_timings([record], timings, model or str(parameters.get("model")))

    current = None
    try:
        if jobs > 1 and len(tasks) > 1:
            from introspection_utils.apps.runner.kernels import run_side_by_side

            run_side_by_side([(name, lambda p=path, q=params, k=key: run_one(p, q, k)) for name, path, params, key
                              in tasks], jobs, on_done=finished)
        else:
            for name, path, params, key in tasks:
                current = name
                finished(name, run_one(path, params, key))
                current = None
    except KeyboardInterrupt as err:
        # nbclient's cell task is abandoned with the kernel it waited on; when it is collected asyncio would log its
        # DeadKernelError as "Task exception was never retrieved", a traceback that says nothing the one
        # "interrupted during …" line does not (and only sometimes: it depends on when the collection happens).
        import logging

        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        current = ", ".join(getattr(err, "running", ())) or current
        raise Interrupted(records, current, output_dir) from None
    finally:
        if kernels:
            kernels.close()
    return records


def _kernel_name(path: Path) -> str:
    import nbformat

    return nbformat.read(path, as_version=4).metadata.get("kernelspec", {}).get("name", "python3")



def _done_keys(path: Path, model: str | None) -> dict[str, str]:
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {r["notebook"]: r.get("key") or "" for r in csv.DictReader(f) if model is None or r["model"] == model}



def write_timings(records: Sequence[RunRecord], path: Path, model: str) -> Path:
    """``path`` as a CSV, one row per notebook in series order (:data:`TIMINGS_HEADER`: model, notebook, wall
    seconds, the dtype its model loaded in, CPU count, OMP_NUM_THREADS, the 1-minute load average when it started and
    when it finished — now, for a record that did not read it —, run key); rows of notebooks not run this time are
    kept from an earlier run of the same model. Skipped records leave their row as it was."""
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
        rows[r.notebook] = {"model": model, "notebook": r.notebook, "seconds": f"{r.seconds:.1f}", "dtype": r.dtype,
                            "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
                            "load_start": "" if r.load_start is None else f"{r.load_start:.2f}",
                            "load_avg": load if r.load_end is None else f"{r.load_end:.2f}", "key": r.key}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TIMINGS_HEADER, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows[name] for name in sorted(rows))
    tmp.replace(path)
    return path


def write_series_time(path: Path, *, cold: bool, seconds: float, jobs: int, notebooks: int) -> Path:
    """Record a whole series' wall time in ``path`` (``runs/<model>/series.json``) under ``"cold"`` (the model's
    converted weights were not in the cache when it started: a fresh clone's first ``make demo``) or ``"warm"``,
    with how it ran: notebooks side by side, threads per kernel, CPUs, the CPU's name and its bfloat16 instructions
    (the same series takes several times longer on a CPU of another kind) and the load average at its end."""
    from introspection_utils.core.paths import atomic_write
    from introspection_utils.engine.throughput import bf16_flags, device_name

    record = json.loads(path.read_text()) if path.is_file() else {}
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    record["cold" if cold else "warm"] = {"seconds": round(seconds, 1), "notebooks": notebooks, "jobs": jobs,
                                          "threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
                                          "device": device_name("cpu"), "bf16": bf16_flags(), "load_avg": load}
    return atomic_write(path, json.dumps(record, indent=1, sort_keys=True) + "\n")



def run_series(selection: Sequence[str] | None, *, model: str | None = None, parameters: dict[str, Any] | None = None,
               output: Path = Path("runs"), kernel: str | None = None,
               per_notebook: Mapping[str, Mapping[str, Any]] | None = None, tag: str | None = None,
               force: bool = False, timeout: int | None = DEFAULT_CELL_TIMEOUT, jobs: int = 1,
               reuse_kernels: Any = False, prepare: Any = None) -> list[RunRecord]:
    """Run the selected notebooks (all if ``None``) on ``model``, ``jobs`` at a time (``reuse_kernels``: in warm
    kernels; ``prepare``: called once before the first notebook; :func:`run_notebooks`); stop at the first failure.

    Where it writes: :func:`placement`. ``parameters`` go to every notebook that declares them; ``per_notebook``
    adds parameters by notebook prefix (``{"02": {"scales": [0, 4]}}``). Everything is checked before the first
    kernel starts, and nothing is created when a check fails. Each notebook's wall time is printed and written to
    ``<folder>/timings.csv`` as it finishes. The whole series (``selection=None``) skips notebooks already done with
    the same key unless ``force``.
    """
    overrides = dict(parameters or {})
    model = resolve_model(model or default_model())
    paths = notebooks(selection)
    changed = {**{k: v for k, v in overrides.items() if k not in EXECUTION},
               **({"per_notebook": dict(per_notebook)} if per_notebook else {})}
    place = placement(model, changed, output=output, tag=tag, default_model=default_model())
    params = {"model": model, **place.parameters, **overrides}
    plan_runs(paths, params, per_notebook, where_declared=RUNNER_PLACED)  # raises before anything is created
    if not place.reference:
        place.folder.mkdir(parents=True, exist_ok=True)
        (place.folder / "parameters.json").write_text(json.dumps(
            {"model": model, "tag": tag, "parameters": overrides}, indent=1, sort_keys=True, default=str) + "\n")
    return run_notebooks(paths, place.folder, params, per_notebook=per_notebook, kernel=kernel,
                         timings=place.folder / "timings.csv", model=model, skip_done=selection is None and not force,
                         timeout=timeout, jobs=jobs, reuse_kernels=reuse_kernels, prepare=prepare)

