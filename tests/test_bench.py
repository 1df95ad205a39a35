"""The benchmark script runs both ways in one run and writes its dated measurement into a README block (on tiny-llama:
a check of the script, not a timing)."""

from __future__ import annotations

from introspection_utils import bench
from introspection_utils.paths import project_root, read_block


def test_bench_runs_both_ways_and_writes_its_readme_block(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- bench:start -->\nold\n<!-- bench:end -->\nafter\n")
    bench.main(["--model", "tiny-llama", "--naive-trials", "8", "--readme", str(readme)])
    out = capsys.readouterr().out
    assert "ratio :" in out and "max |engine - naive| over 8 trials" in out
    diff = float(out.split("max |engine - naive| over 8 trials: ")[1].split()[0])
    assert diff < 1e-4  # the engine and the naive trace agree
    block = read_block(readme, "bench")
    assert block.startswith("| tiny-llama, layer 1 | trials/s | 880 trials |") and "**Ratio " in block
    assert "(8 spread trials timed, extrapolated)" in block and "load average" in block
    assert readme.read_text().endswith("after\n")


def test_without_cuda_the_gpu_benchmark_says_why_it_skipped(capsys, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    bench.main(["--model", "random:gemma-2-9b-it"])
    assert capsys.readouterr().out.startswith("skipped: random:gemma-2-9b-it")


def test_the_readme_holds_a_measurement_written_by_the_script():
    block = read_block(project_root() / "README.md", "bench")
    assert block.startswith("| smollm2-135m-instruct, layer 15 | trials/s | 880 trials |"), \
        "run `python -m introspection_utils.bench --naive-trials 220 --readme README.md` on a quiet machine"
    assert "written by `python -m introspection_utils.bench" in block
