"""The organisms' training step: rows drawn from the split, the injection added by a forward hook with the engine's
per-position weights, the layers below the adapters served without gradients, and the loss (:func:`train_step`);
called by :mod:`introspection_utils.experiments.organisms.training`."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import peft
import torch

from introspection_utils.engine.prompts import answer_token_id, introspection_prompt, paper_answers
from introspection_utils.engine.traced_pass import Injection
from introspection_utils.engine.trials import Trial
from introspection_utils.engine.vectors import left_pad, null_vector
from introspection_utils.experiments.organisms.frozen_work import FrozenWork, Keys, add_injection, prefix_cache, serving
from introspection_utils.experiments.organisms.splits import (
    CONDITIONS,
    OrganismSplit,
    load_choice,
    target,
    trained_concepts,
)
from introspection_utils.experiments.tasks.common import label_token_ids

if TYPE_CHECKING:
    from introspection_utils.engine.prompts import Prompt
    from introspection_utils.engine.vectors import ConceptVector, VectorBank
    from introspection_utils.experiments.organisms.training import OrganismConfig
    from introspection_utils.models.handle import ModelHandle

RANDOM_SEED_OFFSET = 10_000  # training's random directions: seeds the evaluation's null vectors never use


@dataclass(frozen=True)
class Row:
    """One training row: ``question`` asked in the paper's frame with ``condition``'s vector (``concept``'s, or a
    norm-matched random direction seeded by ``vector_seed``) at ``scale``. ``label``: a forced-choice row's number
    of ``concept`` in its listing (its question a :class:`~introspection_utils.experiments.organisms.splits.
    ChoiceRows` question); ``None`` for a wording or control."""

    question: str
    condition: str
    concept: str
    scale: float
    vector_seed: int
    label: str | None = None


def schedule(config: OrganismConfig, split: OrganismSplit, step: int) -> tuple[int, list[Row]]:
    """Step ``step``'s injection layer and rows, drawn from ``(seed, step)`` alone (a resumed run draws the same).

    Each row draws its condition from ``config.mix``, or, with ``config.contrast``, rows come in contrast sets: one
    draw of (question, concept, scale, random direction) asked under every condition ``mix`` gives weight, side by
    side in the batch (the last set cut at ``batch_size``). The taught answer of a wording flips with the condition
    (and its meaning with the wording's polarity); ``config.p_named``: how often a wording draw is a naming one;
    ``config.p_choice``: how often it is a forced-choice row instead (:func:`choice_draw`). A contrast set shows the
    model the same question both ways in one gradient, instead of leaving the injection's part to be separated from
    the wording's across steps."""
    rng = np.random.default_rng([config.seed, step])
    layer = int(config.layers[rng.integers(len(config.layers))])
    wordings = [w.text for w in split.wordings]
    naming = ([w.text for w in split.wordings if w.names], [w.text for w in split.wordings if not w.names])
    conditions = [c for c, weight in zip(CONDITIONS, config.mix, strict=True) if weight > 0]
    concepts = trained_concepts(split, config)
    rows: list[Row] = []
    while len(rows) < config.batch_size:
        condition = None if config.contrast else \
            CONDITIONS[rng.choice(3, p=np.asarray(config.mix) / sum(config.mix))]
        pool = split.controls if rng.random() < config.p_control else wordings
        # each of these is its own draw only when set: a config without it draws as before
        label = None
        if pool is wordings and config.p_choice and rng.random() < config.p_choice:
            question, concept, label = choice_draw(rng, concepts)
        else:
            if pool is wordings and config.p_named is not None:
                pool = naming[0] if rng.random() < config.p_named else naming[1]
            question, concept = pool[rng.integers(len(pool))], concepts[rng.integers(len(concepts))]
        scale = float(config.scales[rng.integers(len(config.scales))])
        seed = RANDOM_SEED_OFFSET + int(rng.integers(1_000_000))
        rows += [Row(question, c, concept, scale, seed, label) for c in ([condition] if condition else conditions)]
    return layer, rows[:config.batch_size]


def learning_rate(config: OrganismConfig, step: int) -> float:
    """Step ``step``'s (0-based) learning rate: ``config.lr``, then over the last ``config.decay_steps`` (d) steps
    down linearly towards 0, d/(d+1) of it at the first of them and 1/(d+1) at the last (warmup-stable-decay without
    the warmup: the constant part is the same in a training of any length, so a longer one can continue a shorter
    one's final state and decay from there)."""
    left = config.steps - step
    if left > config.decay_steps:
        return config.lr
    return config.lr * left / (config.decay_steps + 1)


def choice_draw(rng: np.random.Generator, concepts: Sequence[str]) -> tuple[str, str, str]:
    """A forced-choice row's ``(question, concept, label)``: a question of :func:`~introspection_utils.experiments.
    organisms.splits.load_choice`, a listing of one of its sizes drawn from ``concepts`` (the injected ``concept``
    among them) in a drawn order, and ``concept``'s number in it."""
    choice = load_choice()
    concept = concepts[rng.integers(len(concepts))]
    size = int(choice.sizes[rng.integers(len(choice.sizes))])
    others = [c for c in concepts if c != concept]
    options = [concept, *(others[i] for i in rng.choice(len(others), size - 1, replace=False))]
    options = [options[i] for i in rng.permutation(size)]
    return choice.question(int(rng.integers(len(choice.questions))), options), concept, str(options.index(concept) + 1)


@dataclass
class Batch:
    """A step's rows as tensors. ``prefix [1, P]``: the tokens every row shares before any injection (the paper's
    preamble; run once per pass, its keys and values served to every row). ``ids``, ``positions`` ``[B, S]``: each
    row's suffix (its prompt after the prefix, then its taught answer), left-padded, at absolute positions;
    ``mask [B, P + S]``; the ``injection`` over the suffix; each row's taught token ids (empty: keep the base
    model's answer); the trials it was built from."""

    prefix: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    injection: Injection
    taught: list[list[int]]
    trials: list[Trial]
    choice: list[bool] = field(default_factory=list)  # which rows are forced-choice rows (their loss apart)

    def tokens(self) -> int:
        """The tokens the batch's rows stand for (each row's whole prompt and answer)."""
        return int(self.mask.sum())

    def suffix_ids(self) -> tuple[tuple[int, ...], ...]:
        """Each row's suffix tokens without its padding (at positions ``P``, ``P + 1``, ... after the prefix)."""
        shared = self.prefix.shape[1]
        return tuple(tuple(self.ids[r][self.mask[r, shared:].bool()].tolist()) for r in range(self.ids.shape[0]))


def continuation_ids(handle: ModelHandle, text: str) -> list[int]:
    """The token ids of ``text`` as the assistant's answer (a one-word answer: :func:`prompts.answer_token_id`)."""
    if " " not in text:
        return [answer_token_id(handle, text)]
    context = handle.tokenizer.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False,
                                                   add_generation_prompt=True)
    base = handle.tokenizer(context, add_special_tokens=False)["input_ids"]
    full = handle.tokenizer(context + text, add_special_tokens=False)["input_ids"]
    if full[:len(base)] != base:
        raise ValueError(f"{text!r} does not tokenise as a continuation of the assistant turn")
    return full[len(base):]


