"""Benchmark: the standard sweep measured the naive way and with the engine, in float32 and bfloat16, side by side.

    python -m introspection_utils.bench [--model NAME] [--layer L] [--naive-trials N] [--trials N]
        [--readme docs/benchmark.md]
    python -m introspection_utils.bench --model qwen2.5-coder-1.5b-instruct --naive-trials 88
    python -m introspection_utils.bench --model random:gemma-2-9b-it --naive-trials 88   # GPU: Gemma-2-9B's shape
    python -m introspection_utils.bench --agreement [--concepts 10] --readme docs/benchmark.md  # atlas, bf16 vs fp32
    python -m introspection_utils.bench --training data/results/<model> --readme docs/benchmark.md  # organisms

Standard sweep: concepts sandwich, water, bomb, confusion, logic × scales 0,1,2,3,4,6,8,12 × (the introspection
question + the first 10 control questions) × (concept vector + 1 random vector) at one middle layer = 880 trials
(``--trials N``: its first N). Naive = one traced forward per trial over the whole prompt (what a first script does).
Engine = ``measure.measure`` (prefix KV cache + layer skip + batching). For each dtype (``--dtypes``, default float32
and bfloat16; the same trials and float32 concept vectors for both), in one run: trials/s both ways, the ratio, the
largest engine − naive difference (they must agree), peak RSS, and the engine's useful GFLOP/s against the peak of
the kernel the model's linears use, timed in that dtype in the same run (``F.linear`` on the model's weight shapes:
:func:`~introspection_utils.engine.throughput.linear_peak_gflops`); then the bf16 engine against the fp32 engine
(speed ratio, max and median |bf16 − fp32|, sign agreement). ``--readme FILE`` writes it all, dated, with the
machine, its bf16 CPU flags, what ``dtype="auto"`` picks there and its load, into FILE's ``<!-- bench:start -->`` …
``<!-- bench:end -->`` block (never typed by hand). ``--agreement``: the atlas in both dtypes on Qwen
(:mod:`~introspection_utils.apps.bench_agreement`); ``--training``: the organisms' training
(:mod:`~introspection_utils.apps.bench_training`).
"""

from __future__ import annotations

import argparse
import gc
import resource
import time
from pathlib import Path

import torch

from introspection_utils.core.paths import replace_block
from introspection_utils.engine.measure import Trial, measure, readout_logits, trial_grid, yes_minus_no
from introspection_utils.engine.prompts import answer_set, question_prompts
from introspection_utils.engine.throughput import (
    auto_dtype,
    bf16_flags,
    device_name,
    layer_linear_params,
    linear_peak_gflops,
    load_average,
    load_words,
    measured_line,
)
from introspection_utils.engine.vectors import concept_vectors, with_random
from introspection_utils.models.handle import DEFAULT_MODEL, ModelHandle, load_model

BENCH_DOC = "docs/benchmark.md"  # where the measurement block lives (written with --readme)
CONCEPTS = ("Sandwich", "Water", "Bomb", "Confusion", "Logic")
SCALES = (0, 1, 2, 3, 4, 6, 8, 12)
N_CONTROLS = 10


def standard_trials(handle: ModelHandle, layer: int) -> list[Trial]:
    """The 880 trials of the standard sweep (fewer only if the model has fewer control questions)."""
    bank = concept_vectors(handle, CONCEPTS, progress=False)
    vectors = [v for concept in CONCEPTS for v in with_random(bank.get(concept, layer), 1)]
    prompts = question_prompts(handle, N_CONTROLS)
    return trial_grid(vectors, prompts, SCALES)


def naive_logit_diff(handle: ModelHandle, trial: Trial, answer_ids: torch.Tensor, n_yes: int) -> float:
    """One traced forward over the whole prompt, injecting at the window's positions: the baseline approach (read
    through the same float32 readout and answer sets as the engine — ``answer_ids``: the yes set's ``n_yes`` ids, then
    the no set's — so the two differ only by the engine's levers)."""
    ids = torch.tensor([trial.prompt.input_ids], device=handle.device)
    start, _ = trial.span()
    add = (trial.scale * trial.vector.vector).to(handle.device, handle.dtype)
    with torch.no_grad(), handle.model.trace(ids):
        handle.layers[trial.injection_layer].output[:, start:, :] += add
        logits = readout_logits(handle, handle.layers[-1].output[0, -1], answer_ids).save()
    return float(yes_minus_no(logits, n_yes))


