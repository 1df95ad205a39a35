"""The runner's timing record: each notebook's wall time with the 1-minute load average when it started and when it
finished, and the dtype its model loaded in (``timings.csv``; no kernel here: papermill is a stand-in)."""

from __future__ import annotations

import csv

import nbformat
import papermill
import pytest

from introspection_utils.apps.runner import documents, execute
from introspection_utils.apps.runner.checks import notebooks
from introspection_utils.engine import throughput
from introspection_utils.models import handle as models


@pytest.fixture
def scale_sweep():
    return next(p for p in notebooks() if p.name.startswith("02_"))


def test_the_dtype_recorded_is_the_one_load_model_picks(scale_sweep, monkeypatch, tmp_path):
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert execute.notebook_dtype(scale_sweep, {"dtype": "auto"}) == "bfloat16"
    assert execute.notebook_dtype(scale_sweep, {"dtype": "float32"}) == "float32"
    assert execute.notebook_dtype(scale_sweep, {}) == "float32"  # the notebook's default, None: float32 on a CPU
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx2"})
    assert execute.notebook_dtype(scale_sweep, {"dtype": "auto"}) == "float32"
    plain = tmp_path / "99_plain.ipynb"  # a notebook without a dtype parameter
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("model = 'x'", metadata={"tags": ["parameters"]})],
                                  metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                             "language": "python"}})
    nbformat.write(nb, plain)
    assert execute.notebook_dtype(plain, {}) == ""


def test_a_run_records_the_load_at_start_and_end_and_its_dtype(scale_sweep, monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda source, output, **kwargs: ran.append(output))
    loads = iter([1.25, 3.5])
    monkeypatch.setattr(throughput, "load_average", lambda: next(loads))  # the runner imports it when it runs
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)
    timings = tmp_path / "timings.csv"
    records = execute.run_notebooks([scale_sweep], tmp_path / "out", {"model": "tiny-llama", "dtype": "auto"},
                                    timings=timings, model="tiny-llama")
    assert ran == [str(tmp_path / "out" / scale_sweep.name)]
    record = records[0]
    assert (record.load_start, record.load_end, record.dtype) == (1.25, 3.5, "bfloat16") and record.key
    with open(timings, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == execute.TIMINGS_HEADER
    assert rows[0]["dtype"] == "bfloat16" and rows[0]["load_start"] == "1.25" and rows[0]["load_avg"] == "3.50"
    assert rows[0]["notebook"] == scale_sweep.name and rows[0]["key"] == record.key


def test_rows_written_before_the_new_columns_are_kept(tmp_path):
    path = tmp_path / "timings.csv"
    path.write_text("model,notebook,seconds,cpus,omp_num_threads,load_avg,key\nm,11_atlas.ipynb,600.0,2,,1.60,k\n")
    execute.write_timings([execute.RunRecord("02_scale_sweep.ipynb", tmp_path, 7.0, dtype="float32", load_start=0.5,
                                             load_end=0.75)], path, "m")
    with open(path, newline="") as f:
        rows = {r["notebook"]: r for r in csv.DictReader(f)}
    assert rows["11_atlas.ipynb"]["seconds"] == "600.0" and rows["11_atlas.ipynb"]["load_avg"] == "1.60"
    assert rows["11_atlas.ipynb"]["dtype"] == "" and rows["11_atlas.ipynb"]["load_start"] == ""
    assert (rows["02_scale_sweep.ipynb"]["dtype"], rows["02_scale_sweep.ipynb"]["load_start"],
            rows["02_scale_sweep.ipynb"]["load_avg"]) == ("float32", "0.50", "0.75")


def test_the_timings_table_shows_the_dtype_and_the_load_at_start_and_old_rows_as_unknown(tmp_path):
    path = tmp_path / "timings.csv"
    path.write_text("model,notebook,seconds,cpus,omp_num_threads,load_avg,key\nm,11_atlas.ipynb,600.0,2,1,1.60,k\n")
    execute.write_timings([execute.RunRecord("02_scale_sweep.ipynb", tmp_path, 7.0, dtype="bfloat16", load_start=0.5,
                                             load_end=0.75)], path, "m")
    table = documents.timings_markdown(path)
    head, rule, *rows = table.split("\n\n")[0].splitlines()
    assert head == "| notebook | wall time | dtype | load average at its start | at its end |"
    assert rule.count("|") == head.count("|")
    assert rows == ["| `02_scale_sweep.ipynb` | 7 s | bfloat16 | 0.50 | 0.75 |",
                    "| `11_atlas.ipynb` | 600 s | unknown | unknown | 1.60 |"]
    assert "10.1 min for 2 notebooks of `m` in bfloat16, unknown on 2 CPU(s)" in table
    old = tmp_path / "old.csv"  # a file written before the runner kept either column, never rewritten since
    old.write_text("model,notebook,seconds,cpus,omp_num_threads,load_avg,key\nm,11_atlas.ipynb,600.0,2,1,1.60,k\n")
    assert "| `11_atlas.ipynb` | 600 s | unknown | unknown | 1.60 |" in documents.timings_markdown(old)
