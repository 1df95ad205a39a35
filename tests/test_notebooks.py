"""The notebook series: committed clean (a tagged parameters cell first, no outputs), runnable through the runner
with overridden parameters, and failing loudly (notebook and cell named) when a cell fails.

Executing every notebook on the embedded model is nbval's job: ``pytest --nbval-lax notebooks/`` (``make test``).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from introspection_utils.apps.runner import cli as run
from introspection_utils.core.data import load_list
from introspection_utils.models import embedded

ROOT = Path(__file__).resolve().parent.parent
ALL_NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# The experiment series 00–06 (later numbers and the explorer app are checked by the rules that apply to all).
SERIES = [p for p in ALL_NOTEBOOKS if p.name[:2] in {f"{i:02d}" for i in range(7)}]
COMMON_PARAMETERS = {"model", "figures_dir"}  # every series notebook loads a model and saves figures
SERIES_ALL = [p for p in ALL_NOTEBOOKS if p.name[:2].isdigit()]
QWEN_FINDINGS = ROOT / "data" / "findings" / "qwen2.5-coder-1.5b-instruct.toml"
TINY_FINDINGS = ROOT / "tests" / "tiny_findings.toml"


def test_the_series_00_to_06_is_complete():
    assert [p.name[:2] for p in SERIES] == [f"{i:02d}" for i in range(7)]


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_opens_with_markdown_then_a_tagged_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "title first"
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first_code.metadata.get("tags", []), f"{path.name}: first code cell must be tagged"
    assert 'model = "smollm2-135m-instruct"' in first_code.source, "the embedded model is the default"


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.stem)
def test_every_assignment_in_the_parameters_cell_is_a_parameter_papermill_sees(path):
    """papermill skips a line it cannot parse (e.g. a comment holding '='): that parameter then cannot be set."""
    first_code = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    assigned = {t.id for node in ast.parse(first_code.source).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    assert assigned == set(run.declared_parameters(path))


@pytest.mark.parametrize("path", SERIES, ids=lambda p: p.stem)
def test_series_notebook_declares_the_common_parameters(path):
    declared = set(run.declared_parameters(path))
    assert COMMON_PARAMETERS <= declared, f"{path.name} lacks {COMMON_PARAMETERS - declared}"


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.stem)
def test_every_declared_parameter_is_used(path):
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells
                     if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", []))
    unused = [name for name in run.declared_parameters(path) if not re.search(rf"\b{name}\b", code)]
    assert not unused, f"{path.name} declares parameters it never uses: {unused}"


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    raw = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(raw["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name} has outputs in cells {dirty}: strip them with "
                       f"`python -m introspection_utils.run --strip`")


@pytest.mark.parametrize("path", SERIES, ids=lambda p: p.stem)
def test_notebook_says_the_embedded_model_is_not_evidence(path):
    text = " ".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
    assert "not evidence" in text and "gemma-2-9b-it" in text


def test_parse_value_reads_literals_and_keeps_bare_words():
    assert run.parse_value("[0, 2, 4]") == [0, 2, 4]
    assert run.parse_value("3") == 3 and run.parse_value("None") is None
    assert run.parse_value("'Sandwich'") == "Sandwich" and run.parse_value("Sandwich") == "Sandwich"
    assert run.parse_value("true") is True and run.parse_value("google/gemma-2-9b-it") == "google/gemma-2-9b-it"


@pytest.mark.parametrize("text", ["[0,2,", "'Sandwich", "{1:", "1e", "(1, 2"])
def test_parse_value_refuses_a_broken_literal_naming_the_parameter(text):
    with pytest.raises(ValueError, match=r"parameter 'scales': .* is not a Python/JSON literal"):
        run.parse_value(text, "scales")


def test_unknown_parameter_is_an_error_before_anything_runs(tmp_path):
    with pytest.raises(run.NotebookError, match=r"02_scale_sweep.*unknown parameter\(s\) \['colour'\]"):
        run.run_series(["02"], model="tiny-llama", parameters={"colour": 1}, output=tmp_path)
    assert not (tmp_path / "tiny-llama").exists()


def test_unknown_notebook_is_an_error():
    with pytest.raises(ValueError, match="matches 0 notebooks"):
        run.notebooks(["99"])


def test_strip_outputs_clears_outputs(tmp_path):
    path = tmp_path / "00_x.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1", execution_count=1, outputs=[
        nbformat.v4.new_output("stream", text="1")])])
    nbformat.write(nb, path)
    assert run.strip_outputs([path]) == [path]
    assert nbformat.read(path, as_version=4).cells[0].outputs == []
    assert run.strip_outputs([path]) == []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """02 executed by the CLI on tiny-llama with tiny parameters, figures and tables into a temporary folder."""
    tmp = tmp_path_factory.mktemp("run02")
    cmd = [sys.executable, "-m", "introspection_utils.run", "--model", "tiny-llama", "--notebooks", "02",
           "-p", "scales", "[0, 2, 4]", "-p", "concepts", "['Sandwich']", "-p", "n_controls", "2",
           "-p", "wordings", "['paper']", "-p", "figures_dir", str(tmp / "figs"),
           "-p", "results_dir", str(tmp / "results"),
           "--output", str(tmp / "runs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    return tmp, proc


def test_runner_executes_a_notebook_with_overridden_parameters(tiny_run):
    tmp, proc = tiny_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    executed, = (tmp / "runs" / "tiny-llama").glob("p-*/02_scale_sweep.ipynb")  # a run of its own: p-<hash>/
    assert "  02 cell 3/" in proc.stdout, "progress inside the notebook, cell by cell"
    assert "without encryption" not in proc.stdout + proc.stderr
    assert (tmp / "figs" / "02_scale_sweep.png").stat().st_size > 1000
    table = tmp / "results" / "scale_sweep.csv"
    assert table.is_file() and (tmp / "results" / "scale_sweep.meta.json").is_file()
    import pandas as pd

    df = pd.read_csv(table)
    assert sorted(df["scale"].unique()) == [0, 2, 4] and set(df["concept"]) == {"Sandwich"}
    assert set(df["model"]) == {"tiny-llama"} and df["question"].nunique() == 3
    text = executed.read_text()
    assert "Sandwich (layer 1)" in text  # the computed reading, at 2/3 of tiny-llama's 2 layers


def test_runner_names_the_notebook_and_cell_that_failed(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    nb = nbformat.read(SERIES[2], as_version=4)
    bad = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "scale_sweep(" in c.source)
    nb.cells[bad].source = "raise RuntimeError('boom')"
    path = folder / "02_scale_sweep.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(run.NotebookError, match=rf"02_scale_sweep.ipynb failed at cell {bad}: RuntimeError: boom"):
        run.run_notebook(path, tmp_path / "out", {"model": "tiny-llama", "scales": [0, 1]})


def test_cli_exits_non_zero_on_a_failing_notebook(tmp_path):
    code = run.main(["--model", "tiny-llama", "--notebooks", "02", "-p", "concepts", "['Sandwich']",
                     "-p", "scales", "[0, 1]", "-p", "layer", "99", "-p", "figures_dir", str(tmp_path / "f"),
                     "-p", "results_dir", str(tmp_path / "r"), "--output", str(tmp_path)])
    assert code != 0


FAKE_PYTHON = """#!/bin/sh
# Records how make called the venv's python (its arguments and OMP_NUM_THREADS), one line each; on the call numbered
# $DIRTY_ON it leaves a new file in the working tree, as a test that wrote into the checkout would.
n=$(( $(cat "$LOG" 2>/dev/null | wc -l) + 1 ))
echo "OMP=$OMP_NUM_THREADS $*" >> "$LOG"
if [ "$n" = "${DIRTY_ON:-0}" ]; then touch stray_output.png; fi
"""


def _make(target: str, tmp_path: Path, *variables: str, dirty_on: int = 0) -> tuple[int, list[str], str]:
    """Run ``make <target>`` of this Makefile in a scratch git checkout with the venv's python replaced by a recorder
    and the install steps taken as done: ``(exit code, the python calls it made, make's output)``."""
    if shutil.which("make") is None or shutil.which("git") is None:
        pytest.skip("make or git not installed")
    work = tmp_path / "checkout"
    work.mkdir()
    shutil.copy(ROOT / "Makefile", work / "Makefile")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    for cmd in (["git", "init", "-q"], ["git", "add", "Makefile"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "m"]):
        subprocess.run(cmd, cwd=work, check=True, capture_output=True)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MAKEFLAGS")}
    env |= {"LOG": str(log), "DIRTY_ON": str(dirty_on)}
    done = ["-o", "browser", "-o", ".venv/.installed", "-o", ".venv/.installed-qwen", "-o", ".venv/.installed-ray"]
    proc = subprocess.run(["make", "-s", *done, target, f"PY={fake}", *variables], cwd=work, env=env,
                          capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines() if log.is_file() else []
    return proc.returncode, calls, proc.stdout + proc.stderr


def test_make_test_runs_pytest_then_the_notebooks_through_nbval_one_thread_each(tmp_path):
    code, calls, out = _make("test", tmp_path)
    assert code == 0, out
    assert calls == ["OMP=1 -m pytest -q -n 2 --dist loadfile",
                     "OMP=1 -m pytest -q -n 2 --dist loadfile --nbval-lax notebooks/"]


def test_make_test_fails_when_the_tests_changed_the_working_tree(tmp_path):
    code, calls, out = _make("test", tmp_path, dirty_on=2)
    assert code != 0 and len(calls) == 2
    assert "the tests changed the working tree" in out and "stray_output.png" in out


def test_make_demo_and_make_findings_run_the_runner(tmp_path):
    (tmp_path / "demo").mkdir()
    code, calls, out = _make("demo", tmp_path / "demo", "FORCE=1")
    assert code == 0 and calls == ["OMP= -m introspection_utils.run --all --output runs/ --force"], out
    (tmp_path / "findings").mkdir()
    code, calls, out = _make("findings", tmp_path / "findings", "NOTEBOOKS=02 04")
    assert code == 0, out
    assert calls == ["OMP= -m introspection_utils.run --findings data/findings/qwen2.5-coder-1.5b-instruct.toml "
                     "--notebooks-only 02 04"]


@pytest.mark.skipif(shutil.which("jupyter") is None and not (Path(sys.executable).parent / "jupyter").exists(),
                    reason="jupyter not installed")
def test_kernel_is_available():
    from jupyter_client.kernelspec import KernelSpecManager

    assert "python3" in KernelSpecManager().find_kernel_specs()


# ------------------------------------------------------------------ figures that stay true, notebooks that run alone


@pytest.mark.parametrize("path", SERIES_ALL, ids=lambda p: p.stem)
def test_notebook_saves_figures_through_the_helper_that_honours_figures_dir(path):
    """Run by hand or by nbval (``figures_dir = None``) a notebook only shows its figures: it saves each one through
    ``saving.save_notebook_figure`` (which writes nothing without a folder; tests/test_plots.py) with the notebook's
    ``figures_dir``, never through ``save_figure`` itself."""
    trees = [ast.parse(c.source) for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    assert any(isinstance(n, ast.Assign) and n.targets[0].id == "figures_dir" and n.value.value is None
               for n in trees[0].body if isinstance(n, ast.Assign)), "figures_dir = None by default"
    calls = [n for t in trees for n in ast.walk(t) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    helper = [c for c in calls if c.func.attr == "save_notebook_figure"]
    assert helper and not [c for c in calls if c.func.attr == "save_figure"]
    assert all(isinstance(c.args[3], ast.Name) and c.args[3].id == "figures_dir" for c in helper)


def test_qwen_findings_parameters_are_declared_and_the_atlas_covers_all_50_concepts():
    model, common, per_notebook = run.read_findings(QWEN_FINDINGS)
    assert model == "qwen2.5-coder-1.5b-instruct"
    base, variants = run.split_variants(per_notebook)
    plans = dict(run.plan_runs(run.notebooks(), {"model": model, **common}, base))  # raises if undeclared
    atlas = plans[next(p for p in plans if p.name.startswith("11"))]
    assert set(load_list("concept_words")) <= set(atlas["concepts"]) and len(load_list("concept_words")) == 50
    assert set(base) == {p.name[:2] for p in run.notebooks()}
    # the atlas in every answer format: the open turn's design on a subset of its concepts (the write-up's cases in it)
    atlases = [(prefix, name, params) for prefix, name, params in variants if prefix == "11"]
    assert [(prefix, name, params["answer_format"]) for prefix, name, params in atlases] == [
        ("11", "binary", "binary"), ("11", "prefill", "prefill")]
    for _, _, params in atlases:
        assert {k: v for k, v in params.items() if k not in ("answer_format", "concepts")} == {
            k: v for k, v in base["11"].items() if k != "concepts"}
        assert {"Sandwich", "Water", "Bomb"} <= set(params["concepts"]) <= set(base["11"]["concepts"])
    # the organisms' introspector in float32: notebook 14's design but its dtype, its kinds and its evaluation's name;
    # trained on 235 concepts with a decaying learning rate: its recipe too (its steps and settings)
    organisms = {name: params for prefix, name, params in variants if prefix == "14"}
    assert list(organisms) == ["float32", "float32_extra_concepts"]
    for name, params in organisms.items():
        changed = {k for k in params.keys() | base["14"].keys() if params.get(k) != base["14"].get(k)}
        recipe = {"steps_by_kind", "settings_by_kind"} if name == "float32_extra_concepts" else set()
        assert changed == {"dtype", "kinds", "evaluation_name"} | recipe
        assert (params["dtype"], params["kinds"], params["evaluation_name"]) == (
            "float32", ["introspector"], f"organisms_{name}")
    introspector = organisms["float32_extra_concepts"]["settings_by_kind"]["introspector"]
    assert introspector == {**base["14"]["settings_by_kind"]["introspector"], "extra_concepts": True,
                            "decay_steps": 100}
    assert organisms["float32_extra_concepts"]["steps_by_kind"] == {"introspector": 400}
    for prefix, _, params in variants:
        run.plan_runs(run.notebooks([prefix]), {"model": model, **common}, {prefix: params})


def test_findings_variants_are_checked_and_named(tmp_path):
    assert run.variant_name(Path("11_atlas.ipynb"), "binary") == "11_atlas.binary.ipynb"
    assert run.variant_name(Path("11_atlas.ipynb")) == "11_atlas.ipynb"
    with pytest.raises(ValueError, match=r"needs a \['11'\] table"):
        run.split_variants({"11.binary": {"answer_format": "binary"}})
    with pytest.raises(ValueError, match="must be a word"):
        run.split_variants({"11": {}, "11.bin ary": {}})
    with pytest.raises(ValueError, match=r"no findings variant \['11.nope'\] in .*it has \['11.binary', '11.pre"):
        run.run_findings(QWEN_FINDINGS, ["11.nope"], root=tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "tiny-llama"\n["11"]\nn_concepts = 3\n["11.other"]\nanswer_format = 3\n')
    with pytest.raises(run.NotebookError, match="answer_format"):
        run.run_findings(bad, root=tmp_path)
    assert not (tmp_path / "tiny-llama" / "notebooks").exists()  # refused before any kernel started


def test_a_findings_run_bounds_no_cell_unless_told_to():
    """A series' cells are bounded by the default timeout; a findings run's are not (its full-size cells can run
    for hours on a CPU, and a cell stopped there loses what it had not saved); ``--cell-timeout`` decides either way
    (0: no bound)."""
    parse = run._parser().parse_args
    assert run.cell_timeout(parse(["--all"])) == run.DEFAULT_CELL_TIMEOUT
    assert run.cell_timeout(parse(["--findings", "findings.toml"])) is None
    assert run.cell_timeout(parse(["--findings", "findings.toml", "--cell-timeout", "60"])) == 60
    assert run.cell_timeout(parse(["--all", "--cell-timeout", "0"])) is None


def test_findings_parameters_for_an_unknown_notebook_or_parameter_are_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "tiny-llama"\n["42"]\nscales = [0]\n')
    with pytest.raises(ValueError, match=r"unknown notebook\(s\) \['42'\]"):
        run.run_findings(bad, root=tmp_path)
    bad.write_text('model = "tiny-llama"\n["02"]\ncolour = 1\n')
    with pytest.raises(run.NotebookError, match=r"02_scale_sweep.*unknown parameter\(s\) \['colour'\]"):
        run.run_findings(bad, root=tmp_path)
    assert not (tmp_path / "tiny-llama" / "notebooks").exists()


def _git_status() -> str | None:
    proc = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


@pytest.fixture(scope="module")
def alone_runs(tmp_path_factory):
    """Every notebook through the findings machinery on tiny-llama, each its own run (own results, figures and
    timings folders) against an empty cache folder (only the converted models are shared): what `--notebooks NN -p
    model <new model>` meets on a fresh machine. Two at a time (each kernel one thread), as `run --jobs 2` runs them:
    the kernels' start-up, not tiny-llama's compute, is what these runs spend their time on."""
    from concurrent.futures import ThreadPoolExecutor

    tmp = tmp_path_factory.mktemp("alone")
    cache = tmp / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(embedded.converted_smollm2_dir().parent, target_is_directory=True)
    saved = {k: os.environ.get(k) for k in ("INTROSPECTION_CACHE", "OMP_NUM_THREADS")}
    os.environ.update(INTROSPECTION_CACHE=str(cache), OMP_NUM_THREADS="1")  # inherited by the kernels
    before = _git_status()

    def alone(path: Path):
        try:
            return path, run.run_findings(TINY_FINDINGS, [path.name[:2]], root=tmp / path.stem), None
        except Exception as err:  # reported by the notebook's own test
            return path, None, err
    try:
        with ThreadPoolExecutor(2) as pool:
            outcomes = {path.name: (records, err) for path, records, err in pool.map(alone, SERIES_ALL)}
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    return tmp, outcomes, before, _git_status()


@pytest.mark.parametrize("path", SERIES_ALL, ids=lambda p: p.stem)
def test_each_notebook_runs_alone_first_on_an_unseen_model(path, alone_runs):
    tmp, outcomes, before, after = alone_runs
    records, err = outcomes[path.name]
    if err is not None:
        raise err
    folder = tmp / path.stem / "tiny-llama"
    assert [r.output for r in records] == [folder / "notebooks" / path.name] and records[0].output.is_file()
    assert list(folder.glob(f"{path.name[:2]}_*.png")), "the notebook saved no figure into figures_dir"
    timings = (folder / "timings.csv").read_text().splitlines()
    assert timings[0].startswith("model,notebook,seconds") and timings[1].startswith(f"tiny-llama,{path.name},")
    tables = {"05": "attention_top_heads.csv", "09": "sae_features.csv", "11": "atlas.csv"}
    if path.name[:2] in tables:  # 05 and 09 once wrote into a results folder they had not created
        assert (folder / "results" / tables[path.name[:2]]).is_file()
        assert (folder / "results" / tables[path.name[:2]]).with_suffix(".meta.json").is_file()  # model, seed, ...
    assert after == before, "the notebook runs changed the working tree"


def test_timings_keep_the_notebooks_not_rerun(tmp_path):
    path = tmp_path / "timings.csv"
    run.write_timings([run.RunRecord("02_scale_sweep.ipynb", tmp_path, 12.34),
                       run.RunRecord("11_atlas.ipynb", tmp_path, 600.0)], path, "m")
    run.write_timings([run.RunRecord("02_scale_sweep.ipynb", tmp_path, 7.0)], path, "m")
    lines = path.read_text().splitlines()
    assert lines[0] == "model,notebook,seconds,dtype,cpus,omp_num_threads,load_start,load_avg,key" and len(lines) == 3
    assert lines[1].startswith("m,02_scale_sweep.ipynb,7.0,") and lines[2].startswith("m,11_atlas.ipynb,600.0,")


def test_a_series_wide_parameter_goes_to_the_notebooks_that_declare_it():
    plans = dict(run.plan_runs(run.notebooks(), {"model": "tiny-llama", "n_controls": 20}))
    by_prefix = {path.name[:2]: params for path, params in plans.items()}
    assert by_prefix["02"]["n_controls"] == 20 and "n_controls" not in by_prefix["01"]
    with pytest.raises(run.NotebookError, match=r"unknown parameter\(s\) \['colour'\]"):
        run.plan_runs(run.notebooks(), {"model": "tiny-llama", "colour": 1})
