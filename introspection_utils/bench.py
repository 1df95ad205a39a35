"""Benchmark: the standard sweep measured the naive way and with the engine, side by side in one run.

    python -m introspection_utils.bench [--model NAME] [--layer L] [--naive-trials N] [--readme README.md]
    python -m introspection_utils.bench --model random:gemma-2-9b-it --naive-trials 88   # GPU: Gemma-2-9B's shape, bf16

Standard sweep: concepts sandwich, water, bomb, confusion, logic × scales 0,1,2,3,4,6,8,12 × (the introspection
question + the first 10 control questions) × (concept vector + 1 random vector) at one middle layer = 880 trials.
Naive = one traced forward per trial over the whole prompt (what a first script does). Engine = ``inject.measure``
(prefix KV cache + layer skip + batching). Prints trials/s for both, the ratio, the largest difference between the
two (they must agree), peak RSS, and the engine's useful GFLOP/s against a torch matmul peak measured here.
``--readme FILE`` also writes the measurement, dated, with the machine and its load, into FILE's
``<!-- bench:start -->`` … ``<!-- bench:end -->`` block (the README's benchmark table is never typed by hand).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import time
from pathlib import Path

import torch

from introspection_utils.inject import Trial, measure, trial_grid
from introspection_utils.models import DEFAULT_MODEL, ModelHandle, load_model
from introspection_utils.paths import replace_block
from introspection_utils.prompts import question_prompts, yes_no_ids
from introspection_utils.vectors import concept_vectors, with_random

CONCEPTS = ("Sandwich", "Water", "Bomb", "Confusion", "Logic")
SCALES = (0, 1, 2, 3, 4, 6, 8, 12)
N_CONTROLS = 10


def standard_trials(handle: ModelHandle, layer: int) -> list[Trial]:
    """The 880 trials of the standard sweep (fewer only if the model has fewer control questions)."""
    bank = concept_vectors(handle, CONCEPTS, progress=False)
    vectors = [v for concept in CONCEPTS for v in with_random(bank.get(concept, layer), 1)]
    prompts = question_prompts(handle, N_CONTROLS)
    return trial_grid(vectors, prompts, SCALES)


def naive_logit_diff(handle: ModelHandle, trial: Trial, answer_ids: torch.Tensor) -> float:
    """One traced forward over the whole prompt, injecting at the window's positions: the baseline approach."""
    ids = torch.tensor([trial.prompt.input_ids], device=handle.device)
    start, _ = trial.span()
    add = (trial.scale * trial.vector.vector).to(handle.device, handle.dtype)
    with torch.no_grad(), handle.model.trace(ids):
        handle.layers[trial.injection_layer].output[:, start:, :] += add
        logits = handle.model.output.logits[0, -1, answer_ids].save()
    return float(logits[0] - logits[1])


