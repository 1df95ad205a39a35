"""The runner's science run from a findings file (``run --findings FILE``, ``make findings``): its parameters and
variants checked, then every notebook run under ``figures/<model>/``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from introspection_utils.apps.runner.checks import FIGURES_DIR, RUNNER_PLACED, notebooks, plan_runs, resolve_model
from introspection_utils.apps.runner.execute import DEFAULT_CELL_TIMEOUT, RunRecord, run_notebooks
from introspection_utils.core.data import tomllib
from introspection_utils.core.paths import model_name


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
                 force: bool = True, timeout: int | None = DEFAULT_CELL_TIMEOUT, jobs: int = 1) -> list[RunRecord]:
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
                                timings=folder / "timings.csv", model=model, skip_done=not force, timeout=timeout,
                                jobs=jobs)
    for prefix, name, extra in variants:
        records += run_notebooks(notebooks([prefix]), folder / "notebooks", params, per_notebook={prefix: extra},
                                 kernel=kernel, timings=folder / "timings.csv", model=model, skip_done=not force,
                                 timeout=timeout, variant=name)
    (folder / "findings.json").write_text(json.dumps(
        {"findings_file": Path(path).name, "model": model, "all": common, "notebooks": per_notebook}, indent=1) + "\n")
    return records

