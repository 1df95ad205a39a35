"""The organisms' training in the benchmark's block format: examples/s, tokens/s and useful GFLOP/s against the
training dtype's linear peak, read from a finished training's tables and written into ``docs/benchmark.md``.

    python -m introspection_utils.bench --training data/results/<model> [--organisms-root DIR]
        [--evaluation organisms_<word>] --readme docs/benchmark.md

It reads ``organisms_training.csv``'s ``.meta.json`` in that results folder (``--evaluation``: a named evaluation's,
``<name>_training.csv``; written by notebook 14 through
:func:`~introspection_utils.experiments.organisms.training.training_table`: each organism's config) and each
organism's ``training.csv`` in its cache folder (its steps' wall times, rows, tokens and the machine it ran on), loads
the base model in the training's dtype, replays each step's sizes to count its FLOPs
(:func:`~introspection_utils.experiments.organisms.flops.training_flops`) and times the dtype's linear peak with the
training's thread count. It refuses a training measured on another CPU than this one. ``--readme FILE`` writes the
``<!-- training:start -->`` block.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from introspection_utils.core.paths import replace_block
from introspection_utils.core.results import load_result
from introspection_utils.engine.throughput import (
    Throughput,
    linear_peak_gflops,
    load_average,
    machine,
    measured_line,
    throughput_table,
)
from introspection_utils.experiments.organisms.evaluation import EVALUATION, table_names
from introspection_utils.experiments.organisms.flops import training_throughput
from introspection_utils.experiments.organisms.training import Organism, OrganismConfig, organism_folder
from introspection_utils.models.handle import load_model

# What one block's organisms share (its title); steps and rows a step are each organism's own (its row's label), so
# a kind trained with its own batch (notebook 14's settings_by_kind) sits in the same block.
SHARED = ("model", "revision", "dtype", "layers", "rank", "targets")


def trained_organisms(results: str | Path, root: str | Path | None = None,
                      evaluation_name: str = EVALUATION) -> dict[str, Organism]:
    """The organisms named by the training table of evaluation ``evaluation_name`` in ``results``
    (``organisms_training.meta.json`` for the default one: their configs), each from its cache folder under ``root``
    (default ``cache_dir()/organisms``); a missing or unfinished one is an error."""
    meta = load_result(Path(results) / table_names(evaluation_name)["training"]).meta["spec"]
    organisms = {}
    for kind, fields in meta["configs"].items():
        config = OrganismConfig.from_fields(fields)
        if config.key() != fields["key"]:
            raise ValueError(f"{kind}: its config no longer gives its key {fields['key']} (got {config.key()})")
        folder = organism_folder(config, root)
        if not (folder / "complete.json").is_file():
            raise ValueError(f"{kind}: no finished training in {folder}")
        organisms[kind] = Organism(config, folder, complete=True)
    return organisms


def training_machine(organisms: dict[str, Organism]) -> dict:
    """The machine the trainings ran on (their metadata's :func:`machine`), the same for all; it must be this one
    (CPU model, cores, bf16 instructions), or the peak timed here would not be theirs."""
    seen = {kind: o.training().meta["spec"]["machine"] for kind, o in organisms.items()}
    keys = ("cpu", "cpus", "torch_threads", "bf16_flags")
    first = next(iter(seen.values()))
    if any(tuple(m[k] for k in keys) != tuple(first[k] for k in keys) for m in seen.values()):
        raise ValueError(f"the organisms were trained on different machines or thread counts: {seen}")
    here = machine()
    if tuple(here[k] for k in ("cpu", "cpus", "bf16_flags")) != tuple(first[k] for k in ("cpu", "cpus",
                                                                                           "bf16_flags")):
        raise ValueError(f"trained on {first['cpus']} × {first['cpu']} (bf16: {first['bf16_flags']}); this machine "
                         f"is {here['cpus']} × {here['cpu']} (bf16: {here['bf16_flags']}): run this where it trained")
    return first


def training_block(organisms: dict[str, Organism], rows: dict[str, Throughput], n_layers: int, line: str) -> str:
    """The ``training`` block of ``docs/benchmark.md``: one row per organism in the benchmark's table format
    (:func:`~introspection_utils.engine.throughput.throughput_table`), what was counted, when and under what load
    each was trained, and ``line`` (:func:`~introspection_utils.engine.throughput.measured_line`: the peak's run).
    ``n_layers``: the model's layer count (the adapters sit on ``first_adapted .. n_layers - 1``)."""
    configs = [o.config for o in organisms.values()]
    c = configs[0]
    if any(tuple(getattr(x, k) for k in SHARED) != tuple(getattr(c, k) for k in SHARED) for x in configs):
        raise ValueError(f"the organisms differ in {SHARED}: one block holds one training setting")
    title = (f"{c.model}, organisms' training in {c.dtype}: injection layers "
             f"{', '.join(map(str, c.layers))}, LoRA r {c.rank} on layers {c.first_adapted}–{n_layers - 1}")
    when = "; ".join(f"{kind} at {o.training().meta['created'][:16].replace('T', ' ')} UTC "
                     f"({'/'.join(f'{x:.2f}' for x in o.training().meta['spec']['machine']['load_avg'])})"
                     for kind, o in organisms.items())
    return "\n".join([
        throughput_table(title, [dataclasses.replace(r, label=f"**{kind}** ({organisms[kind].config.steps} steps × "
                                                              f"{organisms[kind].config.batch_size} rows)")
                                 for kind, r in rows.items()]), "",
        "Wall time: the training steps' own (not loading, concept vectors or saving); examples: rows; tokens: each "
        "row's whole prompt and answer. Useful FLOPs replayed from each config's schedule "
        "(`experiments/organisms/flops.py`, checked against each step's recorded layer and tokens): the layers "
        "below the adapters without gradients once per distinct row in the training (its prompt and taught "
        "answer); per step the shared prefix (forward, and backward for what the rows read from it), the rows "
        "forward and backward through the adapted layers (LoRA's own matmuls included), the base model's pass for "
        "the rows that keep their answer, the unembedding on the kept positions; padding and masked attention not "
        "counted. Trained (1/5/15-min load average at each training's "
        f"end, its own threads included): {when}. The peak, timed for this block in {c.dtype} with the training's "
        "thread count:", line])


def main(args: argparse.Namespace) -> None:
    """``python -m introspection_utils.bench --training DIR`` (its arguments: ``--organisms-root``, ``--device``,
    ``--peak-tokens``, ``--readme``, ``--block``)."""
    organisms = trained_organisms(args.training, args.organisms_root, args.evaluation)
    trained = training_machine(organisms)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(trained["torch_threads"]))  # the peak at the thread count the training had
    try:
        _measure_and_write(args, organisms)
    finally:
        torch.set_num_threads(threads)


def _measure_and_write(args: argparse.Namespace, organisms: dict[str, Organism]) -> None:
    config = next(iter(organisms.values())).config
    load = load_average()  # before anything of ours runs
    handle = load_model(config.model, dtype=config.dtype, device=args.device)
    peak = linear_peak_gflops(handle, tokens=args.peak_tokens)
    rows = training_throughput(handle, organisms, peak=peak)
    peak = max(peak, linear_peak_gflops(handle, tokens=args.peak_tokens))  # before and after, the better kept
    rows = {kind: dataclasses.replace(r, peak=peak) for kind, r in rows.items()}
    end = load_average()
    for kind, r in rows.items():
        print(f"{kind}: {r.examples / r.seconds:.3g} examples/s, {r.tokens / r.seconds:.1f} tokens/s, "
              f"{r.flops / 1e9:.0f} GFLOP in {r.seconds:.0f} s = {r.flops / r.seconds / 1e9:.1f} GFLOP/s, "
              f"{r.fraction:.0%} of the {config.dtype} linear peak {peak:.1f} GFLOP/s")
    if args.readme:
        command = ("python -m introspection_utils.bench --training " + str(args.training)
                   + (f" --organisms-root {args.organisms_root}" if args.organisms_root else "")
                   + (f" --evaluation {args.evaluation}" if args.evaluation != EVALUATION else "")
                   + (f" --peak-tokens {args.peak_tokens}" if args.peak_tokens else "")
                   + (f" --block {args.block}" if args.block not in (None, "training") else "")
                   + " --readme docs/benchmark.md")
        line = measured_line(handle.device, load_start=load, load_end=end, command=command)
        block = training_block(organisms, rows, handle.arch.n_layers, line)
        replace_block(Path(args.readme), args.block or "training", block)
        print(f"written into {args.readme}")