def row_tokens(handle: ModelHandle, config: OrganismConfig, split: OrganismSplit, rows: Sequence[Row]
               ) -> tuple[list[Prompt], list[list[int]]]:
    """Each row's prompt and the token ids it is taught to answer (empty: it keeps the base model's answer)."""
    yes, no = paper_answers()
    prompts, taught = [], []
    for row in rows:
        if row.label is not None:  # a forced-choice row: the concept's number after the stem, as notebook 13 reads it
            prompt = row_prompt(handle, row.question, prefill=load_choice().prefill)
            prompts.append(prompt)
            taught.append(label_token_ids(handle, prompt, [row.label]) if row.condition == "concept" else [])
            continue
        prompts.append(row_prompt(handle, row.question))
        answer = target(config.kind, row.condition, row.question, split, row.concept, yes, no)
        taught.append([] if answer is None else continuation_ids(handle, answer))
    return prompts, taught


def make_batch(handle: ModelHandle, config: OrganismConfig, split: OrganismSplit, layer: int, rows: Sequence[Row],
               bank: VectorBank) -> Batch:
    """The tensors of ``rows`` injected at ``layer``: each row's prompt followed by its taught answer's tokens."""
    prompts, taught = row_tokens(handle, config, split, rows)
    batch = trial_batch(handle, row_trials(rows, prompts, layer, bank), taught, layer)
    batch.choice = [row.label is not None for row in rows]
    return batch


def row_trials(rows: Sequence[Row], prompts: Sequence[Prompt], layer: int, bank: VectorBank) -> list[Trial]:
    """``rows``' trials injected at ``layer``: the concept's vector from ``bank``, its norm-matched isotropic direction
    (seeded by the row), or nothing."""
    trials = []
    for row, prompt in zip(rows, prompts, strict=True):
        vector: ConceptVector | None = None
        if row.condition != "none":
            vector = bank.get(row.concept, layer)
            if row.condition == "random":
                vector = null_vector(vector, row.vector_seed, "isotropic")
        trials.append(Trial(prompt, vector, row.scale if vector is not None else 0.0, layer=layer))
    return trials


