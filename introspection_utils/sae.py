"""SAE features under injection: does a sparse autoencoder at the injection layer see the injected concept, and do
"yes"-like features rise in later layers?

Needs the optional extra ``sae`` (``pip install -e '.[sae]'``: sae-lens 6.54, which pulls transformer-lens, wandb,
datasets; it keeps this stack's torch, transformers and nnsight). Two sources of SAEs, one analysis:

* **pretrained** (:func:`load_sae`, needs network once): Gemma Scope for Gemma-2, by sae-lens release and id, e.g.

  ============================  =====================================  ===========================  =============
  model                         release                                sae_id                       layers
  ============================  =====================================  ===========================  =============
  google/gemma-2-9b-it          ``gemma-scope-9b-it-res-canonical``    ``layer_{L}/width_16k/canonical``  9, 20, 31
  google/gemma-2-9b-it          ``gemma-scope-9b-pt-res-canonical``    ``layer_{L}/width_16k/canonical``  0 … 41
  google/gemma-2-27b-it         ``gemma-scope-27b-pt-res-canonical``   ``layer_{L}/width_131k/canonical`` 10, 22, 34
  ============================  =====================================  ===========================  =============

  (``pt`` SAEs were trained on the base model; Gemma Scope reports they transfer to the instruction-tuned model.)
  All are residual-stream SAEs (``blocks.L.hook_resid_post`` = decoder layer L's output, what the engine injects
  into and reads). :data:`GEMMA_SCOPE` holds the table.
* **trained here** (:func:`train_saes`): the embedded model has no pretrained SAE, so a small standard (ReLU, L1)
  SAE is trained with sae-lens's own ``SAETrainer`` on activations the model produces itself: its greedy/sampled
  answers to "Tell me about {word}" for the paper's concept words, to the paper's 50 sentences, and to the
  injected-thought and control questions (made offline with :func:`introspection_utils.generation.generate`).
  ``SAETrainer`` takes any iterator of activation batches, so the in-memory activations feed it directly (no
  ``HookedTransformer``, no dataset download). The SAEs are cached in :func:`introspection_utils.embedded.cache_dir`
  keyed by model, revision, corpus, layer and every training setting.

Feature readouts are at the answer position (the last prompt token), from the engine's batched trace
(:func:`introspection_utils.inject.residuals`), with and without the injection.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nnsight
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from introspection_utils.data import load_list, load_prompts
from introspection_utils.embedded import cache_dir
from introspection_utils.inject import Trial, residuals
from introspection_utils.prompts import (
    chat_prompt,
    control_questions,
    introspection_prompt,
    question_prompts,
    yes_no_ids,
)

if TYPE_CHECKING:
    import matplotlib.pyplot as plt

    from introspection_utils.models import ModelHandle
    from introspection_utils.vectors import VectorBank

SAE_EXTRA = "pip install -e '.[sae]'  (or: pip install 'sae-lens>=6.54,<7')"
CACHE_VERSION = 1

# model → (release, sae_id template with {layer}, layers available). See the module docstring.
GEMMA_SCOPE: dict[str, list[tuple[str, str, tuple[int, ...]]]] = {
    "gemma-2-9b-it": [("gemma-scope-9b-it-res-canonical", "layer_{layer}/width_16k/canonical", (9, 20, 31)),
                      ("gemma-scope-9b-pt-res-canonical", "layer_{layer}/width_16k/canonical", tuple(range(42)))],
    "gemma-2-27b-it": [("gemma-scope-27b-pt-res-canonical", "layer_{layer}/width_131k/canonical", (10, 22, 34))],
}


def _sae_lens() -> Any:
    try:
        import sae_lens
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"the SAE experiment needs sae-lens (an optional extra): {SAE_EXTRA}") from err
    return sae_lens


# ----------------------------------------------------------------------------------------------- loading


def load_sae(release: str, sae_id: str, *, device: str | torch.device | None = None) -> Any:
    """A pretrained SAE from sae-lens's directory (downloads from the Hugging Face hub once; needs network).

    ``release``/``sae_id`` as in sae-lens, e.g. ``("gemma-scope-9b-pt-res-canonical",
    "layer_28/width_16k/canonical")``. An unknown release or id is a ``ValueError`` before any download.
    """
    sae_lens = _sae_lens()
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        close = sorted(r for r in directory if release.split("-")[0] in r)[:8]
        raise ValueError(f"unknown SAE release {release!r}; e.g. {', '.join(close) or ', '.join(list(directory)[:8])}")
    ids = directory[release].saes_map
    if sae_id not in ids:
        raise ValueError(f"release {release!r} has no SAE {sae_id!r}; it has e.g. {', '.join(list(ids)[:6])}")
    return sae_lens.SAE.from_pretrained(release, sae_id, device=str(device or "cpu"))


def load_sae_from_folder(path: str | Path, *, device: str | torch.device | None = None) -> Any:
    """An SAE saved in sae-lens's folder format (``cfg.json`` + ``sae_weights.safetensors``); offline."""
    sae_lens = _sae_lens()
    path = Path(path)
    missing = [f for f in ("cfg.json", "sae_weights.safetensors") if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not an SAE folder: missing {', '.join(missing)} "
                                f"(save one with sae.save_model(folder))")
    return sae_lens.SAE.load_from_disk(str(path), device=str(device or "cpu"))


