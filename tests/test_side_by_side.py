"""The runner's ``--jobs``: notebooks side by side, in series order, a reader after what it reads, the first failure
starting nothing new, and the same records and timings as one at a time (no kernel: the notebooks are stand-ins)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from introspection_utils.apps.runner import cli as run
from introspection_utils.apps.runner import execute as run_execute
from introspection_utils.apps.runner.kernels import AFTER, default_jobs, run_side_by_side


class Recorder:
    """Stand-in notebooks: each records when it starts and ends and how many ran at once."""

    def __init__(self, seconds: dict[str, float] | None = None, fail: str | None = None) -> None:
        self.seconds, self.fail = seconds or {}, fail
        self.events: list[tuple[str, str]] = []
        self.now = self.most = 0
        self.lock = threading.Lock()

    def task(self, name: str):
        def go() -> str:
            with self.lock:
                self.events.append(("start", name))
                self.now += 1
                self.most = max(self.most, self.now)
            time.sleep(self.seconds.get(name, 0.05))
            with self.lock:
                self.now -= 1
                self.events.append(("end", name))
            if name == self.fail:
                raise RuntimeError(f"{name} failed")
            return name.upper()
        return name, go


def test_results_in_series_order_and_at_most_jobs_at_once():
    rec = Recorder({"00_a": 0.2})
    names = ["00_a", "01_b", "02_c", "03_d", "05_e"]
    done = []
    out = run_side_by_side([rec.task(n) for n in names], 2, on_done=lambda name, result: done.append(name))
    assert out == [n.upper() for n in names]
    assert rec.most == 2
    assert sorted(done) == names
    starts = [n for kind, n in rec.events if kind == "start"]
    assert starts == names  # started in series order
    assert done[0] != "00_a"  # the long first one did not hold the others back


def test_a_reader_starts_after_what_it_reads():
    assert AFTER["04"] == ("02",)
    rec = Recorder({"02_sweep": 0.3})
    run_side_by_side([rec.task(n) for n in ["02_sweep", "03_layers", "04_lens", "05_heads"]], 3)
    assert rec.events.index(("start", "04_lens")) > rec.events.index(("end", "02_sweep"))
    # 05 does not wait for 02: it started before 02 ended
    assert rec.events.index(("start", "05_heads")) < rec.events.index(("end", "02_sweep"))
    # without 02 in the series, 04 does not wait for anything
    rec = Recorder()
    assert run_side_by_side([rec.task(n) for n in ["04_lens", "05_heads"]], 2) == ["04_LENS", "05_HEADS"]


def test_the_first_failure_starts_nothing_new_and_is_raised():
    rec = Recorder({"00_a": 0.3, "01_b": 0.05}, fail="01_b")
    with pytest.raises(RuntimeError, match="01_b failed"):
        run_side_by_side([rec.task(n) for n in ["00_a", "01_b", "02_c", "03_d"]], 2)
    started = {n for kind, n in rec.events if kind == "start"}
    assert started == {"00_a", "01_b"}  # 02 and 03 never started
    assert ("end", "00_a") in rec.events  # the one already running finished


def test_jobs_must_be_positive_and_default_to_one_for_large_models():
    with pytest.raises(ValueError, match="jobs must be >= 1, got 0"):
        run_side_by_side([], 0)
    assert default_jobs("smollm2-135m-instruct", ["smollm2-135m-instruct"], 2) == 2
    assert default_jobs("smollm2-135m-instruct", ["smollm2-135m-instruct"], 0) == 1
    assert default_jobs("google/gemma-2-9b-it", ["smollm2-135m-instruct"], 16) == 1


def test_run_notebooks_side_by_side_keeps_records_and_timings(tmp_path, monkeypatch):
    """``run_notebooks(jobs=2)`` with papermill replaced: every notebook ran once, each timing row written, the
    records the same as one at a time."""
    calls = []

    def fake(path: Path, output_dir: Path, params, *, kernel=None, timeout=None, variant=None, warm=None):
        calls.append(path.name)
        time.sleep(0.05)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / path.name).write_text("{}")
        return run.RunRecord(path.name, output_dir / path.name, 0.05)

    monkeypatch.setattr(run_execute, "run_notebook", fake)  # what run_notebooks calls
    paths = run.notebooks(["01", "02", "03", "04"])
    params = {"model": "smollm2-135m-instruct"}
    both = {}
    for jobs in (1, 2):
        calls.clear()
        timings = tmp_path / f"timings{jobs}.csv"
        records = run.run_notebooks(paths, tmp_path / f"out{jobs}", params, timings=timings, model=params["model"],
                                    jobs=jobs)
        assert sorted(calls) == sorted(p.name for p in paths)
        both[jobs] = sorted(r.notebook for r in records), [line.split(",")[1] for line in
                                                          timings.read_text().splitlines()[1:]]
        assert calls.index("04_logit_lens.ipynb") > calls.index("02_scale_sweep.ipynb")
    assert both[1] == both[2]


def test_jobs_is_checked_before_anything_runs(capsys):
    assert pytest.raises(SystemExit, run.main, ["--all", "--jobs", "0"]).value.code == 2
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err


def test_the_series_time_is_recorded_cold_and_warm_and_written_into_the_docs(tmp_path, monkeypatch):
    folder = tmp_path / "runs" / "smollm2-135m-instruct"
    run.write_timings([run.RunRecord("00_quickstart.ipynb", folder, 20.0),
                       run.RunRecord("01_concept_vectors.ipynb", folder, 30.0)], folder / "timings.csv",
                      "smollm2-135m-instruct")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run.write_series_time(folder / "series.json", cold=True, seconds=200.0, jobs=2, notebooks=2)
    run.write_series_time(folder / "series.json", cold=False, seconds=90.0, jobs=2, notebooks=2)
    line = run.series_markdown(folder / "series.json")
    assert line.startswith("`make demo` took 3.3 min cold") and "1.5 min warm" in line
    assert "2 notebooks 2 at a time with 1 thread(s) each" in line
    # the CPU's kind says how far the time carries to another machine (bf16 instructions or not: several times)
    from introspection_utils.engine.throughput import bf16_flags, device_name
    assert line.count(f"({device_name('cpu')}; bf16 instructions: {bf16_flags()})") == 1  # both runs' CPU, once
    assert line.endswith(f"; both 2 notebooks 2 at a time with 1 thread(s) each on {os.cpu_count()} CPU(s) "
                         f"({device_name('cpu')}; bf16 instructions: {bf16_flags()}).")
    record = json.loads((folder / "series.json").read_text())
    record["warm"]["jobs"] = 1  # runs that differ: each says its own
    (tmp_path / "differing.json").write_text(json.dumps(record))
    assert run.series_markdown(tmp_path / "differing.json").count("bf16 instructions") == 2
    docs, readme = tmp_path / "notebooks.md", tmp_path / "README.md"
    docs.write_text("a\n<!-- timings:start -->\nold\n<!-- timings:end -->\nb\n")
    readme.write_text("c\n<!-- demo_time:start -->\nold\n<!-- demo_time:end -->\nd\n")
    monkeypatch.chdir(tmp_path)
    assert run.main(["--write-times", str(docs), str(readme)]) == 0
    table = docs.read_text()
    assert "| `00_quickstart.ipynb` | 20 s |" in table and line in table and "add up to 0.8 min" in table
    assert readme.read_text() == f"c\n<!-- demo_time:start -->\n{line}\n<!-- demo_time:end -->\nd\n"


def test_a_notebook_in_a_used_warm_kernel_saves_what_a_fresh_kernel_saves(tmp_path, monkeypatch):
    """Warm kernels (make demo) are put back to how they started between notebooks: 02 run after 01 and 03 in the
    same kernel saves byte-identical tables and figures to 02 run alone in a new kernel."""
    from introspection_utils.apps.runner import kernels as side_by_side

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    started = []

    class Counted(side_by_side.WarmKernel):
        def __init__(self, *args, **kwargs):
            started.append(self)
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(side_by_side, "WarmKernel", Counted)
    _, common, per_notebook = run.read_findings(Path(__file__).parent / "tiny_findings.toml")
    saved = {}
    for how, selection, reuse in (("fresh", ["02"], False), ("warm", ["01", "03", "02"], True)):
        folder = tmp_path / how
        params = {"model": "tiny-llama", **common, "figures_dir": str(folder / "figures"),
                  "results_dir": str(folder / "results")}
        paths = [run.notebooks([n])[0] for n in selection]
        records = run.run_notebooks(paths, folder / "out", params, per_notebook=per_notebook,
                                    reuse_kernels=reuse)
        assert [r.notebook[:2] for r in records] == selection
        kept = [p for p in folder.rglob("*") if p.name.startswith("02_") and p.suffix == ".png"
                or p.name == "scale_sweep.csv"]
        saved[how] = {p.relative_to(folder): p.read_bytes() for p in kept}
    assert len(started) == 1  # the three warm notebooks ran in one kernel
    assert saved["fresh"] and saved["fresh"] == saved["warm"]
    executed = json.loads((tmp_path / "warm" / "out" / "02_scale_sweep.ipynb").read_text())
    counts = [c.get("execution_count") for c in executed["cells"] if c["cell_type"] == "code"]
    assert counts[0] == 1  # the used kernel's count was reset too
