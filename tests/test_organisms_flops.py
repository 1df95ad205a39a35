"""The organisms' training measured: the FLOP count of a training step against torch's own counter over a real step,
the replay of a finished training, the training table's throughput columns and the benchmark block's writer."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from introspection_utils.apps import bench, bench_training
from introspection_utils.core.paths import read_block
from introspection_utils.engine.vectors import concept_vectors
from introspection_utils.experiments.organisms import flops, forward, splits, training
from introspection_utils.experiments.organisms.frozen_work import FrozenWork

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-3  # relative: the count names every matmul a step runs; the counter sees the same ones


def _counted_step(handle, config, step: int):
    """Step ``step`` of ``config`` run for real under ``FlopCounterMode`` (fresh adapters, a fresh prefix, an
    optimizer update): the counter's total, its lm_head's part, and the batch."""
    split = splits.load_split()
    layer, rows = forward.schedule(config, split, step)
    bank = concept_vectors(handle, sorted({r.concept for r in rows}), progress=False, cache=False)
    batch = forward.make_batch(handle, config, split, layer, rows, bank)
    model, layers = forward.adapted(handle, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    counter = FlopCounterMode(display=False, depth=None)
    with counter:
        forward.train_step(model, layers, batch, config, optimizer, FrozenWork())
    lm_head = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith("lm_head"))
    return counter.get_total_flops(), lm_head, batch


def _check_against_the_counter(handle, config, step):
    total, lm_head, batch = _counted_step(handle, config, step)
    shape = flops.step_shape(handle, config, splits.load_split(), step)
    assert shape == flops.batch_shape(batch), "the replayed sizes are the built batch's"
    assert any(shape.taught) and 0 in shape.taught and len(set(shape.lengths)) > 1  # kept rows, taught, padding
    ours = flops.step_flops(handle, config, shape, fresh_prefix=True, executed=True)
    assert ours.total == pytest.approx(total, rel=TOLERANCE)
    assert ours.lm_head == pytest.approx(lm_head, rel=TOLERANCE)
    assert ours.total - ours.lm_head == pytest.approx(total - lm_head, rel=TOLERANCE)  # the layers, not the unembedding
    useful = flops.step_flops(handle, config, shape, fresh_prefix=True)
    assert useful.lm_head == ours.lm_head and useful.total < ours.total  # padding and the masked half not counted
    again = flops.step_flops(handle, config, shape, executed=True)
    assert again.total < ours.total and again.prefix < ours.prefix  # the base model's prefix pass: once a training


@pytest.mark.parametrize("kind, step", [("introspector", 0), ("yes-sayer", 1), ("anomaly-detector", 2)])
def test_the_step_count_equals_torchs_flop_counter_on_a_real_training_step(tiny, kind, step):
    """Two layers: the adapters on layer 1 only (whose query, key and value inputs carry no gradient), the injection
    at layer 0 or 1."""
    config = training.organism_config(tiny, kind, layers=[0, 1], scales=[2.0, 4.0], steps=4, batch_size=4)
    _check_against_the_counter(tiny, config, step)


def test_the_step_count_equals_torchs_flop_counter_on_the_embedded_model(smollm):
    """30 layers, adapters on 12 of them: gradients through whole adapted layers and the prefix's top layer."""
    config = training.organism_config(smollm, "introspector", steps=2, batch_size=4)
    assert smollm.arch.n_layers - config.first_adapted > 2
    _check_against_the_counter(smollm, config, 0)


def test_a_step_count_refuses_a_layer_it_does_not_know(tiny_llama):
    config = training.organism_config(tiny_llama, "introspector", layers=[0, 1], steps=1, batch_size=2)
    shape = flops.step_shape(tiny_llama, config, splits.load_split(), 0)
    layer = tiny_llama.torch_model.get_decoder().layers[0]
    layer.mlp.extra_proj = torch.nn.Linear(4, 4)
    try:
        with pytest.raises(ValueError, match="extra_proj"):
            flops.step_flops(tiny_llama, config, shape)
    finally:
        del layer.mlp.extra_proj


# ------------------------------------------------------------------------------------------- a finished training


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """Two tiny organisms trained for 3 and 2 steps into a temporary cache, each with its own settings as the
    findings train them (the introspector in contrast sets of 6 rows a step, the yes-sayer 4 rows drawn one by one),
    and their training table."""
    tmp = tmp_path_factory.mktemp("trained")
    split = splits.load_split()
    bank = concept_vectors(tiny_llama, split.train, progress=False)
    organisms = {kind: training.train_organism(
        tiny_llama, training.organism_config(tiny_llama, kind, layers=[0, 1], scales=[2.0, 4.0], **own),
        bank=bank, root=tmp / "organisms", progress=False)
        for kind, own in (("introspector", {"steps": 3, "batch_size": 6, "contrast": True}),
                          ("yes-sayer", {"steps": 2, "batch_size": 4}))}
    table = training.training_table(tiny_llama, organisms, tmp / "results", peak=7.5)
    return tmp, organisms, table


