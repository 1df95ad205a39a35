"""What the runner checks before any kernel starts (parameters, notebooks, tags, the model and its layers; the
explorer uses the same checks) and where a run writes; :mod:`.cli` and :mod:`.execute` call it."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from introspection_utils.core.data import tomllib
from introspection_utils.core.paths import content_hash, model_name

ROOT = Path(__file__).resolve().parents[3]

NOTEBOOKS_DIR = ROOT / "notebooks"

FIGURES_DIR = ROOT / "figures"

# Parameters the runner passes only to the notebooks that declare them: where tables go, and where sweeps run
# (``--executor``/``--address``, or ``executor``/``ray_address`` in a findings file; see docs/scale_out.md).
RUNNER_PLACED = ("results_dir", "executor", "ray_address")

EXECUTION = ("executor", "ray_address")  # where the work runs, not what it computes: not part of a run's identity

FULL_SIZE = ROOT / "data" / "full_size.toml"  # --full: the full-size parameters of the demo-sized notebooks

PACKAGE_DIR = Path(__file__).resolve().parents[2]

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

_BARE_WORD = re.compile(r"^(?![-+.\d])[\w./:@~+-]+$")  # a name, a hub id or a path, taken as a string as it is



class NotebookError(RuntimeError):
    """A notebook failed: ``notebook``, ``cell`` (0-based index among all cells), the error and the output path."""

    def __init__(self, notebook: str, cell: int | None, message: str, output: Path | None = None) -> None:
        self.notebook, self.cell, self.output = notebook, cell, output
        where = f"failed at cell {cell}" if cell is not None else "was not started"
        super().__init__(f"notebook {notebook} {where}: {message}" + (f" (executed copy: {output})" if output else ""))



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
    if isinstance(default, (list, tuple)) and default and all(isinstance(x, str) for x in default):
        listed = "a list of words such as " + repr(list(default)[:2])
        if isinstance(value, str):  # -p concepts Volcano: one bare word where a list of words goes
            return (f"parameter {name!r} takes {listed}; got the single word {value!r}: write it as a list, "
                    f"-p {name} \"['{value}']\"")
        kinds = [((list, tuple), (list, tuple), listed)]
    else:
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



def model_cached(model: str) -> bool:
    """Whether an embedded model's converted weights are in the cache already (a warm start)."""
    from introspection_utils.models import embedded

    folder = embedded.cache_dir() / "models"
    return model not in embedded.EMBEDDED or (folder.is_dir() and any(p.name.startswith(f"{model}-")
                                                                       for p in folder.iterdir()))


def default_model() -> str:
    from introspection_utils.models.embedded import DEFAULT_MODEL

    return DEFAULT_MODEL



LAYER_PARAMETERS = ("layer", "layers", "later_layer", "strength_layers")  # notebook parameters that index layers
WORD_PARAMETERS = ("concept", "concepts", "strength_concepts")  # notebook parameters that name concepts


def check_parameters(notebook: str, parameters: Mapping[str, Any], declared: Mapping[str, Mapping[str, Any]]) -> None:
    """The one check of a notebook's parameters, for the runner (each notebook of a plan) and the explorer (before
    Voilà starts): each name declared by the notebook's ``parameters`` cell, each value of its default's type and
    carried by JSON, each concept a word or a short phrase. A :class:`NotebookError` naming the notebook."""
    from introspection_utils.core.data import validate_concept

    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise NotebookError(notebook, None, f"unknown parameter(s) {unknown}; it declares {sorted(declared)}")
    for name, value in parameters.items():
        problem = _type_error(name, value, declared[name])
        if problem:
            raise NotebookError(notebook, None, problem)
        if name in WORD_PARAMETERS and value is not None:
            for word in (value if isinstance(value, (list, tuple)) else [value]):
                try:
                    validate_concept(word)
                except ValueError as err:
                    raise NotebookError(notebook, None, f"parameter {name!r}: {err}") from None
    try:
        json.dumps(dict(parameters))
    except TypeError as err:
        raise NotebookError(notebook, None, f"parameters must be JSON literals (numbers, strings, lists, None): "
                                            f"{err}") from None


def check_model(model: str, parameters: Mapping[str, Any] = {}) -> str:  # noqa: B006 (read only)
    """The model a run names, checked before any kernel starts: known to ``load_model`` (with "did you mean"), a hub
    id in the local cache or the hub reachable, and every layer parameter within its depth (read from its config,
    where that needs no weights). Returns the name as ``load_model`` takes it; a ``ValueError`` otherwise."""
    from introspection_utils.models.handle import check_layer_index
    from introspection_utils.models.names import hub_offline_check, is_hub_id, layer_count, resolve_name

    name = resolve_name(model)
    if is_hub_id(name):
        hub_offline_check(name)
    layers = {k: v for k, v in parameters.items() if k in LAYER_PARAMETERS and v is not None}
    depth = layer_count(name) if layers else None
    for key, value in layers.items() if depth is not None else ():
        for layer in value if isinstance(value, (list, tuple)) else [value]:
            try:
                check_layer_index(layer, depth, name)
            except ValueError as err:
                raise ValueError(f"parameter {key!r}: {err}") from None
    return name


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
        check_parameters(path.name, params, declared)
        plans.append((path, params))
    for model in dict.fromkeys(str(p["model"]) for _, p in plans if p.get("model")):
        check_model(model, {k: [v for _, p in plans if p.get("model") == model and p.get(k) is not None
                                for v in (p[k] if isinstance(p[k], (list, tuple)) else [p[k]])]
                            for k in LAYER_PARAMETERS})
    return plans



def code_hash() -> str:
    """A hash of the package's source: a notebook done before a code change is not "done" after it."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]



def run_key(path: Path, parameters: Mapping[str, Any], code: str | None = None) -> str:
    """What a finished notebook was run with: its parameters, its own text and the package code."""
    notebook = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return content_hash({"parameters": {k: parameters[k] for k in sorted(parameters)}, "notebook": notebook,
                         "code": code or code_hash()})



def default_threads() -> int:
    """CPU threads for each kernel: the CPUs this process may use that are idle now (at least 1), so a shared or
    busy machine is not oversubscribed. "Now" is a 0.5 s sample of ``/proc/stat`` where there is one (the 1-minute
    load average lags: just after an install it still counts the install); elsewhere the load average."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = _busy_cpus()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
    return max(1, min(cpus, round(cpus - busy)))


def _busy_cpus(seconds: float = 0.5) -> float | None:
    """How many CPUs were busy over the last ``seconds`` (from ``/proc/stat``), or ``None`` where it can't be read."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0))


def read_full_size(path: Path = FULL_SIZE) -> dict[str, dict[str, Any]]:
    """The full-size parameters (``--full``), one table per notebook prefix."""
    tables = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    if not all(isinstance(v, dict) for v in tables.values()):
        raise ValueError(f"{path}: only [\"NN\"] tables of parameters")
    return tables



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

