"""The benchmark script runs both ways in both dtypes and writes its dated measurement into a docs block; its peak
is the kernel the model's linears use; the atlas agreement and the training helpers compute what they say (on tiny
models: checks of the machinery, never of a speed)."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import torch

from introspection_utils.apps import bench, bench_agreement
from introspection_utils.core.paths import project_root, read_block
from introspection_utils.engine import throughput

PERCENT = re.compile(r"\((\d+)% of \d+\)")  # "(42% of 1728)": a useful rate against its peak


def test_bench_runs_both_ways_in_both_dtypes_and_writes_its_readme_block(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- bench:start -->\nold\n<!-- bench:end -->\nafter\n")
    bench.main(["--model", "tiny-llama", "--naive-trials", "8", "--trials", "176", "--peak-tokens", "256",
                "--device", "cpu", "--readme", str(readme)])
    out = capsys.readouterr().out
    assert "model tiny-llama on cpu" in out and 'dtype="auto" picks ' in out
    for dtype in ("float32", "bfloat16"):
        assert f"[{dtype}] ratio :" in out and f"[{dtype}] max |engine - naive| over 8 trials" in out
        assert f"of the measured {dtype} linear peak" in out
        diff = float(out.split(f"[{dtype}] max |engine - naive| over 8 trials: ")[1].split()[0])
        assert diff < 1e-4  # the engine and the naive trace agree in each dtype (same float32 readout)
    cross = out.split("bf16 engine vs fp32 engine: ")[1]
    assert "same sign on" in cross and float(cross.split("max ")[1].split(",")[0]) < 0.1
    block = read_block(readme, "bench")
    assert block.startswith("| tiny-llama, layer 1, 176 trials | trials/s |")
    assert "**engine, float32**" in block and "**engine, bfloat16**" in block and "bf16 engine vs fp32" in block
    assert "(8 spread trials timed, extrapolated)" in block and "bf16 CPU flags: " in block
    assert 'picks bfloat16 (' in block or 'picks float32 (' in block
    assert "load average " in block and " at the start, " in block and "the machine was " in block
    assert "`python -m introspection_utils.bench --model tiny-llama --naive-trials 8 --trials 176" in block
    assert "--peak-tokens 256 --device cpu" in block
    percents = [int(p) for p in PERCENT.findall(block)]
    assert len(percents) == 2 and all(p <= 100 for p in percents), block  # the peak is the linears' own kernel
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


# ------------------------------------------------------------------ the peak: F.linear on the model's shapes


def test_the_peak_times_f_linear_on_the_models_linear_weight_shapes(tiny_llama, monkeypatch):
    calls = []
    linear = torch.nn.functional.linear

    def recording(x, weight, bias=None):
        calls.append((tuple(x.shape), tuple(weight.shape), x.dtype, weight.dtype, bias is not None))
        return linear(x, weight, bias)

    monkeypatch.setattr(throughput.F, "linear", recording)
    peak = throughput.linear_peak_gflops(tiny_llama, tokens=32, seconds=0.0, rounds=1, dtype=torch.bfloat16)
    assert peak > 0
    layer = tiny_llama.torch_model.get_decoder().layers[0]
    modules = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    expected = [((32, m.in_features), tuple(m.weight.shape), torch.bfloat16, torch.bfloat16, m.bias is not None)
                for m in modules]
    assert len(modules) >= 7  # q, k, v, o, gate, up, down
    assert calls == expected * (len(calls) // len(expected)) and len(calls) == 2 * len(expected)  # warm-up + 1


def test_linear_flops_and_the_fraction_of_peak(tiny_llama):
    layer = tiny_llama.torch_model.get_decoder().layers[0]
    weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert throughput.layer_linear_params(tiny_llama) == weights
    assert throughput.linear_flops(tiny_llama, 100, 3) == 2 * weights * 100 * 3
    assert throughput.linear_flops(tiny_llama, 100, 3, passes=3) == 3 * throughput.linear_flops(tiny_llama, 100, 3)
    assert throughput.peak_fraction(tiny_llama, 5e9, 2.0, peak=10.0) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="seconds must be > 0"):
        throughput.peak_fraction(tiny_llama, 1.0, 0.0, peak=1.0)
    with pytest.raises(ValueError, match="passes > 0"):
        throughput.linear_flops(tiny_llama, 1, 1, passes=0)


def test_a_training_throughput_table_has_the_benchmark_blocks_format():
    rows = [throughput.Throughput("train, bfloat16", seconds=4.0, examples=32, tokens=2560, flops=8e11, peak=400.0)]
    table = throughput.throughput_table("qwen, layers 18–27, LoRA r 8", rows)
    head, rule, row = table.splitlines()
    assert head == ("| qwen, layers 18–27, LoRA r 8 | examples/s | tokens/s | wall | "
                    "useful GFLOP/s (of its linear peak) |")
    assert rule.count("|") == head.count("|")
    assert row == "| train, bfloat16 | 8.0 | 640 | 4.0 s | 200 (50% of 400) |"
    slow = throughput.Throughput("x", seconds=896.1, examples=32, tokens=5165, flops=1e13, peak=180.0)
    assert throughput.throughput_table("t", [slow]).splitlines()[2].startswith("| x | 0.036 | 6 | 896.1 s | 11 (6% ")


def test_the_machine_in_words():
    assert throughput.bf16_flags({"avx2", "amx_bf16", "avx512_bf16"}) == "amx_bf16, avx512_bf16"
    assert throughput.bf16_flags({"avx2"}) == "none (amx_bf16 / avx512_bf16 absent)"
    assert throughput.auto_dtype("cpu", {"avx512_bf16"}) == "bfloat16 (avx512_bf16 present)"
    assert throughput.auto_dtype("cpu", {"avx2"}).startswith("float32 (no bf16 instructions")
    assert "shared" in throughput.load_words(1.7, 2.9) and "quiet" in throughput.load_words(0.2, 1.1)
    assert throughput.load_words(0.2, 1.1).startswith("load average 0.20 at the start, 1.10 at the end")


# ------------------------------------------------------------------ the atlas in bf16 vs float32


def test_atlas_settings_come_from_the_findings_file():
    settings = bench_agreement.atlas_settings(n_concepts=10)
    assert settings["concepts"][:7] == ["Sandwich", "Water", "Bomb", "Confusion", "Logic", "Bicycle", "Banana"]
    assert len(settings["concepts"]) == 10 and settings["scales"] == [2, 4, 8]
    assert settings["n_controls"] == 12 and settings["n_random"] == 2 and settings["wordings"] == "default"
    assert len(bench_agreement.atlas_settings(n_concepts=12)["concepts"]) == 12  # then ["11"]'s own
    with pytest.raises(ValueError, match="--concepts 0"):
        bench_agreement.atlas_settings(n_concepts=0)


def test_agreement_counts_classes_and_differences_by_hand():
    def run(classes, i_values, diffs):
        table = pd.DataFrame({"concept": ["A", "B", "C"], "class": classes, "I": i_values})
        sweep = pd.DataFrame({"concept": ["A", "A", "B", "C"], "vector_kind": "concept",
                              "vector_seed": pd.array([None] * 4, dtype="Int64"), "scale": [2.0, 4.0, 2.0, 2.0],
                              "question": "q", "logit_diff": diffs})
        return {"table": table, "sweep": sweep}

    a = run(["no effect", "shared yes-shift", "opposite"], [0.1, 1.0, -2.0], [1.0, -0.5, 0.2, 3.0])
    b = run(["no effect", "shared yes-shift", "no effect"], [0.3, 0.9, -1.2], [1.1, 0.1, 0.2, 2.0])
    got = bench_agreement.dtype_agreement(a, b)
    assert got["n"] == 3 and got["same_class"] == 2 and got["differ"] == [("C", "opposite", "no effect")]
    assert got["max_dI"] == pytest.approx(0.8) and got["median_dI"] == pytest.approx(0.2)
    assert got["n_trials"] == 4 and got["same_sign"] == 3
    assert got["max_diff"] == pytest.approx(1.0) and got["median_diff"] == pytest.approx(0.35)


def test_the_agreement_command_writes_its_block(tmp_path, capsys):
    doc = tmp_path / "benchmark.md"
    doc.write_text("<!-- agreement:start -->\n<!-- agreement:end -->\n")
    bench.main(["--agreement", "--model", "tiny-llama", "--concepts", "2", "--device", "cpu", "--readme", str(doc)])
    block = read_block(doc, "agreement")
    assert block.startswith("| tiny-llama, atlas at layer 1, 2 concepts | trials |")
    assert "| **float32** | 324 |" in block and "| **bfloat16** | 324 |" in block  # 2 × 3 vectors × 3 scales × 18
    assert re.search(r"\*\*Classes agree on [0-2]/2 concepts", block) and "same sign on " in block
    assert "concepts Sandwich, Water; scales [2, 4, 8]; 12 controls" in block
    assert "`python -m introspection_utils.bench --agreement --model tiny-llama --concepts 2 --device cpu" in block


# ------------------------------------------------------------------ the committed measurements


def test_the_benchmark_doc_holds_measurements_written_by_the_script():
    doc = project_root() / bench.BENCH_DOC
    block, qwen = read_block(doc, "bench"), read_block(doc, "bench-qwen")
    assert block.startswith("| smollm2-135m-instruct, layer 15, "), \
        f"run `make bench` (python -m introspection_utils.bench --naive-trials 44 --readme {bench.BENCH_DOC})"
    assert qwen.startswith("| qwen2.5-coder-1.5b-instruct, layer 14, ")
    for measured in (block, qwen):
        assert "**engine, float32**" in measured and "**engine, bfloat16**" in measured
        assert "bf16 engine vs fp32" in measured and "of its linear peak" in measured
        assert "written by `python -m introspection_utils.bench" in measured and "dtype=\"auto\"` picks" in measured
        assert all(int(p) <= 100 for p in PERCENT.findall(measured))
    agreement = read_block(doc, "agreement")
    assert agreement.startswith("| qwen2.5-coder-1.5b-instruct, atlas at layer ")
    assert "Classes agree on " in agreement
    assert "written by `python -m introspection_utils.bench --agreement" in agreement


def test_the_gpu_block_holds_a_measurement_written_by_the_script():
    """Measured once on a lent H200 machine with an earlier engine (docs/benchmark.md says how); rerun there."""
    gpu = read_block(project_root() / bench.BENCH_DOC, "bench-gpu")
    assert gpu.startswith("| random:gemma-2-9b-it, layer 21, 880 trials |") and "on NVIDIA " in gpu
    assert "**engine, bfloat16**" in gpu and ", GPU " in gpu
    assert "written by `python -m introspection_utils.bench" in gpu
