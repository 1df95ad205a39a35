"""SAEs for notebook 09: pretrained ones (Gemma Scope, by sae-lens release and id) or small ones trained here on the
model's own text (the optional ``sae`` extra).

Over 400 lines because the pretrained and the trained SAEs share one activation corpus, one quality check and one
cache, and split apart would each import the other."""

from __future__ import annotations

import contextlib
import hashlib
import io
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
import torch
from tqdm.auto import tqdm

from introspection_utils.core.data import load_list, load_prompts
from introspection_utils.core.paths import atomic_write
from introspection_utils.engine.generation import generate
from introspection_utils.engine.measure import Trial
from introspection_utils.engine.prompts import chat_prompt, control_questions, introspection_prompt
from introspection_utils.engine.vectors import left_pad
from introspection_utils.models.embedded import cache_dir

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

SAE_EXTRA = "pip install -e '.[sae]'  (or: pip install 'sae-lens>=6.54,<7')"
CACHE_VERSION = 2  # 2: held out by text, prefix duplicates dropped

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


def as_layer_map(handle: ModelHandle, saes: Any) -> dict[int, Any]:
    """``{layer: SAE}`` from such a map or one SAE that names its layer, each checked against ``handle``."""
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




def get_saes(handle: ModelHandle, layers: Sequence[int], *, release: str | None = None,
             sae_id: str = "layer_{layer}/width_16k/canonical", **train: Any) -> dict[int, Any]:
    """``{layer: SAE}`` for ``layers``: pretrained from ``release`` (``sae_id`` formatted with each layer) when a
    release is given, else small SAEs trained here on the model's own activations (:func:`train_saes` with
    ``train``'s keywords; cached)."""
    layers = sorted({handle.check_layer(int(layer)) for layer in layers})
    if release is None:
        return train_saes(handle, layers, **train)
    saes = {layer: load_sae(release, sae_id.format(layer=layer), device=handle.device) for layer in layers}
    return as_layer_map(handle, saes)


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
    max_new_tokens: int = 16  # generation dominates the cost (one forward pass per generated token)
    temperature: float = 0.8
    seed: int = 0


def corpus_prompts(handle: ModelHandle, corpus: Corpus) -> list:
    """The chat prompts of ``corpus`` (:class:`introspection_utils.engine.prompts.Prompt`), in a fixed order."""
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
    encoded = encode_texts(handle, texts)
    out = []
    for start in tqdm(range(0, len(encoded), batch_size), desc="activations", disable=not progress):
        ids, mask, positions = left_pad(encoded[start:start + batch_size], tok.pad_token_id)
        with torch.no_grad(), handle.model.trace(ids.to(handle.device), attention_mask=mask.to(handle.device),
                                                 position_ids=positions.to(handle.device)):
            acts = nnsight.save([handle.layers[layer].output for layer in layers])
        stacked = torch.stack([a.float().cpu() for a in acts], dim=2)  # [B, T, n_layers, D]
        keep = mask.bool() & (positions > 0)
        out.append(stacked[keep])
    return torch.cat(out)


def encode_texts(handle: ModelHandle, texts: Sequence[str]) -> list[list[int]]:
    """The token ids of each text, as :func:`token_activations` reads them (no special tokens added)."""
    return [handle.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def heldout_split(encoded: Sequence[Sequence[int]], fraction: float, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Split the tokens of :func:`token_activations` (each text's tokens but its first, text by text) by text.

    ``max(1, round(fraction × n_texts))`` texts (seeded choice) are held out; of their tokens, those whose token
    prefix (the text's ids up to and including the token) also occurs in a training text are dropped — their
    activations are bit-identical to training tokens (the shared chat template). Returns ``(train_rows,
    heldout_rows, stats)``: index tensors into the token rows and ``heldout_texts``, ``heldout_candidates``
    (tokens of the held-out texts) and ``heldout_dropped`` (of those, prefix duplicates).
    """
    if len(encoded) < 2:
        raise ValueError(f"need at least 2 texts to hold one out, got {len(encoded)}")
    if not 0 < fraction < 1:
        raise ValueError(f"heldout fraction must be in (0, 1), got {fraction}")
    n_held = min(len(encoded) - 1, max(1, round(fraction * len(encoded))))
    held_texts = set(torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed))[:n_held].tolist())
    seen = {tuple(ids[:t + 1]) for i, ids in enumerate(encoded) if i not in held_texts for t in range(1, len(ids))}
    train, held, candidates = [], [], 0
    row = 0
    for i, ids in enumerate(encoded):
        for t in range(1, len(ids)):
            if i not in held_texts:
                train.append(row)
            else:
                candidates += 1
                if tuple(ids[:t + 1]) not in seen:
                    held.append(row)
            row += 1
    if not held:
        raise ValueError("every held-out token has a prefix duplicate in training: use more or longer texts")
    stats = {"heldout_texts": n_held, "heldout_candidates": candidates, "heldout_dropped": candidates - len(held)}
    return torch.tensor(train), torch.tensor(held), stats


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
    heldout: float = 0.1  # fraction of texts kept out of training for the reported reconstruction


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
                 progress: bool = False, split: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[Any, dict]:
    """Train a standard SAE on ``acts [N, d_in]`` with sae-lens's ``SAETrainer``; returns ``(inference SAE,
    stats)``. Seeded by ``spec.seed`` (initialisation and batch order); global RNG state is left as it was.

    ``split``: ``(train_rows, heldout_rows)`` (:func:`heldout_split`, by text); without it a random ``spec.heldout``
    fraction of the rows is held out (for activations with no text structure only: tokens of one text share
    prefixes, so a row split leaks).

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
    if split is None:
        order = torch.randperm(len(acts), generator=generator)
        n_held = max(1, int(len(acts) * spec.heldout))
        split = order[n_held:], order[:n_held]
    train, held = acts[split[0]], acts[split[1]]
    n_held = len(held)
    if len(train) < 2 * spec.batch_size:
        raise ValueError(f"the training split has {len(train)} rows; need >= {2 * spec.batch_size} (2 batches)")
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
        with _quiet(not progress):
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


def _quiet(quiet: bool) -> contextlib.AbstractContextManager:
    """sae-lens's trainer has no switch for its own progress bars ("Training SAE", "Estimating norm scaling
    factor"): when ``quiet``, its console output (stderr, where tqdm writes) is captured and dropped for the call.
    No sae-lens module is patched; in a notebook, where tqdm draws widgets instead, the bars stay visible."""
    return contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()


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
                atomic_write(texts_path, json.dumps({"key": key, "texts": texts}, indent=1))
        acts = token_activations(handle, texts, missing, progress=progress)
        train_rows, held_rows, split_stats = heldout_split(encode_texts(handle, texts), spec.heldout, spec.seed)
        for i, layer in enumerate(tqdm(missing, desc="training SAEs", disable=not progress)):
            meta = {"model_name": handle.name, "hook_name": f"blocks.{layer}.hook_resid_post", "layer": layer,
                    "revision": handle.revision}
            sae, stats = train_sae_on(acts[:, i], spec, metadata=meta, device=str(handle.device),
                                      split=(train_rows, held_rows))
            stats.update(split_stats, n_texts=len(texts))
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