def matmul_peak_gflops(dtype: torch.dtype, device: torch.device, n: int = 1024, repeats: int = 20) -> float:
    """Best-of-3 throughput of an n×n matmul in ``dtype``: the machine's practical peak."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = 0.0
    for _ in range(3):
        _sync(device)
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def useful_flops(handle: ModelHandle, trials: list[Trial]) -> float:
    """FLOPs that must be computed: per trial, the suffix (from the injection start) through the layers from
    the injection layer up (weights: 2 × params × tokens; attention: 4 × d_attn × query × key tokens), and the
    two answer rows of the unembedding. Work shared across trials (prefix, layers below) counts once per prompt."""
    cfg = handle.torch_model.config.get_text_config()
    layer_params = sum(p.numel() for p in handle.torch_model.get_decoder().layers[0].parameters())
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--layer", type=int, default=None, help="injection layer (default: the middle one)")
    parser.add_argument("--naive-trials", type=int, default=None,
                        help="time only this many naive trials (spread over the sweep) and extrapolate")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--readme", default=None, help="write the measurement into this file's bench block")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]  # before anything of ours runs: a busy machine's numbers are not the engine's

    if args.model.startswith("random:") and not torch.cuda.is_available():
        print(f"skipped: {args.model} is a full-size randomly initialised model for the GPU benchmark and needs a "
              f"CUDA device; none is present here")
        return
    handle = load_model(args.model)
    layer = handle.check_layer(args.layer if args.layer is not None else handle.arch.n_layers // 2)
    trials = standard_trials(handle, layer)
    answer_ids = torch.tensor(yes_no_ids(handle), device=handle.device)
    print(f"model {handle!r} on {handle.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads)")
    print(f"standard sweep: {len(trials)} trials at layer {layer}, prompt lengths "
          f"{sorted({len(t.prompt) for t in trials})}")

    measure(handle, trials[:8])  # warm-up (allocations, lazy init) outside the timings
    naive_logit_diff(handle, trials[1], answer_ids)

    step = max(1, len(trials) // args.naive_trials) if args.naive_trials else 1
    naive_sample = list(range(0, len(trials), step))
    _sync(handle.device)
    t = time.perf_counter()
    naive = torch.tensor([naive_logit_diff(handle, trials[i], answer_ids) for i in naive_sample])
    _sync(handle.device)
    naive_s = (time.perf_counter() - t) * len(trials) / len(naive_sample)

    t = time.perf_counter()
    engine = measure(handle, trials, batch_size=args.batch_size).logit_diff
    _sync(handle.device)
    engine_s = time.perf_counter() - t

    peak = matmul_peak_gflops(handle.dtype, handle.device, n=8192 if handle.device.type == "cuda" else 1024)
    r = {"model": handle.name, "n": len(trials), "layer": layer, "n_naive": len(naive_sample),
         "extrapolated": step > 1, "naive_s": naive_s, "engine_s": engine_s,
         "max_diff": float((engine[naive_sample] - naive).abs().max()), "gflops": useful_flops(handle, trials) /
         engine_s / 1e9, "peak": peak, "dtype": str(handle.dtype).removeprefix("torch."),
         "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, "threads": torch.get_num_threads(),
         "device": _device_name(handle.device), "load": load, "date": datetime.date.today().isoformat(),
         "gpu_gib": torch.cuda.max_memory_allocated() / 1024**3 if handle.device.type == "cuda" else None}
    extrapolated = f" (timed {r['n_naive']}, extrapolated)" if r["extrapolated"] else ""
    print(f"naive : {r['n'] / naive_s:8.1f} trials/s  {naive_s:7.1f} s{extrapolated}")
    print(f"engine: {r['n'] / engine_s:8.1f} trials/s  {engine_s:7.1f} s")
    print(f"ratio : {naive_s / engine_s:.1f}x")
    print(f"max |engine - naive| over {r['n_naive']} trials: {r['max_diff']:.2e}")
    print(f"engine useful compute: {r['gflops']:.1f} GFLOP/s = {r['gflops'] / peak:.0%} "
          f"of the measured {r['dtype']} matmul peak ({peak:.1f} GFLOP/s)")
    print(f"peak RSS: {r['rss_gb']:.2f} GB")
    if r["gpu_gib"] is not None:
        print(f"peak GPU memory: {r['gpu_gib']:.2f} GiB")
    if args.readme:
        replace_block(Path(args.readme), "bench", readme_block(r))
        print(f"written into {args.readme}")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"


def readme_block(r: dict) -> str:
    """The README's benchmark table and its dated line, from one run's measurements."""
    sample = f" ({r['n_naive']} spread trials timed, extrapolated)" if r["extrapolated"] else ""
    gpu = f"; peak GPU memory {r['gpu_gib']:.2f} GiB" if r["gpu_gib"] is not None else ""
    return "\n".join([
        f"| {r['model']}, layer {r['layer']} | trials/s | {r['n']} trials |", "|---|---|---|",
        f"| naive (one traced forward per trial over the whole prompt) | {r['n'] / r['naive_s']:.1f} | "
        f"{r['naive_s']:.0f} s{sample} |",
        f"| engine (`inject.measure`) | {r['n'] / r['engine_s']:.1f} | {r['engine_s']:.1f} s |", "",
        f"**Ratio {r['naive_s'] / r['engine_s']:.1f}×**; engine vs naive max difference {r['max_diff']:.1e} over the "
        f"{r['n_naive']} trials compared; the engine's useful compute {r['gflops']:.0f} GFLOP/s = "
        f"{r['gflops'] / r['peak']:.0%} of the {r['dtype']} matmul peak measured in the same run "
        f"({r['peak']:.0f} GFLOP/s); peak RSS {r['rss_gb']:.2f} GB{gpu}. Measured {r['date']} on {r['device']}, "
        f"{r['threads']} threads, load average {r['load']:.2f} at the start, torch {torch.__version__}; written by "
        f"`python -m introspection_utils.bench --naive-trials {r['n_naive']} --readme README.md`."])


if __name__ == "__main__":
    main()