def test_the_training_table_shows_the_useful_flops_and_the_fraction_of_the_peak(tiny_llama, trained):
    tmp, organisms, table = trained
    split = splits.load_split()
    for row in table.itertuples():
        organism = organisms[row.kind]
        curve = organism.training().df
        steps = [flops.step_shape(tiny_llama, organism.config, split, s) for s in range(organism.config.steps)]
        assert [s.tokens for s in steps] == curve["tokens"].tolist() and [s.layer for s in steps] == curve[
            "layer"].tolist()
        fresh = [s.prefix_ids not in {t.prefix_ids for t in steps[:i]} for i, s in enumerate(steps)]
        ran = [{q for t in steps[:i] for q in t.sequences()} for i in range(len(steps))]  # below the adapters
        expected = sum(flops.step_flops(tiny_llama, organism.config, s, fresh_prefix=f, seen=r).total
                       for s, f, r in zip(steps, fresh, ran, strict=True))
        assert row.gflop * 1e9 == pytest.approx(expected) and fresh[0]
        assert row.gflop_per_s == pytest.approx(expected / curve["seconds"].sum() / 1e9)
        assert row.peak_gflop_per_s == 7.5 and row.peak_fraction == pytest.approx(row.gflop_per_s / 7.5)
        assert row.dtype == "float32"
    saved = pd.read_csv(tmp / "results" / "organisms_training.csv")
    assert {"gflop", "gflop_per_s", "peak_gflop_per_s", "peak_fraction", "dtype"} <= set(saved.columns)


def test_a_replay_that_does_not_match_the_recorded_training_is_refused(tiny_llama, trained, tmp_path):
    _, organisms, _ = trained
    organism = organisms["introspector"]
    copy = tmp_path / organism.folder.name
    shutil.copytree(organism.folder, copy)
    curve = pd.read_csv(copy / "training.csv")
    curve.loc[1, "tokens"] += 1
    curve.to_csv(copy / "training.csv", index=False)
    with pytest.raises(ValueError, match="step 2: the replayed step"):
        flops.training_flops(tiny_llama, dataclasses.replace(organism, folder=copy))


def test_the_writer_puts_the_training_into_the_benchmark_block(trained, tmp_path):
    tmp, organisms, table = trained
    doc = tmp_path / "benchmark.md"
    doc.write_text("before\n<!-- training:start -->\nold\n<!-- training:end -->\nafter\n")
    bench.main(["--training", str(tmp / "results"), "--organisms-root", str(tmp / "organisms"), "--readme", str(doc)])
    block = read_block(doc, "training")
    head, rule, *rows = block.split("\n\n")[0].splitlines()
    assert head.startswith("| tiny-llama, organisms' training in float32: injection layers 0, 1, "
                           "LoRA r 8 on layers 1–1 | examples/s | tokens/s | wall |")
    assert [r.split(" | ")[0] for r in rows] == ["| **introspector** (3 steps × 6 rows)",
                                                 "| **yes-sayer** (2 steps × 4 rows)"]
    for r, row in zip(rows, table.itertuples(), strict=True):  # the same seconds and counts as the notebook's table
        cells = r.strip("|").split(" | ")
        assert float(cells[1]) == pytest.approx(row.examples_per_s, rel=0.05)
        assert cells[3] == f"{row.train_seconds:.1f} s"
        gflops = row.gflop / row.train_seconds
        assert cells[4].startswith(f"{gflops:.0f} (")
    assert "Measured " in block and "written by `python -m introspection_utils.bench --training " in block
    assert doc.read_text().startswith("before\n") and doc.read_text().endswith("after\n")


def test_the_writer_reads_a_named_evaluations_trainings(tiny_llama, trained, tmp_path):
    """``--evaluation organisms_<word>`` reads that evaluation's training table (notebook 14's ``evaluation_name``),
    says so in the block's command, and refuses a name no table has."""
    tmp, organisms, _ = trained
    results = tmp_path / "results"
    training.training_table(tiny_llama, {"yes-sayer": organisms["yes-sayer"]}, results, peak=7.5,
                            name="organisms_float32_training")
    doc = tmp_path / "benchmark.md"
    doc.write_text("<!-- training-float32:start -->\n<!-- training-float32:end -->\n")
    bench.main(["--training", str(results), "--organisms-root", str(tmp / "organisms"), "--evaluation",
                "organisms_float32", "--block", "training-float32", "--readme", str(doc)])
    block = read_block(doc, "training-float32")
    assert "| **yes-sayer** (2 steps × 4 rows)" in block and "**introspector**" not in block
    assert "--evaluation organisms_float32 --block training-float32 --readme" in block
    with pytest.raises(FileNotFoundError):
        bench_training.trained_organisms(results, tmp / "organisms", "organisms_other")


def test_the_writer_refuses_a_training_from_another_machine(trained, monkeypatch):
    tmp, _, _ = trained
    organisms = bench_training.trained_organisms(tmp / "results", tmp / "organisms")
    real = bench_training.machine()
    monkeypatch.setattr(bench_training, "machine", lambda: {**real, "cpus": real["cpus"] + 1})
    with pytest.raises(ValueError, match="run this where it trained"):
        bench_training.training_machine(organisms)


def test_the_benchmark_page_holds_the_training_blocks_and_their_commands():
    """Each training block (bfloat16 on the findings' machine, float32 on an AVX2 one) is there once, and the page
    shows, outside it, the command that wrote it."""
    text = (ROOT / "docs" / "benchmark.md").read_text()
    for block in ("training", "training-float32", "training-float32-extra-concepts"):
        assert text.count(f"<!-- {block}:start -->") == 1
        command = re.search(r"written by `python -m ([^`]+)`", read_block(ROOT / "docs" / "benchmark.md", block))[1]
        assert f"    .venv/bin/python -m {command}\n" in text, command
