"""The work an organism's training does, counted from the model's shapes (:func:`step_flops`), replayed from its
config for any finished training (:func:`training_flops`), and set against its dtype's linear peak
(:func:`training_throughput`); read by :func:`~introspection_utils.experiments.organisms.training.training_table`."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from introspection_utils.engine.throughput import Throughput, linear_peak_gflops
from introspection_utils.experiments.organisms.forward import row_tokens, schedule, shared_length
from introspection_utils.experiments.organisms.splits import OrganismSplit, load_split

if TYPE_CHECKING:
    from introspection_utils.experiments.organisms.forward import Batch
    from introspection_utils.experiments.organisms.training import Organism, OrganismConfig
    from introspection_utils.models.handle import ModelHandle

# Where each of a decoder layer's linears sits, which decides whether its input carries a gradient.
ATTENTION_IN, ATTENTION_OUT, MLP_IN, MLP_OUT = ("q_proj", "k_proj", "v_proj"), "o_proj", ("gate_proj", "up_proj"), \
    "down_proj"


@dataclass(frozen=True)
class StepShape:
    """One training step's sizes. ``layer``: the injection layer; ``prefix_ids``: the tokens every row shares (run
    once per pass and served to every row); per row, ``lengths``: its suffix (its prompt after the prefix, then its
    taught answer), ``taught``: the taught answer's tokens (0: the row keeps the base model's answer) and
    ``suffix_ids``: the suffix's tokens (which rows run below the adapters: :meth:`sequences`)."""

    layer: int
    prefix_ids: tuple[int, ...] = field(repr=False)
    lengths: tuple[int, ...]
    taught: tuple[int, ...]
    suffix_ids: tuple[tuple[int, ...], ...] = field(repr=False)

    def sequences(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Each row's whole token sequence (prefix, suffix): what its pass below the adapters depends on
        (:meth:`~introspection_utils.experiments.organisms.frozen_work.FrozenWork.lower`)."""
        return [(self.prefix_ids, suffix) for suffix in self.suffix_ids]

    @property
    def prefix(self) -> int:
        return len(self.prefix_ids)

    @property
    def tokens(self) -> int:
        """The tokens the rows stand for, each row's prefix included (:meth:`Batch.tokens`)."""
        return len(self.lengths) * self.prefix + sum(self.lengths)


def batch_shape(batch: Batch) -> StepShape:
    """The sizes of a built :class:`~introspection_utils.experiments.organisms.forward.Batch`."""
    suffixes = batch.suffix_ids()
    return StepShape(batch.injection.layer, tuple(batch.prefix[0].tolist()), tuple(len(s) for s in suffixes),
                     tuple(len(a) for a in batch.taught), suffixes)


def step_shape(handle: ModelHandle, config: OrganismConfig, split: OrganismSplit, step: int) -> StepShape:
    """Step ``step``'s sizes replayed from the config alone (its schedule and the tokenizer; no vectors, no
    forward pass): what :func:`batch_shape` gives for the batch the training built at that step."""
    layer, rows = schedule(config, split, step)
    prompts, taught = row_tokens(handle, config, split, rows)
    shared = shared_length(prompts)
    suffixes = tuple((*p.input_ids[shared:], *t) for p, t in zip(prompts, taught, strict=True))
    return StepShape(layer, tuple(prompts[0].input_ids[:shared]), tuple(len(s) for s in suffixes),
                     tuple(len(t) for t in taught), suffixes)


@dataclass(frozen=True)
class StepFlops:
    """A training step's FLOPs by pass (:func:`step_flops`): ``lower`` (the layers below the adapters, without
    gradients, for the rows no earlier step ran), ``prefix`` (the shared prefix: the adapted pass with its backward,
    and the base model's pass when fresh), ``suffix`` (the rows through the adapted layers, forward and backward),
    ``kept`` (the base model's pass for the rows that keep their answer), ``lm_head`` (the unembedding on the kept
    positions of every pass)."""

    lower: float
    prefix: float
    suffix: float
    kept: float
    lm_head: float

    @property
    def total(self) -> float:
        return self.lower + self.prefix + self.suffix + self.kept + self.lm_head


def _linears(handle: ModelHandle) -> dict[str, tuple[int, int]]:
    """``name: (out_features, in_features)`` of the first decoder layer's linears (all layers share them)."""
    layer = handle.torch_model.get_decoder().layers[0]
    shapes = {name.rsplit(".", 1)[-1]: (m.out_features, m.in_features) for name, m in layer.named_modules()
              if isinstance(m, torch.nn.Linear)}
    known = {*ATTENTION_IN, ATTENTION_OUT, *MLP_IN, MLP_OUT}
    if set(shapes) != known:
        raise ValueError(f"{handle.name}: the FLOP count knows a layer of {sorted(known)}; this one has "
                         f"{sorted(shapes)}")
    return shapes


def step_flops(handle: ModelHandle, config: OrganismConfig, shape: StepShape, *, fresh_prefix: bool = False,
               seen: Collection[tuple] = frozenset(), executed: bool = False) -> StepFlops:
    """The matmul FLOPs of one :func:`~introspection_utils.experiments.organisms.forward.train_step` (2 per
    multiply-add), pass by pass as the step runs them, with ``N`` layers, the adapters on layers ``F`` and up
    (``config.first_adapted``), ``B`` rows:

    * **lower**: layers ``0..F-1`` forward without gradients, each distinct row alone at its own length, except the
      rows in ``seen`` (:meth:`StepShape.sequences` an earlier step of the training ran:
      :class:`~introspection_utils.experiments.organisms.frozen_work.FrozenWork` serves them);
    * **prefix**: the shared prefix through layers ``F..N-1`` with the adapters, forward, and backward for what the
      rows' attention reads from it (at the top layer only the keys' and values' projections); with
      ``fresh_prefix`` also the base model's whole forward over it (done once per distinct prefix in a training);
    * **suffix**: the rows through layers ``F..N-1`` with the adapters, forward and backward;
    * **kept**: the base model (adapters off) through layers ``F..N-1`` for the rows that keep their answer, forward;
    * **lm_head**: the unembedding on the positions each pass keeps (the rows' last ``max(taught) + 1``, forward and
      the input gradient; one position for each prefix pass and each kept row).

    Per linear of ``in × out`` weights over ``T`` tokens: forward ``2·in·out·T``; backward the input gradient (the
    frozen weight: ``2·in·out·T``) where its input carries a gradient — not at layer ``F``'s query, key and value
    projections and not below, whose inputs come from the gradient-free lower pass. Each LoRA adapter (rank ``r``,
    on ``config.targets``) adds ``2·r·(in + out)·T`` forward and in backward its two weight gradients, the gradient
    through B and, where its input carries one, through A. Attention: ``4·d_attn·q·k`` forward (scores and values;
    ``d_attn`` = heads × head dimension), ``8·d_attn·q·k`` backward; a sliding-window layer (Gemma's) reads only its
    window. Not counted: norms, activations, the rotary embedding, softmax, the loss, the optimizer.

    ``executed=False`` (the useful work, as the benchmark counts it): each row's own tokens, attention causal (a
    query at position ``t`` reads ``t + 1`` keys). ``executed=True``: what the kernels run — every row at the padded
    width (below the adapters each row alone), every query against every key (what
    ``torch.utils.flop_counter.FlopCounterMode`` counts).
    """
    cfg = handle.torch_model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = cfg.num_attention_heads * head_dim
    vocab, d_model = handle.torch_model.get_output_embeddings().weight.shape
    linears, n, first, r = _linears(handle), handle.arch.n_layers, config.first_adapted, config.rank
    targets = set(config.targets)
    p, width = shape.prefix, max(shape.lengths)
    rows = [width] * len(shape.lengths) if executed else list(shape.lengths)
    kept_rows = [length for length, taught in zip(rows, shape.taught, strict=True) if taught == 0]

    def pairs(lengths: list[int], before: int, window: int | None) -> int:
        """Query-key pairs of rows of ``lengths`` tokens after ``before`` cached ones, at a layer with ``window``."""
        if executed:  # every query against every key held; a sliding layer's cache holds its last window - 1
            held = before if window is None else min(before, window - 1)
            return sum(length * (held + length) for length in lengths)
        reach = window or before + max(lengths, default=0)  # the query at position x reads min(x + 1, window) keys
        return sum(min(x + 1, reach) for length in lengths for x in range(before, before + length))

    def forward(tokens: int, query_keys: int, *, adapters: bool) -> float:
        lora = sum(r * (i + o) for name, (o, i) in linears.items() if name in targets) if adapters else 0
        return 2.0 * (sum(o * i for o, i in linears.values()) + lora) * tokens + 4.0 * d_attn * query_keys

    def backward(tokens: int, query_keys: int, *, j: int, top_of_prefix: bool = False) -> float:
        stream = j > first  # the layer's input carries a gradient (it does not at layer F: the lower pass's output)
        grads = {m: stream or m in targets for m in ATTENTION_IN}  # q, k, v outputs carry a gradient
        attention = any(grads.values())
        grads[ATTENTION_OUT] = attention or ATTENTION_OUT in targets
        mlp_in = stream or grads[ATTENTION_OUT]
        grads.update({m: mlp_in or m in targets for m in MLP_IN})
        inputs = {**dict.fromkeys(ATTENTION_IN, stream), ATTENTION_OUT: attention, **dict.fromkeys(MLP_IN, mlp_in),
                  MLP_OUT: any(grads[m] for m in MLP_IN)}
        needed = ("k_proj", "v_proj") if top_of_prefix else tuple(linears)  # what the rows' attention reads
        total = 0.0
        for name in needed:
            o, i = linears[name]
            if inputs[name]:
                total += 2.0 * o * i * tokens + (2.0 * r * i * tokens if name in targets else 0.0)
            if name in targets:
                total += 2.0 * r * (2 * o + i) * tokens  # B's weight gradient and B's input gradient; A's weight
        return total + (0.0 if top_of_prefix else 8.0 * d_attn * query_keys * attention)

    types = getattr(cfg, "layer_types", None) or ["full_attention"] * n
    windows = [cfg.sliding_window if kind == "sliding_attention" else None for kind in types]
    suffix_tokens = sum(rows)
    fresh = [len(suffix) for _, suffix in dict.fromkeys(s for s in shape.sequences() if s not in seen)]
    lower = sum(forward(length, pairs([length], p, windows[j]), adapters=False) for j in range(first)
                for length in fresh)
    prefix = sum(forward(p, pairs([p], 0, windows[j]), adapters=True)
                 + backward(p, pairs([p], 0, windows[j]), j=j, top_of_prefix=j == n - 1) for j in range(first, n))
    if fresh_prefix:
        prefix += sum(forward(p, pairs([p], 0, windows[j]), adapters=False) for j in range(n))
    suffix = sum(forward(suffix_tokens, pairs(rows, p, windows[j]), adapters=True)
                 + backward(suffix_tokens, pairs(rows, p, windows[j]), j=j) for j in range(first, n))
    kept = sum(forward(sum(kept_rows), pairs(kept_rows, p, windows[j]), adapters=False) for j in range(first, n))
    keep = max(shape.taught) + 1
    prefix_passes = (1 + fresh_prefix) if p else 0  # a batch with no shared prefix runs no prefix pass
    positions = 2 * len(rows) * keep + prefix_passes + len(kept_rows)  # the rows' forward and input gradient
    return StepFlops(lower, prefix, suffix, kept, 2.0 * vocab * d_model * positions)


def training_flops(handle: ModelHandle, organism: Organism, *, split: OrganismSplit | None = None) -> float:
    """The useful FLOPs (:func:`step_flops`) of ``organism``'s whole recorded training, its steps' sizes replayed
    from its config (:func:`step_shape`) and checked against the recorded curve's layer and tokens; the base
    model's prefix pass counted once per distinct prefix and a row's pass below the adapters once per distinct row
    (a resumed training ran them once more, not counted; a training from before
    :class:`~introspection_utils.experiments.organisms.frozen_work.FrozenWork` served its rows ran that pass at every
    step, work not counted as useful)."""
    config, split = organism.config, split or load_split()
    if split.hash != config.split_hash:
        raise ValueError(f"{config.name} was trained on split {config.split_hash}; the split here is {split.hash}")
    curve = organism.training().df
    prefixes, sequences, total = set(), set(), 0.0
    for record in curve.itertuples():
        shape = step_shape(handle, config, split, int(record.step) - 1)
        if (shape.layer, shape.tokens) != (int(record.layer), int(record.tokens)):
            raise ValueError(f"{config.name}, step {record.step}: the replayed step (layer {shape.layer}, "
                             f"{shape.tokens} tokens) is not the recorded one (layer {record.layer}, "
                             f"{record.tokens} tokens)")
        total += step_flops(handle, config, shape, fresh_prefix=shape.prefix_ids not in prefixes, seen=sequences).total
        prefixes.add(shape.prefix_ids)
        sequences.update(shape.sequences())
    return total


def training_throughput(handle: ModelHandle, organisms: dict[str, Organism], *, peak: float | None = None
                        ) -> dict[str, Throughput]:
    """Each organism's training as a :class:`~introspection_utils.engine.throughput.Throughput`: its steps' wall
    time, rows and tokens as recorded, its useful FLOPs (:func:`training_flops`), against ``peak`` (GFLOP/s; default
    :func:`~introspection_utils.engine.throughput.linear_peak_gflops` of ``handle``, the training's model and
    dtype, measured now)."""
    for kind, organism in organisms.items():
        config = organism.config
        have = (handle.name, handle.revision, str(handle.dtype).removeprefix("torch."))
        want = (config.model, config.revision, config.dtype)
        if have != want:
            raise ValueError(f"{kind}: trained on (model, revision, dtype) {want}; the handle is {have}")
    peak = peak if peak is not None else linear_peak_gflops(handle)
    out = {}
    for kind, organism in organisms.items():
        curve = organism.training().df
        out[kind] = Throughput(kind, float(curve["seconds"].sum()), int(curve["rows"].sum()),
                               int(curve["tokens"].sum()), training_flops(handle, organism), peak)
    return out