def sae_layer(sae: Any) -> int | None:
    """The decoder layer whose output the SAE reads (from its hook name ``blocks.L.hook_resid_post``), or None."""
    hook = getattr(sae.cfg.metadata, "hook_name", None) or ""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook)
    return int(match.group(1)) if match else None


def check_sae(handle: ModelHandle, sae: Any, layer: int) -> None:
    """``ValueError`` unless ``sae`` fits ``handle`` (``d_in = d_model``) and reads the residual at ``layer``."""
    handle.check_layer(layer)
    if sae.cfg.d_in != handle.arch.d_model:
        raise ValueError(f"SAE has d_in={sae.cfg.d_in}; {handle.name} has d_model={handle.arch.d_model}")
    hook = getattr(sae.cfg.metadata, "hook_name", None)
    found = sae_layer(sae)
    if hook and found is None:
        raise ValueError(f"SAE reads {hook!r}, not a residual stream (blocks.L.hook_resid_post)")
    if found is not None and found != layer:
        raise ValueError(f"this SAE reads layer {found} ({hook}) but is used at layer {layer}")


def _as_layer_map(handle: ModelHandle, saes: Any) -> dict[int, Any]:
    if not isinstance(saes, Mapping):
        layer = sae_layer(saes)
        if layer is None:
            raise ValueError("this SAE does not say its layer (no blocks.L.hook_resid_post hook name): "
                             "pass {layer: sae}")
        saes = {layer: saes}
    if not saes:
        raise ValueError("no SAEs given")
    for layer, sae in saes.items():
        check_sae(handle, sae, layer)
    return dict(sorted(saes.items()))


def later_layer(handle: ModelHandle, layer: int, later: int | None = None) -> int:
    """``later`` if given (checked, above ``layer``), else halfway from ``layer`` to the last layer: 24 for an
    injection at 20 of 30 (SmolLM2), 34 for 28 of 42 (Gemma-2-9B)."""
    handle.check_layer(layer)
    if later is None:
        return (layer + handle.arch.n_layers - 1) // 2 if layer < handle.arch.n_layers - 1 else layer
    later = handle.check_layer(int(later))
    if later < layer:
        raise ValueError(f"later_layer {later} is below the injection layer {layer}")
    return later


def get_saes(handle: ModelHandle, layers: Sequence[int], *, release: str | None = None,
             sae_id: str = "layer_{layer}/width_16k/canonical", **train: Any) -> dict[int, Any]:
    """``{layer: SAE}`` for ``layers``: pretrained from ``release`` (``sae_id`` formatted with each layer) when a
    release is given, else small SAEs trained here on the model's own activations (:func:`train_saes` with
    ``train``'s keywords; cached)."""
    layers = sorted({handle.check_layer(int(layer)) for layer in layers})
    if release is None:
        return train_saes(handle, layers, **train)
    saes = {layer: load_sae(release, sae_id.format(layer=layer), device=handle.device) for layer in layers}
    return _as_layer_map(handle, saes)


