"""Benchmark: the standard sweep measured the naive way and with the engine, side by side in one run.

    python -m introspection_utils.bench [--model NAME] [--layer L] [--naive-trials N]
    python -m introspection_utils.bench --model random:gemma-2-9b-it --naive-trials 88   # GPU: Gemma-2-9B's shape, bf16

Standard sweep: concepts sandwich, water, bomb, confusion, logic × scales 0,1,2,3,4,6,8,12 × (the introspection
question + the first 10 control questions) × (concept vector + 1 random vector) at one middle layer = 880 trials.
Naive = one traced forward per trial over the whole prompt (what a first script does). Engine = ``inject.measure``
(prefix KV cache + layer skip + batching). Prints trials/s for both, the ratio, the largest difference between the
two (they must agree), peak RSS, and the engine's useful GFLOP/s against a torch matmul peak measured here.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from introspection_utils.inject import Trial, measure, trial_grid
from introspection_utils.models import DEFAULT_MODEL, ModelHandle, load_model
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
    args = parser.parse_args(argv)

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
    flops = useful_flops(handle, trials)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    extrapolated = f" (timed {len(naive_sample)}, extrapolated)" if step > 1 else ""
    print(f"naive : {len(trials) / naive_s:8.1f} trials/s  {naive_s:7.1f} s{extrapolated}")
    print(f"engine: {len(trials) / engine_s:8.1f} trials/s  {engine_s:7.1f} s")
    print(f"ratio : {naive_s / engine_s:.1f}x")
    print(f"max |engine - naive| over {len(naive_sample)} trials: {(engine[naive_sample] - naive).abs().max():.2e}")
    print(f"engine useful compute: {flops / engine_s / 1e9:.1f} GFLOP/s = {flops / engine_s / 1e9 / peak:.0%} "
          f"of the measured {str(handle.dtype).removeprefix('torch.')} matmul peak ({peak:.1f} GFLOP/s)")
    print(f"peak RSS: {rss_gb:.2f} GB")
    if handle.device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 1024**3:.2f} GiB")


if __name__ == "__main__":
    main()