def useful_flops(handle: ModelHandle, trials: list[Trial]) -> float:
    """FLOPs that must be computed: per trial, the suffix (from the injection start) through the layers from
    the injection layer up (linears: 2 × their weights × tokens; attention: 4 × d_attn × query × key tokens).
    Work shared across trials (prefix, layers below) counts once per prompt."""
    cfg = handle.torch_model.config.get_text_config()
    layer_params = layer_linear_params(handle)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = cfg.num_attention_heads * head_dim
    total = 0.0
    seen_prompts = set()
    for trial in trials:
        n, start = len(trial.prompt), trial.span()[0]
        suffix = n - start
        above = handle.arch.n_layers - trial.injection_layer
        keys = sum(range(start + 1, n + 1))  # causal: query t sees t+1 keys
        total += above * (2 * layer_params * suffix + 4 * d_attn * keys)
        if trial.prompt not in seen_prompts:  # the shared prefix and lower layers, once per prompt
            seen_prompts.add(trial.prompt)
            all_keys = sum(range(1, n + 1))
            total += handle.arch.n_layers * 2 * layer_params * start + trial.injection_layer * (
                2 * layer_params * suffix) + handle.arch.n_layers * 4 * d_attn * (all_keys - keys)
    return total


def _reset_peak_rss() -> None:
    """Start a fresh peak-RSS window (Linux: ``/proc/self/clear_refs``), so each dtype's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_gb() -> float:
    """Peak resident memory since the last :func:`_reset_peak_rss` (``VmHWM``; elsewhere the process's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_dtype(handle: ModelHandle, trials: list[Trial], naive_sample: list[int], batch_size: int | None,
              peak_tokens: int | None = None) -> dict:
    """One dtype's half of the benchmark: naive and engine timings on ``trials``, the linear peak (timed before and
    after the engine, the better kept: a shared machine's load changes), peak RSS."""
    sets = answer_set(handle)
    answer_ids, n_yes = torch.tensor(sets.ids, device=handle.device), len(sets.yes)
    measure(handle, trials[:8])  # warm-up (allocations, lazy init) outside the timings
    naive_logit_diff(handle, trials[1], answer_ids, n_yes)
    peak = linear_peak_gflops(handle, tokens=peak_tokens)
    _sync(handle.device)
    t = time.perf_counter()
    naive = torch.tensor([naive_logit_diff(handle, trials[i], answer_ids, n_yes) for i in naive_sample])
    _sync(handle.device)
    naive_s = (time.perf_counter() - t) * len(trials) / len(naive_sample)
    t = time.perf_counter()
    engine = measure(handle, trials, batch_size=batch_size).logit_diff
    _sync(handle.device)
    engine_s = time.perf_counter() - t
    peak = max(peak, linear_peak_gflops(handle, tokens=peak_tokens))
    return {"dtype": str(handle.dtype).removeprefix("torch."), "naive_s": naive_s, "engine_s": engine_s,
            "max_diff": float((engine[naive_sample] - naive).abs().max()), "engine": engine,
            "gflops": useful_flops(handle, trials) / engine_s / 1e9, "peak": peak, "rss_gb": _peak_rss_gb(),
            "gpu_gib": torch.cuda.max_memory_allocated() / 1024**3 if handle.device.type == "cuda" else None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compare(runs: dict[str, dict]) -> dict | None:
    """The bf16 engine against the fp32 engine on the same trials: speed ratio, max / median |bf16 − fp32|, how
    many trials have the same sign of yes − no. ``None`` unless both dtypes ran."""
    if not {"float32", "bfloat16"} <= set(runs):
        return None
    a, b = runs["float32"]["engine"], runs["bfloat16"]["engine"]
    diff = (b - a).abs()
    return {"speed": runs["float32"]["engine_s"] / runs["bfloat16"]["engine_s"], "max": float(diff.max()),
            "median": float(diff.median()), "same_sign": int((a.sign() == b.sign()).sum()), "n": len(a)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--layer", type=int, default=None, help="injection layer (default: the middle one)")
    parser.add_argument("--naive-trials", type=int, default=None,
                        help="time only this many naive trials (spread over the sweep) and extrapolate")
    parser.add_argument("--trials", type=int, default=None, help="only the first N trials of the standard sweep")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated (default float32,bfloat16)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: a GPU if one is visible, else the CPU)")
    parser.add_argument("--peak-tokens", type=int, default=None,
                        help="rows fed to the model's linears when timing the peak (default 1024 on CPU, 8192 on CUDA)")
    parser.add_argument("--readme", default=None, help="write the measurement into this file's bench block")
    parser.add_argument("--block", default=None,
                        help="the block's name in that file (default bench, agreement with --agreement)")
    parser.add_argument("--agreement", action="store_true",
                        help="instead: the atlas's classes and I in bfloat16 vs float32 on the same concepts "
                             "(apps/bench_agreement.py; default model Qwen, the findings file's atlas settings)")
    parser.add_argument("--concepts", type=int, default=None,
                        help="with --agreement: the first N of the atlas variants' concepts (default 10)")
    parser.add_argument("--training", default=None, metavar="RESULTS_DIR",
                        help="instead: the organisms' training of this results folder (its organisms_training.csv, "
                             "written by notebook 14) in examples/s, tokens/s and the fraction of the dtype's linear "
                             "peak (apps/bench_training.py; block training)")
    parser.add_argument("--organisms-root", default=None,
                        help="with --training: where the organisms' cache folders are (default <cache>/organisms)")
    parser.add_argument("--evaluation", default="organisms", metavar="NAME",
                        help="with --training: the evaluation whose trainings to read (notebook 14's evaluation_name: "
                             "its <NAME>_training.csv; default organisms)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.agreement:
        from introspection_utils.apps.bench_agreement import main as agreement_main

        agreement_main(args)
        return
    if args.training:
        from introspection_utils.apps.bench_training import main as training_main

        training_main(args)
        return
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in ("float32", "bfloat16", "float16") for d in dtypes):
        raise ValueError(f"--dtypes {args.dtypes!r}: use float32, bfloat16 and/or float16, comma-separated")
    if args.trials is not None and args.trials < 8:
        raise ValueError(f"--trials {args.trials} is too few; use at least 8")
    load = load_average()  # before anything of ours runs: a busy machine's numbers are not the engine's

    if args.model.startswith("random:") and args.device is None and not torch.cuda.is_available():
        print(f"skipped: {args.model} is a full-size randomly initialised model for the GPU benchmark and needs a "
              f"CUDA device; none is present here (--device cpu runs it on the CPU anyway)")
        return
    runs: dict[str, dict] = {}
    trials: list[Trial] = []
    for dtype in dtypes:
        gc.collect()
        _reset_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        handle = load_model(args.model, dtype=dtype, device=args.device)
        if not trials:  # the same trials (and float32-stored concept vectors) for every dtype
            layer = handle.check_layer(args.layer if args.layer is not None else handle.arch.n_layers // 2)
            trials = standard_trials(handle, layer)[:args.trials]
            step = max(1, len(trials) // args.naive_trials) if args.naive_trials else 1
            naive_sample = list(range(0, len(trials), step))
            print(f"model {handle.name} on {handle.device} ({device_name(handle.device)}, "
                  f"{torch.get_num_threads()} threads); bf16 CPU flags: {bf16_flags()}; "
                  f"dtype=\"auto\" picks {auto_dtype(handle.device)}")
            print(f"standard sweep: {len(trials)} trials at layer {layer}, prompt lengths "
                  f"{sorted({len(t.prompt) for t in trials})}")
        r = runs[dtype] = run_dtype(handle, trials, naive_sample, args.batch_size, args.peak_tokens)
        device, name = handle.device, handle.name
        del handle
        extrapolated = f" (timed {len(naive_sample)}, extrapolated)" if step > 1 else ""
        n = len(trials)
        print(f"[{dtype}] naive : {_rate(n / r['naive_s']):>8} trials/s  {r['naive_s']:7.1f} s{extrapolated}")
        print(f"[{dtype}] engine: {_rate(n / r['engine_s']):>8} trials/s  {r['engine_s']:7.1f} s")
        print(f"[{dtype}] ratio : {r['naive_s'] / r['engine_s']:.1f}x")
        print(f"[{dtype}] max |engine - naive| over {len(naive_sample)} trials: {r['max_diff']:.2e}")
        print(f"[{dtype}] engine useful compute: {r['gflops']:.1f} GFLOP/s = {r['gflops'] / r['peak']:.0%} "
              f"of the measured {dtype} linear peak ({r['peak']:.1f} GFLOP/s, F.linear on the model's shapes)")
        print(f"[{dtype}] peak RSS: {r['rss_gb']:.2f} GB" + (f"; peak GPU memory: {r['gpu_gib']:.2f} GiB"
                                                             if r["gpu_gib"] is not None else ""))
    both = compare(runs)
    if both:
        print(f"bf16 engine vs fp32 engine: {both['speed']:.2f}x the trials/s; |bf16 - fp32| max {both['max']:.3f}, "
              f"median {both['median']:.3f} logits; same sign on {both['same_sign']}/{both['n']} trials")
    end = load_average()
    print(load_words(load, end))
    if args.readme:
        meta = {"model": name, "layer": trials[0].injection_layer, "n": len(trials),
                "n_naive": len(naive_sample), "extrapolated": step > 1,
                "line": measured_line(device, load_start=load, load_end=end, command=_command(args))}
        replace_block(Path(args.readme), args.block or "bench", readme_block(meta, runs, both))
        print(f"written into {args.readme}")


def _command(args: argparse.Namespace) -> str:
    parts = ["python -m introspection_utils.bench"]
    if args.model != DEFAULT_MODEL:
        parts.append(f"--model {args.model}")
    for flag, value in (("--layer", args.layer), ("--naive-trials", args.naive_trials), ("--trials", args.trials),
                        ("--batch-size", args.batch_size), ("--peak-tokens", args.peak_tokens),
                        ("--device", args.device)):
        if value is not None:
            parts.append(f"{flag} {value}")
    if args.dtypes != "float32,bfloat16":
        parts.append(f"--dtypes {args.dtypes}")
    if args.block not in (None, "bench"):
        parts.append(f"--block {args.block}")
    return " ".join([*parts, f"--readme {BENCH_DOC}"])


def _rate(per_second: float) -> str:
    """A rate with two significant digits below 10 (0.047, 1.1), one decimal above (23.4)."""
    return f"{per_second:.1f}" if per_second >= 10 else f"{per_second:.2g}"


def readme_block(meta: dict, runs: dict[str, dict], both: dict | None) -> str:
    """The benchmark table of ``docs/benchmark.md`` (one row per dtype and way) and its dated lines, from one run's
    measurements (``meta["line"]``: :func:`~introspection_utils.engine.throughput.measured_line`)."""
    n = meta["n"]
    sample = f" ({meta['n_naive']} spread trials timed, extrapolated)" if meta["extrapolated"] else ""
    lines = [f"| {meta['model']}, layer {meta['layer']}, {n} trials | trials/s | wall | engine vs naive | "
             f"max \\|engine − naive\\| | useful GFLOP/s (of its linear peak) | peak RSS |",
             "|---|---|---|---|---|---|---|"]
    for dtype, r in runs.items():
        gpu = f", GPU {r['gpu_gib']:.2f} GiB" if r["gpu_gib"] is not None else ""
        lines += [f"| naive, {dtype} | {_rate(n / r['naive_s'])} | {r['naive_s']:.0f} s{sample} | | | | |",
                  f"| **engine, {dtype}** | **{_rate(n / r['engine_s'])}** | {r['engine_s']:.1f} s | "
                  f"{r['naive_s'] / r['engine_s']:.1f}× | {r['max_diff']:.1e} | {r['gflops']:.0f} "
                  f"({r['gflops'] / r['peak']:.0%} of {r['peak']:.0f}) | {r['rss_gb']:.2f} GB{gpu} |"]
    lines.append("")
    if both:
        lines.append(f"**bf16 engine vs fp32 engine: {both['speed']:.2f}× the trials/s**; on the same trials "
                     f"|bf16 − fp32| max {both['max']:.3f}, median {both['median']:.3f} logits (yes − no); same "
                     f"sign on {both['same_sign']}/{both['n']} trials. ")
    lines.append(meta["line"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
