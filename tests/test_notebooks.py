"""The notebook series: committed clean (a tagged parameters cell first, no outputs), runnable through the runner
with overridden parameters, and failing loudly (notebook and cell named) when a cell fails.

Executing every notebook on the embedded model is nbval's job: ``pytest --nbval-lax notebooks/`` (``make test``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from introspection_utils import run

ROOT = Path(__file__).resolve().parent.parent
ALL_NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# The experiment series 00–06 (later numbers and the explorer app are checked by the rules that apply to all).
SERIES = [p for p in ALL_NOTEBOOKS if p.name[:2] in {f"{i:02d}" for i in range(7)}]
COMMON_PARAMETERS = {"model", "figures_dir"}  # every series notebook loads a model and saves figures


def test_the_series_00_to_06_is_complete():
    assert [p.name[:2] for p in SERIES] == [f"{i:02d}" for i in range(7)]


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_opens_with_markdown_then_a_tagged_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "title first"
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first_code.metadata.get("tags", []), f"{path.name}: first code cell must be tagged"
    assert 'model = "smollm2-135m-instruct"' in first_code.source, "the embedded model is the default"


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
    assert run.parse_value("true") is True


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
           "-p", "figures_dir", str(tmp / "figs"), "-p", "results_dir", str(tmp / "results"),
           "--output", str(tmp / "runs")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    return tmp, proc


def test_runner_executes_a_notebook_with_overridden_parameters(tiny_run):
    tmp, proc = tiny_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    executed = tmp / "runs" / "tiny-llama" / "02_scale_sweep.ipynb"
    assert executed.is_file()
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


def test_make_test_runs_the_notebooks_through_nbval():
    makefile = (ROOT / "Makefile").read_text()
    test_target = makefile.split("\ntest:")[1].split("\n\n")[0]
    assert "--nbval-lax notebooks/" in test_target
    demo_target = makefile.split("\ndemo:")[1].split("\n\n")[0]
    assert "introspection_utils.run --all" in demo_target


@pytest.mark.skipif(shutil.which("jupyter") is None and not (Path(sys.executable).parent / "jupyter").exists(),
                    reason="jupyter not installed")
def test_kernel_is_available():
    from jupyter_client.kernelspec import KernelSpecManager

    assert "python3" in KernelSpecManager().find_kernel_specs()


def test_timings_keep_the_notebooks_not_rerun(tmp_path):
    path = tmp_path / "timings.csv"
    run.write_timings([run.RunRecord("02_scale_sweep.ipynb", tmp_path, 12.34),
                       run.RunRecord("11_atlas.ipynb", tmp_path, 600.0)], path, "m")
    run.write_timings([run.RunRecord("02_scale_sweep.ipynb", tmp_path, 7.0)], path, "m")
    lines = path.read_text().splitlines()
    assert lines[0] == "model,notebook,seconds,cpus,omp_num_threads" and len(lines) == 3
    assert lines[1].startswith("m,02_scale_sweep.ipynb,7.0,") and lines[2].startswith("m,11_atlas.ipynb,600.0,")