def shared_length(prompts: Sequence[Prompt]) -> int:
    """How many tokens ``prompts`` share before any of them can be injected into (and before each one's last
    token): the prefix a training step runs once and serves to every row."""
    first = prompts[0].input_ids
    shared = min(min(p.injection_start for p in prompts), *(len(p) - 1 for p in prompts))
    return next((i for i in range(shared) if any(p.input_ids[i] != first[i] for p in prompts)), shared)


def trial_batch(handle: ModelHandle, trials: Sequence[Trial], taught: Sequence[Sequence[int]], layer: int) -> Batch:
    """``trials``' prompts, each followed by its ``taught`` tokens, split at the longest prefix they share that no
    trial injects into, the suffixes left-padded."""
    first = trials[0].prompt.input_ids
    shared = shared_length([t.prompt for t in trials])
    for t in trials:  # the window rule puts nothing on the shared prefix
        assert not t.weights_at(torch.arange(shared)).any(), "a trial injects into the shared prefix"
    suffixes = [[*t.prompt.input_ids[shared:], *a] for t, a in zip(trials, taught, strict=True)]
    ids, mask, positions = left_pad(suffixes, handle.tokenizer.pad_token_id)
    positions = positions + shared
    injection = Injection.of(handle, trials, positions, layer=layer, valid=mask)
    full = torch.cat([torch.ones(len(trials), shared, dtype=mask.dtype), mask], dim=1)
    device = handle.device
    return Batch(torch.tensor([first[:shared]], device=device), ids.to(device), full.to(device),
                 positions.to(device), injection, [list(a) for a in taught], list(trials))


_PROMPTS: dict = {}


def row_prompt(handle: ModelHandle, question: str, *, prefill: str = "") -> Prompt:
    """``question`` in the organisms' training frame (the paper's preamble; the answer opened with ``prefill``),
    made once per tokenizer."""
    key = (id(handle.tokenizer), question, prefill)
    if key not in _PROMPTS:
        _PROMPTS[key] = introspection_prompt(handle, question, kind="organism-training", prefill=prefill)
    return _PROMPTS[key]


def _add_hook(injection: Injection, rows: torch.Tensor | slice):
    def hook(module, inputs, output):
        if isinstance(output, tuple):
            return (add_injection(output[0], injection, rows), *output[1:])
        return add_injection(output, injection, rows)
    return hook


def injected_logits(model: torch.nn.Module, layers: torch.nn.ModuleList, batch: Batch, *, first: int, keep: int,
                    hidden: torch.Tensor, rows: torch.Tensor | slice = slice(None), prefix: Keys | None = None
                    ) -> torch.Tensor:
    """The last ``keep`` positions' logits ``[B, keep, vocab]`` of ``batch``'s ``rows`` through ``model``: the layers
    below ``first`` are pass-throughs, the last of them returning ``hidden`` (those rows' stream after it,
    :meth:`FrozenWork.lower`: the injection already in it when it sits there), the batch's injection hooked onto
    ``layers[injection.layer]``'s output when it sits higher, the suffixes attending to ``prefix`` (the same model's
    keys and values of :attr:`Batch.prefix`; ``None``: the batch has none)."""
    ids, mask, positions = batch.ids[rows], batch.mask[rows], batch.positions[rows]
    cache = {"cache": prefix_cache(model, prefix, ids.shape[0]), "use_cache": True} if prefix is not None else \
        {"use_cache": False}
    layer = batch.injection.layer
    hooks = [layers[layer].register_forward_hook(_add_hook(batch.injection, rows))] if layer >= first else []
    try:
        with serving(layers, first, hidden):
            return model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache,
                         logits_to_keep=keep).logits
    finally:
        for h in hooks:
            h.remove()


def _loss(logits: torch.Tensor, base: torch.Tensor | None, batch: Batch, config: OrganismConfig
          ) -> tuple[torch.Tensor, float, float, float]:
    """The step's loss (the mean over rows) and the mean taught and kept (KL) terms, and the mean taught term of the
    forced-choice rows alone (NaN without any: whether the task's own form is being learned shows there, not in the
    taught mean the wordings dominate). ``base``: the base model's last-position logits ``[n_kept, vocab]`` of the
    rows taught nothing."""
    keep = logits.shape[1]
    terms, taught_terms, kept_terms, choice_terms = [], [], [], []
    kept_index = 0
    for r, answer in enumerate(batch.taught):
        if answer:
            n = len(answer)
            pred = logits[r, keep - 1 - n: keep - 1].float()
            term = torch.nn.functional.cross_entropy(pred, torch.tensor(answer, device=pred.device))
            taught_terms.append(term.detach())
            if batch.choice and batch.choice[r]:
                choice_terms.append(term.detach())
        else:
            log_q = logits[r, -1].float().log_softmax(-1)
            log_p = base[kept_index].float().log_softmax(-1)
            kept_index += 1
            top = log_p.topk(config.top_k).indices
            p, q = log_p[top].exp(), log_q[top].exp()
            p_rest, q_rest = (1 - p.sum()).clamp_min(1e-8), (1 - q.sum()).clamp_min(1e-8)
            term = (p * (log_p[top] - log_q[top])).sum() + p_rest * (p_rest.log() - q_rest.log())
            term = config.control_weight * term
            kept_terms.append(term.detach())
        terms.append(term)
    mean = lambda xs: float(torch.stack(xs).mean()) if xs else float("nan")  # noqa: E731
    return torch.stack(terms).mean(), mean(taught_terms), mean(kept_terms), mean(choice_terms)