# ----------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    """What the small SAE is trained on: the model's own answers to varied prompts, generated offline.

    ``n_words`` "Tell me about {word}" prompts (the paper's concept words), ``n_sentences`` of the paper's sentences
    as user turns, and the injected-thought question plus ``n_controls`` control questions (the experiment's own
    prompts, so the answer position is in distribution). ``max_new_tokens`` per answer, sampled at
    ``temperature`` with ``seed``.
    """

    n_words: int = 50
    n_sentences: int = 50
    n_controls: int = 4
    max_new_tokens: int = 16  # generation dominates the cost (~60 ms per generated token on a busy 2-core CPU)
    temperature: float = 0.8
    seed: int = 0


def corpus_prompts(handle: ModelHandle, corpus: Corpus) -> list:
    """The chat prompts of ``corpus`` (:class:`introspection_utils.prompts.Prompt`), in a fixed order."""
    words, sentences = load_list("concept_words"), load_list("sentences")
    if not (0 <= corpus.n_words <= len(words) and 0 <= corpus.n_sentences <= len(sentences)):
        raise ValueError(f"corpus asks for {corpus.n_words} words (max {len(words)}) and {corpus.n_sentences} "
                         f"sentences (max {len(sentences)})")
    user = load_prompts()["concept_extraction"]["user"]
    prompts = [chat_prompt(handle, [{"role": "user", "content": user.format(word=w.lower())}], kind="corpus")
               for w in words[:corpus.n_words]]
    prompts += [chat_prompt(handle, [{"role": "user", "content": s}], kind="corpus") for s in
                sentences[:corpus.n_sentences]]
    prompts.append(introspection_prompt(handle))
    if corpus.n_controls:
        prompts += [introspection_prompt(handle, q) for q in control_questions(corpus.n_controls)]
    return prompts


def corpus_texts(handle: ModelHandle, corpus: Corpus, *, progress: bool = False) -> list[str]:
    """Each corpus prompt (chat-formatted) followed by the model's own answer, no injection."""
    from introspection_utils.generation import generate

    prompts = corpus_prompts(handle, corpus)
    answers = generate(handle, [Trial(p) for p in prompts], max_new_tokens=corpus.max_new_tokens,
                       temperature=corpus.temperature, seed=corpus.seed, progress=progress)
    return [p.text + a for p, a in zip(prompts, answers, strict=True)]


def token_activations(handle: ModelHandle, texts: Sequence[str], layers: Sequence[int], *, batch_size: int = 8,
                      progress: bool = False) -> torch.Tensor:
    """Residual stream after each of ``layers`` at every token of ``texts`` except each text's first (the
    attention-sink position, whose norm is far off the rest): ``[n_tokens, len(layers), d_model]`` (float32, CPU).
    """
    layers = [handle.check_layer(int(layer)) for layer in layers]
    tok = handle.tokenizer
    encoded = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    out = []
    for start in tqdm(range(0, len(encoded), batch_size), desc="activations", disable=not progress):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in chunk])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad(), handle.model.trace(ids.to(handle.device), attention_mask=mask.to(handle.device),
                                                 position_ids=positions.to(handle.device)):
            acts = nnsight.save([handle.layers[layer].output for layer in layers])
        stacked = torch.stack([a.float().cpu() for a in acts], dim=2)  # [B, T, n_layers, D]
        keep = mask.bool() & (positions > 0)
        out.append(stacked[keep])
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainSpec:
    """Settings of a small standard SAE (ReLU encoder, L1 penalty weighted by decoder norms, sae-lens defaults
    otherwise). Inputs are rescaled to mean norm sqrt(d_model) during training (folded into the saved weights), so
    ``l1_coefficient`` means the same for every model."""

    d_sae: int = 512
    steps: int = 600
    batch_size: int = 256
    lr: float = 1e-3
    l1_coefficient: float = 3.0
    seed: int = 0
    heldout: float = 0.1  # fraction of tokens kept out of training for the reported reconstruction


def _key(handle: ModelHandle, corpus: Corpus, spec: TrainSpec) -> dict:
    return {"version": CACHE_VERSION, "model": handle.name, "revision": handle.revision, "dtype": str(handle.dtype),
            "corpus": corpus.__dict__, "corpus_prompts": hashlib.sha256(
                "\x00".join(p.text for p in corpus_prompts(handle, corpus)).encode()).hexdigest()[:16],
            "train": spec.__dict__}


def sae_cache_folder(handle: ModelHandle, corpus: Corpus, spec: TrainSpec, *, root: Path | None = None) -> Path:
    """``<cache>/saes/<model>/<hash of everything the SAEs depend on>/`` (one ``layer_L`` sub-folder per layer)."""
    key = json.dumps(_key(handle, corpus, spec), sort_keys=True)
    return (root or cache_dir() / "saes") / handle.name / hashlib.sha256(key.encode()).hexdigest()[:16]


def _cached(folder: Path, key: dict, device: torch.device) -> Any | None:
    try:
        meta = json.loads((folder / "training.json").read_text())
        if meta["key"] != json.loads(json.dumps(key)):
            return None
        return load_sae_from_folder(folder, device=device)
    except (OSError, ValueError, KeyError):
        return None


def _atomic_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def reconstruction(sae: Any, acts: torch.Tensor) -> dict[str, float]:
    """How well ``sae`` reconstructs ``acts [N, D]``: ``mse`` (per token, summed over D), ``fve`` (fraction of
    variance explained, 1 − mse / variance), ``l0`` (mean active features per token)."""
    with torch.no_grad():
        acts = acts.to(sae.W_dec.device, sae.W_dec.dtype)
        feats = sae.encode(acts)
        err = (sae.decode(feats) - acts).pow(2).sum(-1).mean()
        var = (acts - acts.mean(0)).pow(2).sum(-1).mean()
    return {"mse": float(err), "fve": float(1 - err / var), "l0": float((feats > 0).float().sum(-1).mean())}


