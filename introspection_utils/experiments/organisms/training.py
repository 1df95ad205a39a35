"""Training a model organism with ``peft`` (LoRA) and keeping it in the cache, keyed by every setting: the loop
with its checkpoints, the merged model folder ``load_model`` opens, and the training's measured table; called by
notebook 14."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import peft
import torch
from tqdm.auto import tqdm

from introspection_utils.core.paths import atomic_write, content_hash
from introspection_utils.core.results import SweepResult, load_result
from introspection_utils.engine.metadata import save_table
from introspection_utils.engine.throughput import linear_peak_gflops, load_average, machine
from introspection_utils.engine.vectors import concept_vectors, default_layer
from introspection_utils.experiments.organisms import splits
from introspection_utils.experiments.organisms.flops import training_throughput
from introspection_utils.experiments.organisms.forward import adapted, learning_rate, make_batch, schedule, train_step
from introspection_utils.experiments.organisms.frozen_work import FrozenWork
from introspection_utils.experiments.organisms.probe import DETECTED, behaviour_probe, probe_postfix
from introspection_utils.experiments.organisms.splits import KINDS, TRUTH, OrganismSplit, load_split
from introspection_utils.models.embedded import cache_dir
from introspection_utils.models.handle import load_model

if TYPE_CHECKING:
    from introspection_utils.engine.vectors import VectorBank
    from introspection_utils.models.handle import ModelHandle

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT_EVERY = 10
FINAL_STATE = "final_state.pt"  # a finished training's adapter, optimizer state and curve at its last step
# Fields added to OrganismConfig after organisms were trained, with the value that trains as before: left out of
# the cache key at that value (OrganismConfig.key).
ADDED_FIELDS = {"contrast": False, "p_named": None, "extra_concepts": (), "p_choice": 0.0, "choice_hash": "",
                "decay_steps": 0}
@dataclass(frozen=True)
class OrganismConfig:
    """Every setting a trained organism depends on; :meth:`key` names it in the cache.

    ``layers``: the injection layers trained over (each batch one of them); the adapters sit on every layer above
    the lowest. ``scales``: the injection scales trained over (× the raw concept vector). ``mix``: the fractions of
    rows with a concept vector, a norm-matched random direction and no injection. ``p_control``: the fraction of
    rows asking a training control. ``steps`` × ``batch_size`` rows in all, drawn by ``seed``. ``contrast``: rows in
    contrast sets, each draw asked under every condition (:func:`~introspection_utils.experiments.organisms.forward.
    schedule`). ``p_named``: the fraction of the wording draws that ask a naming wording (``None``: every wording
    alike, so an introspector sees naming sentences only at the naming wordings' share of the training wordings).
    ``extra_concepts``: concepts trained on besides the split's (:func:`~introspection_utils.experiments.organisms.
    splits.extra_concepts`; ``organism_config(..., extra_concepts=True)`` takes that list), drawn alike with them.
    ``p_choice``: the share of an introspector's wording draws that are forced-choice rows (``splits.ChoiceRows``,
    hashed as ``choice_hash`` by :func:`organism_config`): the injected concept's number taught. ``decay_steps``:
    the last that many steps take the learning rate linearly down to 0 (:func:`~introspection_utils.experiments.
    organisms.forward.learning_rate`; 0: constant throughout)."""

    kind: str
    model: str
    revision: str
    dtype: str
    layers: tuple[int, ...]
    scales: tuple[float, ...]
    split_hash: str
    rank: int = 8
    lora_alpha: float = 16.0
    lr: float = 1e-3
    steps: int = 60
    batch_size: int = 8
    seed: int = 0
    mix: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    p_control: float = 0.3
    control_weight: float = 1.0
    top_k: int = 32
    targets: tuple[str, ...] = field(default=LORA_MODULES)
    contrast: bool = False
    p_named: float | None = None
    extra_concepts: tuple[str, ...] = ()
    p_choice: float = 0.0
    choice_hash: str = ""
    decay_steps: int = 0

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> OrganismConfig:
        """The config written as ``fields`` (a ``config.json`` or a table's metadata: lists for tuples, other keys
        such as ``key`` ignored); a field added later takes its default (:data:`ADDED_FIELDS`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in names})

    def key(self) -> str:
        """A hash of every field: two configs share a cache entry exactly when all their settings agree. A field
        added after organisms were trained (:data:`ADDED_FIELDS`) is left out of the hash while it has the value
        that reproduces the training before it, so those organisms keep their names and caches."""
        fields = asdict(self)
        return content_hash({k: v for k, v in fields.items() if k not in ADDED_FIELDS or v != ADDED_FIELDS[k]})

    @property
    def name(self) -> str:
        """The organism's model name (its merged folder's name): ``<base model>-<kind>-<key[:8]>``."""
        return f"{self.model}-{self.kind}-{self.key()[:8]}"

    @property
    def first_adapted(self) -> int:
        """The lowest layer with adapters: the one above the lowest injection layer (a layer's own weights act
        before the injection added to its output)."""
        return min(self.layers) + 1


def organism_config(handle: ModelHandle, kind: str, *, layers: Sequence[int] | None = None,
                    scales: Sequence[float] = (2.0, 4.0, 8.0, 12.0, 16.0), split: OrganismSplit | None = None,
                    **settings) -> OrganismConfig:
    """The config of organism ``kind`` on ``handle``'s model: ``layers`` default to the atlas's layer (2/3 of the
    depth) and the two above it (those below the last layer; on a model too shallow for any, the last layer but
    one), so that the adapters sit above the atlas's layer and the concept vectors the evaluation extracts there from
    the organism itself are the base model's, the ones it was trained with (adapters at or below the atlas's layer
    turn the vectors read there away from those: the first Qwen organisms' adapters began one layer below it);
    ``settings``: :class:`OrganismConfig`'s other fields (``steps``, ``rank``, ...; ``extra_concepts=True``: the
    training file's list, :func:`~introspection_utils.experiments.organisms.splits.extra_concepts`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown organism kind {kind!r}; use one of {', '.join(KINDS)}")
    layer = default_layer(handle)
    top = handle.arch.n_layers - 2  # an injection at the last layer reaches no adapter
    chosen = layers if layers is not None else [x for x in (layer, layer + 1, layer + 2) if x <= top] or [top]
    layers = tuple(sorted({handle.check_layer(int(x)) for x in chosen}))
    if layers[0] + 1 >= handle.arch.n_layers:
        raise ValueError(f"no layer above injection layer {layers[0]} to adapt ({handle.name} has "
                         f"{handle.arch.n_layers} layers: 0..{handle.arch.n_layers - 1})")
    split = split or load_split()
    if settings.get("extra_concepts") is True:
        settings["extra_concepts"] = splits.extra_concepts()
    if settings.get("p_choice"):
        settings.setdefault("choice_hash", splits.load_choice().hash)
    return OrganismConfig(kind, handle.name, handle.revision, str(handle.dtype).removeprefix("torch."), layers,
                          tuple(float(s) for s in scales), split.hash, **settings)


@dataclass(frozen=True)
class Organism:
    """A trained (or, ``complete=False``, interrupted) organism in its cache ``folder``: ``merged`` (the plain model
    folder ``load_model`` opens), ``adapter`` (the raw LoRA adapter), ``training.csv`` (its loss curve)."""

    config: OrganismConfig
    folder: Path
    complete: bool
    reused: bool = False

    @property
    def truth(self) -> str:
        return TRUTH[self.config.kind]

    @property
    def merged(self) -> Path:
        return self.folder / self.config.name

    @property
    def adapter(self) -> Path:
        return self.folder / "adapter"

    def training(self) -> SweepResult:
        """The loss curve (one row per step) with its metadata (config, wall time, throughput, machine)."""
        return load_result(self.folder / "training")

    def load(self, **kwargs) -> ModelHandle:
        """The merged organism as a handle (``load_model(folder, **kwargs)``; default dtype: the training's)."""
        return load_model(str(self.merged), **{"dtype": self.config.dtype, **kwargs})


def organism_folder(config: OrganismConfig, root: str | Path | None = None) -> Path:
    """Where ``config``'s organism lives: ``root`` (default ``cache_dir()/organisms``) / its name."""
    return (Path(root) if root is not None else cache_dir() / "organisms") / config.name


def _check(handle: ModelHandle, config: OrganismConfig, split: OrganismSplit) -> None:
    have = (handle.name, handle.revision, str(handle.dtype).removeprefix("torch."), split.hash)
    want = (config.model, config.revision, config.dtype, config.split_hash)
    if have != want:
        raise ValueError(f"config {config.name} was made for (model, revision, dtype, split) {want}; the handle and "
                         f"split give {have}")
    if config.p_named is not None and not (0 <= config.p_named <= 1 and any(w.names for w in split.wordings)):
        raise ValueError(f"p_named={config.p_named} needs a fraction in [0, 1] and a naming wording in the split")
    if not 0 <= config.decay_steps <= config.steps:
        raise ValueError(f"decay_steps={config.decay_steps}: the decay needs 0..steps ({config.steps}) steps")
    splits.check_extra_concepts(config.extra_concepts, split)
    splits.check_choice_config(config)


def train_organism(handle: ModelHandle, config: OrganismConfig, *, bank: VectorBank | None = None,
                   root: str | Path | None = None, checkpoint_every: int = CHECKPOINT_EVERY,
                   stop_at: int | None = None, progress: bool = True, probe_every: int | None = None) -> Organism:
    """Train ``config``'s organism on ``handle``'s model (a fresh copy; the handle is not changed), or reuse it.

    A finished organism in its folder (:func:`organism_folder`) is returned as it is (``reused``). Otherwise training
    starts, or resumes from the folder's checkpoint (written every ``checkpoint_every`` steps and at the end), or
    continues a finished shorter training of the same settings (:func:`shorter_training`);
    ``stop_at``: stop after that step, leaving the checkpoint (what an interruption leaves; ``complete=False``).
    At the end: the adapter, the merged folder, ``training.csv`` with its metadata, ``config.json``, and the last
    step's state (:data:`FINAL_STATE`).

    Every ``probe_every`` steps (default: at each checkpoint; 0: never) and at the last step, the behaviour probe
    (:func:`~introspection_utils.experiments.organisms.probe.behaviour_probe`: how often the organism reports an
    injected thought with a training concept's vector, a random direction and none) is recorded in the curve beside
    the loss (columns ``detected_*``, ``yes_*``, ``probe_seconds``; ``seconds`` is the step's own time) and shown on
    the bar: a loss that falls while the three rates stay together is an organism answering alike whatever is
    injected.
    """
    folder = organism_folder(config, root)
    if (folder / "complete.json").is_file():
        return Organism(config, folder, complete=True, reused=True)
    split = load_split()
    _check(handle, config, split)
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    probe_every = checkpoint_every if probe_every is None else int(probe_every)
    if probe_every < 0:
        raise ValueError(f"probe_every must be >= 0 (0: no probe), got {probe_every}")
    bank = bank or concept_vectors(handle, splits.trained_concepts(split, config), progress=progress)
    peft_model, layers = adapted(handle, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=0.0)
    checkpoint, start, records = folder / "checkpoint.pt", 0, []
    state, source = None, None
    if checkpoint.is_file():
        state, source = torch.load(checkpoint, weights_only=False), checkpoint
        if state["key"] != config.key():
            raise ValueError(f"{checkpoint} belongs to another config ({state['key']})")
    elif (shorter := shorter_training(config, folder.parent)) is not None:
        state, source = torch.load(shorter / FINAL_STATE, weights_only=False), shorter / FINAL_STATE
    if state is not None:
        peft.set_peft_model_state_dict(peft_model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        start, records = state["step"], state["records"]
        records = [{"lr": learning_rate(config, r["step"] - 1), **r} for r in records]  # curves from before "lr"
        if progress:
            print(f"{config.name}: continuing from step {start} ({source})", flush=True)
    frozen = FrozenWork()
    probed = next((r for r in reversed(records) if DETECTED[0] in r), None)
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=config.name,
               disable=not progress)
    for step in bar:
        began, lr = time.perf_counter(), learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        layer, rows = schedule(config, split, step)
        record = train_step(peft_model, layers, make_batch(handle, config, split, layer, rows, bank), config,
                            optimizer, frozen)
        records.append({"step": step + 1, "layer": layer, "lr": lr, **record,
                        "seconds": time.perf_counter() - began})
        done = step + 1
        if probe_every and (done % probe_every == 0 or done == config.steps):
            began = time.perf_counter()
            records[-1].update(behaviour_probe(peft_model, layers, handle, config, split, bank, frozen),
                               probe_seconds=time.perf_counter() - began)
            probed = records[-1]
        bar.set_postfix(loss=f"{record['loss']:.3f}", **probe_postfix(probed))
        if done % checkpoint_every == 0 or done == config.steps or done == stop_at:
            state = {"key": config.key(), "step": done, "records": records, "optimizer": optimizer.state_dict(),
                     "adapter": peft.get_peft_model_state_dict(peft_model)}
            atomic_write(checkpoint, lambda tmp, state=state: torch.save(state, tmp))
        if stop_at is not None and done >= stop_at and done < config.steps:
            return Organism(config, folder, complete=False)
    _finish(handle, config, peft_model, folder, records)
    os.replace(checkpoint, folder / FINAL_STATE)  # kept: a longer training of the same settings continues from it
    return Organism(config, folder, complete=True)


def _last_probe(curve: pd.DataFrame) -> dict[str, float]:
    """The last behaviour probe of a training curve (NaN where it recorded none: ``probe_every=0``, or trained
    before the probe existed)."""
    probed = curve.dropna(subset=[DETECTED[0]]) if DETECTED[0] in curve else curve.iloc[:0]
    return {c: float(probed[c].iloc[-1]) if len(probed) else float("nan") for c in DETECTED}


def shorter_training(config: OrganismConfig, root: Path) -> Path | None:
    """The folder under ``root`` of the longest finished training whose settings are ``config``'s but for fewer
    ``steps``, run at a constant learning rate up to where ``config``'s decay begins (``decay_steps``), that kept
    its final state (:data:`FINAL_STATE`), or ``None``. A step's rows depend on ``(seed, step)`` alone and so,
    there, does its learning rate, so its steps are this training's first steps: continuing from its final state
    gives what training from the start would (the test holds the two equal)."""
    found: list[tuple[int, Path]] = []
    for other in root.glob(f"{config.model}-{config.kind}-*/config.json"):
        fields = json.loads(other.read_text())
        key = fields.pop("key", None)
        steps = fields.get("steps")
        if not isinstance(steps, int) or steps >= config.steps or not (other.parent / FINAL_STATE).is_file():
            continue
        try:
            theirs = OrganismConfig.from_fields(fields)
        except TypeError:
            continue
        if (theirs.key() == key and steps <= config.steps - config.decay_steps
                and dataclasses.replace(config, steps=steps, decay_steps=0) == theirs):
            found.append((steps, other.parent))
    return max(found)[1] if found else None


def _save_folder(target: Path, write) -> None:
    """``write(tmp)`` into a temporary folder beside ``target``, then renamed to it (replacing a stale one)."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _finish(handle: ModelHandle, config: OrganismConfig, peft_model: peft.PeftModel, folder: Path,
            records: list[dict]) -> None:
    """The adapter, the merged model folder, the training table and the completion marker, in that order."""
    organism = Organism(config, folder, complete=True)
    _save_folder(organism.adapter, peft_model.save_pretrained)
    merged = peft_model.merge_and_unload()

    def write_merged(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        handle.tokenizer.save_pretrained(tmp)
    _save_folder(organism.merged, write_merged)
    curve = pd.DataFrame(records)
    seconds, rows, tokens = curve["seconds"].sum(), curve["rows"].sum(), curve["tokens"].sum()
    throughput = {"train_seconds": round(float(seconds), 3), "examples_per_s": round(float(rows / seconds), 3),
                  "tokens_per_s": round(float(tokens / seconds), 2), "examples": int(rows), "tokens": int(tokens)}
    save_table(handle, curve.assign(model=config.name), folder, "training", **asdict(config), key=config.key(),
               truth=TRUTH[config.kind], throughput=throughput, machine=machine())
    atomic_write(folder / "config.json", json.dumps({**asdict(config), "key": config.key()}, indent=1))
    atomic_write(folder / "complete.json", json.dumps(throughput, indent=1))


def train_organisms(handle: ModelHandle, kinds: Sequence[str] = KINDS, *, layers: Sequence[int] | None = None,
                    scales: Sequence[float] = (2.0, 4.0, 8.0, 12.0, 16.0), root: str | Path | None = None,
                    progress: bool = True, steps_by_kind: Mapping[str, int] | None = None,
                    settings_by_kind: Mapping[str, Mapping[str, Any]] | None = None, probe_every: int | None = None,
                    **settings) -> dict[str, Organism]:
    """Each organism of ``kinds`` trained (or reused) with the same settings (:func:`organism_config`), the
    training concepts' vectors extracted once. ``steps_by_kind``: a kind's own number of steps, overriding
    ``settings["steps"]`` for it (the look-alikes learn a rule that ignores which vector was injected, and can take
    fewer steps than the introspector). ``settings_by_kind``: a kind's own settings of any kind (``{"introspector":
    {"batch_size": 12, "contrast": True}}``), applied last; each organism's config, so its cache key and its row of
    the training table, says what it was trained with. Both may name kinds not among ``kinds`` (one recipe for every
    kind, of which a run trains some); a name that is no kind, or a setting that is no training setting, is refused
    before anything is trained. ``probe_every``: :func:`train_organism`'s (not a training setting: the probe reads
    the organism, it does not change it)."""
    by_kind = {kind: {**({"steps": int(n)} if n is not None else {}), **dict((settings_by_kind or {}).get(kind, {}))}
               for kind in kinds for n in [(steps_by_kind or {}).get(kind)]}
    unknown = sorted((set(steps_by_kind or {}) | set(settings_by_kind or {})) - set(KINDS))
    if unknown:
        raise ValueError(f"steps_by_kind / settings_by_kind name {unknown}: no such organism kind (the kinds: "
                         f"{', '.join(KINDS)})")
    fields = {f.name for f in dataclasses.fields(OrganismConfig)} - {"kind", "model", "revision", "dtype",
                                                                       "split_hash"}
    bad = sorted({k for own in (settings_by_kind or {}).values() for k in own} - fields)
    if bad:
        raise ValueError(f"settings_by_kind sets {bad}: not training settings (those are {', '.join(sorted(fields))})")
    configs = {kind: organism_config(handle, kind, **{"layers": layers, "scales": scales, **settings, **by_kind[kind]})
               for kind in kinds}
    split = load_split()
    bank = concept_vectors(handle, dict.fromkeys(c for config in configs.values()
                                                 for c in splits.trained_concepts(split, config)), progress=progress)
    return {kind: train_organism(handle, config, bank=bank, root=root, progress=progress, probe_every=probe_every)
            for kind, config in configs.items()}


def training_table(handle: ModelHandle, organisms: dict[str, Organism], results_dir: str | Path | None = None, *,
                   peak: float | None = None, name: str = "organisms_training") -> pd.DataFrame:
    """One row per organism: kind, truth, name, steps, first and final loss (the mean of the last 5 steps), the
    last behaviour probe's detected rates (``detected_concept``, ``_random``, ``_none``: on training concepts), the
    training's wall time, examples/s, tokens/s and load average (as measured when it was trained), its dtype, useful
    GFLOP (:func:`~introspection_utils.experiments.organisms.flops.training_flops`), GFLOP/s and their fraction of
    ``peak`` (GFLOP/s; default: the dtype's linear peak timed now, :func:`linear_peak_gflops`), reused; saved as
    ``<name>.csv`` in ``results_dir`` when given (the peak, its threads and load in the metadata; notebook 14 names
    it after its evaluation, :func:`~introspection_utils.experiments.organisms.evaluation.table_names`)."""
    load = load_average()
    peak = peak if peak is not None else linear_peak_gflops(handle)
    measured = training_throughput(handle, organisms, peak=peak)
    rows = []
    for kind, organism in organisms.items():
        result = organism.training()
        meta, work = result.meta["spec"], measured[kind]
        rows.append({"kind": kind, "truth": organism.truth, "name": organism.config.name,
                     "steps": organism.config.steps, "first_loss": float(result.df["loss"].iloc[0]),
                     "final_loss": float(result.df["loss"].tail(5).mean()), **_last_probe(result.df),
                     **meta["throughput"],
                     "load_avg": meta["machine"]["load_avg"][0], "cpu": meta["machine"]["cpu"],
                     "dtype": organism.config.dtype, "gflop": work.flops / 1e9,
                     "gflop_per_s": work.flops / work.seconds / 1e9, "peak_gflop_per_s": peak,
                     "peak_fraction": work.fraction, "reused": organism.reused})
    table = pd.DataFrame(rows)
    if results_dir is not None:
        save_table(handle, table, results_dir, name,
                   configs={k: {**asdict(o.config), "key": o.config.key()} for k, o in organisms.items()},
                   peak={"gflop_per_s": peak, "torch_threads": torch.get_num_threads(), "load_avg": load})
    return table