def train_step(peft_model: peft.PeftModel, layers: torch.nn.ModuleList, batch: Batch, config: OrganismConfig,
               optimizer: torch.optim.Optimizer | None, frozen: FrozenWork | None = None) -> dict:
    """One step: the organism's forward over the batch, the base model's answers for the rows that keep them
    (adapters off, no gradients), the loss, and (with an ``optimizer``) its backward and update. ``frozen``: the
    training's :class:`FrozenWork` (a new one: computed for this step). Returns the step's record.

    * **The injection** is :meth:`introspection_utils.engine.traced_pass.Injection.of` (each row's ``scale × vector``
      times :meth:`Trial.weights_at` at its positions, 0 on padding), added to the decoder layer's output (by a
      forward hook; nnsight traces run without gradients); the answer tokens a row is taught run inside the window,
      as generated tokens do.
    * **The layers below the adapters** carry neither adapter nor gradient: each distinct row runs through them once
      in a training (:meth:`FrozenWork.lower`, the injection added there when it sits at their top); in the
      gradient pass they are pass-throughs and the last one returns that stream.
    * **The loss**: cross-entropy on each taught answer's tokens (:func:`splits.target`); where the target is the base
      model's answer, a KL divergence to the base model's distribution (adapters disabled, same injection) over its top
      ``top_k`` tokens and the rest as one, at the answer position, weighted by ``control_weight``.
    """
    keep = max(len(a) for a in batch.taught) + 1
    first = config.first_adapted
    frozen = frozen or FrozenWork()
    shared = batch.prefix.shape[1] > 0
    kept = torch.tensor([r for r, a in enumerate(batch.taught) if not a], dtype=torch.long)
    hidden = frozen.lower(peft_model, layers, batch, first)
    logits = injected_logits(peft_model, layers, batch, first=first, keep=keep, hidden=hidden,
                             prefix=frozen.adapted(peft_model, layers, batch, first) if shared else None)
    base = None
    if len(kept):
        with torch.no_grad(), peft_model.disable_adapter():
            keys = frozen.base(peft_model, layers, batch, first)[0] if shared else None
            base = injected_logits(peft_model, layers, batch, first=first, keep=1, rows=kept, hidden=hidden[kept],
                                   prefix=keys)[:, -1]
    loss, taught, kl, choice = _loss(logits, base, batch, config)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"loss": float(loss.detach()), "loss_taught": taught, "loss_kept": kl, "loss_choice": choice,
            "rows": len(batch.taught), "tokens": batch.tokens()}


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    """The unembedding's input made contiguous. Its input is the last positions sliced from the stream
    (``logits_to_keep``), a strided view; with the weight frozen, ``torch.matmul`` cannot fold such a view into one
    matrix product and runs a batched one over the weight expanded to every row, copied: rows × vocab × d_model
    elements a pass, most of a step's time on a large vocabulary (``docs/benchmark.md``: the training's speed)."""
    return (args[0].contiguous(), *args[1:])


def adapted(handle: ModelHandle, config: OrganismConfig) -> tuple[peft.PeftModel, torch.nn.ModuleList]:
    """A fresh copy of ``handle``'s model with LoRA adapters (seeded init) on layers ``first_adapted`` and up, and
    its decoder layers (``get_peft_model`` wraps the module it is given in place: the handle's own stays clean)."""
    model = copy.deepcopy(handle.torch_model)
    model.train(False)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(config.seed)
    lora = peft.LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                           target_modules=list(config.targets),
                           layers_to_transform=list(range(config.first_adapted, handle.arch.n_layers)),
                           layers_pattern="layers")
    peft_model = peft.get_peft_model(model, lora)
    model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    layers = model
    for attr in handle._family.layers.split("."):
        layers = getattr(layers, attr)
    return peft_model, layers