def _batches(acts: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled minibatches (a new permutation per epoch), seeded: sae-lens's ``DataProvider``."""
    while True:
        order = torch.randperm(len(acts), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield acts[order[start:start + batch_size]]


def train_sae_on(acts: torch.Tensor, spec: TrainSpec, *, metadata: dict | None = None, device: str = "cpu",
                 progress: bool = False) -> tuple[Any, dict]:
    """Train a standard SAE on ``acts [N, d_in]`` with sae-lens's ``SAETrainer``; returns ``(inference SAE,
    stats)``. Seeded by ``spec.seed`` (initialisation and batch order); global RNG state is left as it was.

    ``stats``: ``n_tokens``, held-out reconstruction (``heldout_mse_init`` before training; ``mse``, ``fve``,
    ``l0`` after), ``dead_fraction`` (features that never fire on the held-out tokens) and ``seconds``.
    """
    _sae_lens()
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if acts.ndim != 2 or len(acts) < 2 * spec.batch_size:
        raise ValueError(f"need activations [N, d_in] with N >= {2 * spec.batch_size} (2 batches); got "
                         f"{tuple(acts.shape)}")
    if spec.steps < 1 or spec.d_sae < 1:
        raise ValueError(f"steps and d_sae must be >= 1, got {spec.steps}, {spec.d_sae}")
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(len(acts), generator=generator)
    n_held = max(1, int(len(acts) * spec.heldout))
    held, train = acts[order[:n_held]], acts[order[n_held:]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        cfg = StandardTrainingSAEConfig(d_in=acts.shape[1], d_sae=spec.d_sae, l1_coefficient=spec.l1_coefficient,
                                        normalize_activations="expected_average_only_in", device=device,
                                        metadata=SAEMetadata(**(metadata or {})))
        sae = StandardTrainingSAE(cfg)
        init = reconstruction(sae, held)
        trainer_cfg = SAETrainerConfig(
            total_training_samples=spec.steps * spec.batch_size, train_batch_size_samples=spec.batch_size,
            lr=spec.lr, lr_end=spec.lr / 10, lr_warm_up_steps=max(1, spec.steps // 20),
            lr_decay_steps=spec.steps // 5, device=device, dead_feature_window=max(1, spec.steps // 4),
            feature_sampling_window=max(1, spec.steps // 4), n_batches_for_norm_estimate=min(50, spec.steps),
            logger=LoggingConfig(log_to_wandb=False))
        trainer = SAETrainer(trainer_cfg, sae, _batches(train, spec.batch_size, generator))
        with _quiet_tqdm(not progress):
            sae = trainer.fit()
    folder = Path(tempfile.mkdtemp(prefix="sae-"))
    try:  # the inference class (StandardSAE), exactly as it will be saved and reloaded
        sae.save_inference_model(folder)
        inference = load_sae_from_folder(folder, device=device)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    after = reconstruction(inference, held)
    with torch.no_grad():
        fired = (inference.encode(held.to(device)) > 0).any(0)
    stats = {"n_tokens": len(acts), "n_heldout": n_held, "heldout_mse_init": init["mse"], **after,
             "dead_fraction": float(1 - fired.float().mean()), "seconds": round(time.perf_counter() - started, 2)}
    return inference, stats


class _quiet_tqdm:
    """Silence sae-lens's own progress bars ("Training SAE", "Estimating norm scaling factor"; they have no switch)
    unless ``progress``: their modules' ``tqdm`` is swapped for a disabled one while the context is open."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self._saved: list[tuple[Any, Any]] = []

    def __enter__(self) -> None:
        if self.quiet:
            import sae_lens.training.activation_scaler as scaler_module
            import sae_lens.training.sae_trainer as trainer_module

            for module in (trainer_module, scaler_module):
                self._saved.append((module, module.tqdm))
                module.tqdm = lambda *a, **k: tqdm(*a, **{**k, "disable": True})

    def __exit__(self, *exc: Any) -> None:
        for module, original in self._saved:
            module.tqdm = original
        self._saved.clear()


def train_saes(handle: ModelHandle, layers: Sequence[int], *, corpus: Corpus | None = None,
               spec: TrainSpec | None = None, cache: bool = True, progress: bool = True, **settings: Any
               ) -> dict[int, Any]:
    """Small SAEs at ``layers`` trained on the model's own activations: ``{layer: SAE}`` (sae-lens ``StandardSAE``).

    ``corpus`` (:class:`Corpus`) says what text; ``spec`` (:class:`TrainSpec`) how to train; loose keywords
    (``d_sae=512, steps=800, seed=1, n_words=20 …``) override fields of either. One generation pass and one
    activation pass serve every layer. Cached per layer under :func:`sae_cache_folder` (key: model, revision,
    dtype, corpus, its rendered prompts, every training setting; written atomically, key checked on read): a
    rerun loads in about a second. Each SAE's ``cfg.metadata`` carries the model, layer, hook name and the
    held-out reconstruction (``fve``, ``l0``, ``mse``, ``dead_fraction``, ``n_tokens``).
    """
    corpus, spec = corpus or Corpus(), spec or TrainSpec()
    corpus_fields, spec_fields = set(Corpus.__dataclass_fields__), set(TrainSpec.__dataclass_fields__)
    unknown = set(settings) - corpus_fields - spec_fields
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}; corpus: {sorted(corpus_fields)}, "
                         f"training: {sorted(spec_fields)}")
    corpus = Corpus(**{**corpus.__dict__, **{k: v for k, v in settings.items() if k in corpus_fields}})
    spec = TrainSpec(**{**spec.__dict__, **{k: v for k, v in settings.items() if k in spec_fields}})
    layers = sorted({handle.check_layer(int(layer)) for layer in layers})
    if not layers:
        raise ValueError("no layers given")
    _sae_lens()
    key = _key(handle, corpus, spec)
    root = sae_cache_folder(handle, corpus, spec)
    found = {layer: _cached(root / f"layer_{layer}", key, handle.device) if cache else None for layer in layers}
    missing = [layer for layer, sae in found.items() if sae is None]
    if missing:
        texts_path = root / "corpus.json"
        texts = None
        if cache and texts_path.is_file():
            stored = json.loads(texts_path.read_text())
            texts = stored["texts"] if stored.get("key") == json.loads(json.dumps(key)) else None
        if texts is None:
            texts = corpus_texts(handle, corpus, progress=progress)
            if cache:
                _atomic_json(texts_path, {"key": key, "texts": texts})
        acts = token_activations(handle, texts, missing, progress=progress)
        for i, layer in enumerate(tqdm(missing, desc="training SAEs", disable=not progress)):
            meta = {"model_name": handle.name, "hook_name": f"blocks.{layer}.hook_resid_post", "layer": layer,
                    "revision": handle.revision}
            sae, stats = train_sae_on(acts[:, i], spec, metadata=meta, device=str(handle.device))
            for name, value in stats.items():
                sae.cfg.metadata[name] = value
            if cache:
                _save(sae, root / f"layer_{layer}", {"key": key, "stats": stats})
            found[layer] = sae
    return found


def train_sae(handle: ModelHandle, layer: int, **kwargs: Any) -> Any:
    """One small SAE at ``layer`` (see :func:`train_saes` for the keywords)."""
    return train_saes(handle, [layer], **kwargs)[handle.check_layer(layer)]


def _save(sae: Any, folder: Path, meta: dict) -> None:
    """Write the SAE folder under a temporary name, then rename it into place (a half-written one is never used)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        sae.save_model(tmp)
        (tmp / "training.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)  # stale (its key did not match)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- readouts


def encode_injected(handle: ModelHandle, saes: Any, trials: Sequence[Trial], *, batch_size: int | None = None
                    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """SAE feature activations at the answer position (each trial's last token), with and without its injection.

    ``saes``: ``{layer: SAE}`` or one SAE that names its layer. Returns ``{layer: (with_injection, without)}``,
    each ``[n_trials, d_sae]`` (float32, CPU); ``without`` encodes the same prompt uninjected. One batched engine
    call (:func:`introspection_utils.inject.residuals`) reads every layer for all trials.
    """
    saes = _as_layer_map(handle, saes)
    layers = list(saes)
    plain = [Trial(t.prompt, window=t.window) for t in trials]
    resid = residuals(handle, [*trials, *plain], layers, batch_size=batch_size)  # [2n, n_layers, D]
    n = len(trials)
    out = {}
    with torch.no_grad():
        for i, (layer, sae) in enumerate(saes.items()):
            feats = sae.encode(resid[:, i].to(sae.W_dec.device, sae.W_dec.dtype)).float().cpu()
            out[layer] = (feats[:n], feats[n:])
    return out


def top_features_gained(with_injection: torch.Tensor, without: torch.Tensor, *, k: int = 10) -> pd.DataFrame:
    """The ``k`` features whose mean activation over the rows rises most with the injection.

    ``with_injection``/``without``: ``[n, d_sae]`` (or ``[d_sae]``). Columns: ``rank, feature, act_without,
    act_with, gain`` (means over rows; ``gain = act_with − act_without``), sorted by gain, ties by feature index.
    """
    if with_injection.shape != without.shape:
        raise ValueError(f"shapes differ: {tuple(with_injection.shape)} vs {tuple(without.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    a_with = with_injection.reshape(-1, with_injection.shape[-1]).float().mean(0)
    a_without = without.reshape(-1, without.shape[-1]).float().mean(0)
    gain = (a_with - a_without).numpy()
    order = np.lexsort((np.arange(len(gain)), -gain))[:k]  # largest gain first, then lowest index
    return pd.DataFrame({"rank": np.arange(1, len(order) + 1), "feature": order,
                         "act_without": a_without.numpy()[order], "act_with": a_with.numpy()[order],
                         "gain": gain[order]})


def yes_direction(handle: ModelHandle, answers: tuple[str, str] | None = None) -> torch.Tensor:
    """The residual direction that raises logit(yes) − logit(no) through the final norm: ``g ⊙ (W_U[yes] −
    W_U[no])`` with ``g`` the final norm's per-dimension gain (read off the module, so Gemma's ``1 + w`` is
    handled). ``[d_model]`` float32. (The norm's division by the RMS scales every direction alike.)"""
    yes, no = yes_no_ids(handle, *(answers or (None, None)))
    with torch.no_grad():
        w_u = handle.lm_head._module.weight.float()
        norm = handle.final_norm._module
        ones = torch.ones(1, handle.arch.d_model, device=w_u.device, dtype=next(norm.parameters()).dtype)
        gain = norm(ones)[0].float()  # RMS of ones is 1: the output is the gain (up to the eps)
        return ((w_u[yes] - w_u[no]) * gain).cpu()


def yes_scores(handle: ModelHandle, sae: Any, answers: tuple[str, str] | None = None) -> torch.Tensor:
    """Cosine of each SAE feature's decoder direction with :func:`yes_direction`: ``[d_sae]``. A feature with a
    high score, when active, pushes the answer towards "yes" directly (before any later layer transforms it)."""
    direction = yes_direction(handle, answers)
    w_dec = sae.W_dec.detach().float().cpu()
    return torch.nn.functional.cosine_similarity(w_dec, direction[None], dim=-1)


def yes_features(handle: ModelHandle, saes: Any, *, k: int = 5) -> pd.DataFrame:
    """The ``k`` most yes-pointing features of each SAE: columns ``sae_layer, rank, feature, yes_score``."""
    rows = []
    for layer, sae in _as_layer_map(handle, saes).items():
        scores = yes_scores(handle, sae)
        top = torch.topk(scores, min(k, len(scores)))
        rows += [{"sae_layer": layer, "rank": r + 1, "feature": int(f), "yes_score": float(s)}
                 for r, (s, f) in enumerate(zip(top.values, top.indices, strict=True))]
    return pd.DataFrame(rows)


FEATURE_COLUMNS = ["model", "concept", "vector_kind", "vector_seed", "layer", "scale", "question_kind", "question",
                   "trial", "sae_layer", "feature", "act_without", "act_with", "gain"]


def sae_features(handle: ModelHandle, saes: Any, concepts: Sequence[str], *, layer: int, scale: float,
                 n_controls: int = 2, n_random: int = 1, seed: int = 0, bank: VectorBank | None = None
                 ) -> pd.DataFrame:
    """SAE features at the answer position when each concept is injected at ``layer`` × ``scale``, on the
    injected-thought question and ``n_controls`` control questions, with the concept vector and ``n_random``
    norm-matched random vectors. Every SAE in ``saes`` (``{layer: SAE}``, layers ≥ ``layer`` to see the
    injection) is read in the same pass.

    A tidy table (:data:`FEATURE_COLUMNS`), one row per trial × SAE layer × feature *active with or without the
    injection* (an absent feature is 0 in both): ``act_without``/``act_with`` and their difference ``gain``.
    """
    from introspection_utils.vectors import concept_vectors, with_random

    handle.check_layer(layer)
    saes = _as_layer_map(handle, saes)
    early = [sae_l for sae_l in saes if sae_l < layer]
    if early:
        raise ValueError(f"SAE layer(s) {early} are below the injection layer {layer}: the injection cannot reach "
                         f"them")
    bank = bank or concept_vectors(handle, concepts, progress=False)
    prompts = question_prompts(handle, n_controls)
    trials, info = [], []
    for concept in concepts:
        for v in with_random(bank.get(concept, layer), n_random, seed):
            for prompt in prompts:
                trials.append(Trial(prompt, v, float(scale)))
                info.append({"model": handle.name, "concept": concept, "vector_kind": v.kind, "vector_seed": v.seed,
                             "layer": layer, "scale": float(scale), "question_kind": prompt.kind,
                             "question": prompt.question})
    encoded = encode_injected(handle, saes, trials)
    frames = []
    for sae_l, (a_with, a_without) in encoded.items():
        trial_idx, feature = torch.nonzero((a_with > 0) | (a_without > 0), as_tuple=True)
        frame = pd.DataFrame(info).iloc[trial_idx.numpy()].reset_index(drop=True)
        frame["trial"] = trial_idx.numpy()
        frame["sae_layer"] = sae_l
        frame["feature"] = feature.numpy()
        frame["act_without"] = a_without[trial_idx, feature].numpy()
        frame["act_with"] = a_with[trial_idx, feature].numpy()
        frame["gain"] = frame["act_with"] - frame["act_without"]
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)[FEATURE_COLUMNS]
    df["vector_seed"] = df["vector_seed"].astype("Int64")
    return df


def _dense(table: pd.DataFrame, sae_layer: int, features: Sequence[int], **where: Any) -> pd.DataFrame:
    """``[trial, feature]`` rows for every selected trial and every feature in ``features`` (absent = 0)."""
    rows = table[table["sae_layer"] == sae_layer]
    for column, value in where.items():
        rows = rows[rows[column] == value]
    trials = table.loc[np.logical_and.reduce([table[c] == v for c, v in where.items()])
                       if where else slice(None), "trial"].unique()
    grid = pd.MultiIndex.from_product([sorted(trials), list(features)], names=["trial", "feature"])
    values = rows.set_index(["trial", "feature"])[["act_without", "act_with", "gain"]]
    return values.reindex(grid, fill_value=0.0).reset_index()


def top_gained(table: pd.DataFrame, concept: str, *, sae_layer: int, question_kind: str = "introspection",
               vector_kind: str = "concept", k: int = 10) -> pd.DataFrame:
    """:func:`top_features_gained` on a :func:`sae_features` table: the ``k`` features of the SAE at
    ``sae_layer`` that gain most (mean over the matching trials) for ``concept``."""
    where = {"concept": concept, "question_kind": question_kind, "vector_kind": vector_kind}
    sel = table[(table["sae_layer"] == sae_layer)]
    for column, value in where.items():
        sel = sel[sel[column] == value]
    if sel.empty:
        raise ValueError(f"no active features for {where} at SAE layer {sae_layer}")
    features = sorted(sel["feature"].unique())
    dense = _dense(table, sae_layer, features, **where)
    mean = dense.groupby("feature")[["act_without", "act_with", "gain"]].mean()
    n = dense["trial"].nunique()
    mean = mean.reset_index().sort_values(["gain", "feature"], ascending=[False, True]).head(k)
    return mean.assign(rank=range(1, len(mean) + 1), n_trials=n)[
        ["rank", "feature", "act_without", "act_with", "gain", "n_trials"]].reset_index(drop=True)


def yes_feature_gain(table: pd.DataFrame, yes: pd.DataFrame, concept: str) -> pd.DataFrame:
    """Mean activation change of each SAE layer's yes-features (:func:`yes_features`) for ``concept``, per
    question kind and vector kind: columns ``sae_layer, vector_kind, question_kind, act_without, act_with, gain``
    (means over the yes-features and the trials)."""
    rows = []
    for sae_layer, group in yes.groupby("sae_layer"):
        for vector_kind in ("concept", "random"):
            for question_kind in ("introspection", "control"):
                where = {"concept": concept, "vector_kind": vector_kind, "question_kind": question_kind}
                if not np.logical_and.reduce([table[c] == v for c, v in where.items()]).any():
                    continue
                dense = _dense(table, sae_layer, group["feature"].tolist(), **where)
                rows.append({"sae_layer": sae_layer, "vector_kind": vector_kind, "question_kind": question_kind,
                             **dense[["act_without", "act_with", "gain"]].mean().to_dict()})
    return pd.DataFrame(rows)


def describe_sae_features(table: pd.DataFrame, yes: pd.DataFrame, concept: str, *, k: int = 10) -> str:
    """A computed reading: what the injection-layer SAE sees, how concept-specific it is (overlap of the top-k with
    the random vector's and the other concepts'), and whether the yes-features rise at each SAE layer."""
    layer = int(table["layer"].iloc[0])
    scale = float(table["scale"].iloc[0])
    first = int(table["sae_layer"].min())
    top = top_gained(table, concept, sae_layer=first, k=k)
    lead = top.iloc[0]
    parts = [f"{concept} × {scale:g} at layer {layer}: at SAE layer {first} the top gained feature on the "
             f"injected-thought question is #{int(lead.feature)} ({lead.act_without:.2f} → {lead.act_with:.2f})."]
    if (table["vector_kind"] == "random").any():
        rand = top_gained(table, concept, sae_layer=first, vector_kind="random", k=k)
        shared = len(set(top["feature"]) & set(rand["feature"]))
        parts.append(f"{shared} of its top {len(top)} are also in the random vector's top {len(rand)} "
                     f"({'mostly injection-generic' if shared > len(top) / 2 else 'mostly concept-specific'}).")
    others = [c for c in table["concept"].unique() if c != concept]
    if others:
        overlap = [len(set(top["feature"]) & set(top_gained(table, c, sae_layer=first, k=k)["feature"]))
                   for c in others]
        parts.append(f"Overlap with the other concepts' top {k}: {', '.join(map(str, overlap))}.")
    gains = yes_feature_gain(table, yes, concept)
    for sae_layer, g in gains[gains["vector_kind"] == "concept"].groupby("sae_layer"):
        by_q = g.set_index("question_kind")["gain"]
        text = ", ".join(f"{q} {by_q[q]:+.3f}" for q in ("introspection", "control") if q in by_q)
        scores = yes.loc[yes["sae_layer"] == sae_layer, "yes_score"]
        parts.append(f"SAE layer {sae_layer}: its {len(scores)} most yes-pointing features (cosine with the yes "
                     f"direction {scores.min():.2f}–{scores.max():.2f}) change by {text} on average.")
    return " ".join(parts)


def describe_sae(saes: Mapping[int, Any]) -> str:
    """One line per SAE: where it comes from and, for a trained one, its held-out reconstruction."""
    lines = []
    for layer, sae in sorted(saes.items()):
        meta = sae.cfg.metadata
        if meta.get("fve") is not None:
            lines.append(f"layer {layer}: small SAE trained here, d_sae={sae.cfg.d_sae}, on {meta['n_tokens']} tokens;"
                         f" held-out variance explained {meta['fve']:.1%}, L0 {meta['l0']:.1f} features/token, "
                         f"{meta['dead_fraction']:.0%} never fire on held-out tokens")
        else:
            lines.append(f"layer {layer}: pretrained {meta.get('model_name') or ''} SAE, d_sae={sae.cfg.d_sae}")
    return "\n".join(lines)


def plot_sae_features(table: pd.DataFrame, yes: pd.DataFrame, concept: str, *, k: int = 10) -> plt.Figure:
    """Left: the top-``k`` features gained at the first SAE layer (injected-thought question, concept vector), mean
    activation without (grey) and with (blue) the injection. Right: mean change of each SAE layer's yes-features,
    introspection (blue) vs control (orange), concept vector solid and random vector translucent."""
    import matplotlib.pyplot as plt

    from introspection_utils.plots import PALETTE, RANDOM_ALPHA

    first = int(table["sae_layer"].min())
    top = top_gained(table, concept, sae_layer=first, k=k)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    y = np.arange(len(top))[::-1]
    left.barh(y + 0.2, top["act_without"], height=0.4, color=PALETTE["baseline"], label="without injection")
    left.barh(y - 0.2, top["act_with"], height=0.4, color=PALETTE["introspection"], label="with injection")
    left.set_yticks(y, [f"#{f}" for f in top["feature"]])
    left.set_xlabel("SAE feature activation at the answer position (a.u.)")
    left.set_ylabel("feature (ranked by gain)")
    left.set_title(f"Top {len(top)} features gained at layer {first}")
    left.legend(loc="lower right")
    gains = yes_feature_gain(table, yes, concept)
    layers = sorted(gains["sae_layer"].unique())
    width = 0.2
    for j, (vector_kind, question_kind) in enumerate([("concept", "introspection"), ("concept", "control"),
                                                      ("random", "introspection"), ("random", "control")]):
        g = gains[(gains["vector_kind"] == vector_kind) & (gains["question_kind"] == question_kind)]
        if g.empty:
            continue
        values = g.set_index("sae_layer").reindex(layers)["gain"]
        right.bar(np.arange(len(layers)) + (j - 1.5) * width, values, width=width, color=PALETTE[question_kind],
                  alpha=1.0 if vector_kind == "concept" else RANDOM_ALPHA,
                  label=f"{question_kind}, {vector_kind} vector")
    right.axhline(0, color=PALETTE["baseline"], lw=0.8)
    right.set_xticks(np.arange(len(layers)), [f"layer {sae_l}" for sae_l in layers])
    right.set_xlabel("SAE layer")
    right.set_ylabel("mean change of the yes-features (a.u.)")
    right.set_title(f"{int((yes['sae_layer'] == layers[0]).sum())} most yes-pointing features per SAE")
    right.legend(fontsize=8)
    model = table["model"].iloc[0]
    fig.suptitle(f"{model} · {concept} injected at layer {int(table['layer'].iloc[0])}, scale "
                 f"{float(table['scale'].iloc[0]):g}")
    fig.tight_layout()
    return fig
