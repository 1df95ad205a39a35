"""The benchmark script runs both ways in one run and writes its dated measurement into a docs block (on tiny-llama:
a check of the script, not a timing)."""

from __future__ import annotations

import pytest

from introspection_utils.apps import bench
from introspection_utils.core.paths import project_root, read_block


def test_bench_runs_both_ways_in_both_dtypes_and_writes_its_readme_block(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- bench:start -->\nold\n<!-- bench:end -->\nafter\n")
    bench.main(["--model", "tiny-llama", "--naive-trials", "8", "--trials", "176", "--peak-size", "256",
                "--device", "cpu", "--readme", str(readme)])
    out = capsys.readouterr().out
    assert "model tiny-llama on cpu" in out
    for dtype in ("float32", "bfloat16"):
        assert f"[{dtype}] ratio :" in out and f"[{dtype}] max |engine - naive| over 8 trials" in out
        assert f"of the measured {dtype} matmul peak" in out
        diff = float(out.split(f"[{dtype}] max |engine - naive| over 8 trials: ")[1].split()[0])
        assert diff < 1e-4  # the engine and the naive trace agree in each dtype (same float32 readout)
    cross = out.split("bf16 engine vs fp32 engine: ")[1]
    assert "same sign on" in cross and float(cross.split("max ")[1].split(",")[0]) < 0.1
    block = read_block(readme, "bench")
    assert block.startswith("| tiny-llama, layer 1, 176 trials | trials/s |")
    assert "**engine, float32**" in block and "**engine, bfloat16**" in block and "bf16 engine vs fp32" in block
    assert "(8 spread trials timed, extrapolated)" in block and "load average" in block and "bf16 CPU flags" in block
    assert "`python -m introspection_utils.bench --model tiny-llama --naive-trials 8 --trials 176" in block
    assert "--device cpu" in block
    assert readme.read_text().endswith("after\n")


def test_bench_refuses_bad_dtypes_and_too_few_trials():
    with pytest.raises(ValueError, match="--dtypes 'int8'"):
        bench.main(["--model", "tiny-llama", "--dtypes", "int8"])
    with pytest.raises(ValueError, match="--trials 3 is too few"):
        bench.main(["--model", "tiny-llama", "--trials", "3"])


def test_without_cuda_the_gpu_benchmark_says_why_it_skipped(capsys, monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    bench.main(["--model", "random:gemma-2-9b-it"])
    assert capsys.readouterr().out.startswith("skipped: random:gemma-2-9b-it")


def test_the_benchmark_doc_holds_a_measurement_written_by_the_script():
    block = read_block(project_root() / bench.BENCH_DOC, "bench")
    assert block.startswith("| smollm2-135m-instruct, layer 15, "), \
        f"run `python -m introspection_utils.bench --naive-trials 44 --readme {bench.BENCH_DOC}` on a quiet machine"
    assert "**engine, float32**" in block and "**engine, bfloat16**" in block and "bf16 engine vs fp32" in block
    assert "written by `python -m introspection_utils.bench" in block


def test_the_gpu_and_amx_blocks_hold_measurements_written_by_the_script():
    """Measured once on a lent H200 machine (docs/benchmark.md says how); rerun there to update."""
    doc = project_root() / bench.BENCH_DOC
    gpu, amx = read_block(doc, "bench-gpu"), read_block(doc, "bench-amx")
    assert gpu.startswith("| random:gemma-2-9b-it, layer 21, 880 trials |") and "on NVIDIA " in gpu
    assert "**engine, bfloat16**" in gpu and ", GPU " in gpu
    assert "written by `python -m introspection_utils.bench" in gpu
    assert amx.startswith("| random:qwen2.5-coder-1.5b-instruct, layer 14, ") and "bf16 CPU flags: amx_bf16" in amx
    assert "--device cpu" in amx and "bf16 engine vs fp32 engine" in amx
