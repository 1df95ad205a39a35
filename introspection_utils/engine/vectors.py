"""Concept vectors (activation(word) − the baseline words' mean, every layer, cached on disk), norm-matched null
vectors and residual norms; the sweeps and every experiment that injects call them.

Over 400 lines because concept, contrastive and the four null kinds of vectors share one record, one norm rule
and one disk cache."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import nnsight
import numpy as np
import torch
from tqdm.auto import tqdm

from introspection_utils.core.data import MAX_CONCEPT_WORDS, load_list, validate_concept  # noqa: F401 (re-exported)
from introspection_utils.core.paths import atomic_write, content_hash
from introspection_utils.engine.prompts import Prompt, chat_prompt, extraction_prompt
from introspection_utils.models.embedded import cache_dir
from introspection_utils.models.handle import check_layer_index

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

# Tensor shapes in signatures (as in :mod:`introspection_utils.engine.measure`).
Vector = Annotated[torch.Tensor, "[d_model]"]
LastTokenActivations = Annotated[torch.Tensor, "[n_prompts, n_layers, d_model]"]
WordActivations = Annotated[torch.Tensor, "[n_words, n_layers, d_model]"]
Similarity = Annotated[torch.Tensor, "[n_words, n_words]"]
ResidualNorms = Annotated[torch.Tensor, "[n_layers]"]


@dataclass(frozen=True, eq=False)
class ConceptVector:
    """One steering vector ``[d_model]`` for one layer, with where it came from.

    ``kind``: "concept" (word − baseline mean), "random" (a norm-matched null vector, ``seed``; ``null`` says which
    of :data:`NULL_KINDS`), "contrastive" (text − paired text) or "file". Compares by value (metadata and tensor).
    """

    concept: str
    layer: int
    vector: Vector = field(repr=False)
    kind: str = "concept"
    seed: int | None = None
    model: str = ""
    null: str | None = None

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    def _key(self) -> tuple:
        return (self.concept, self.layer, self.kind, self.seed, self.model, self.null)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ConceptVector) and self._key() == other._key()
                and torch.equal(self.vector, other.vector))

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        seed = f", seed={self.seed}" if self.seed is not None else ""
        null = f", null={self.null!r}" if self.null not in (None, "isotropic") else ""
        return (f"ConceptVector({self.concept!r}, layer={self.layer}, kind={self.kind!r}{seed}{null}, "
                f"norm={self.norm:.3g})")


def random_vector(like: ConceptVector, seed: int) -> ConceptVector:
    """A Gaussian direction with ``like``'s norm, seeded by ``(seed, concept)``: reproducible, the same direction at
    every layer of a concept, and independent across concepts (so k random vectors per concept give a null of
    k × n_concepts directions, not k). The "isotropic" null of :func:`null_vector`."""
    key = hashlib.sha256(f"{int(seed)}|{like.concept}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))
    direction = torch.randn(like.vector.shape[-1], generator=generator, dtype=torch.float32)
    vector = (direction / direction.norm() * like.vector.float().norm()).to(like.vector.dtype)
    return ConceptVector(like.concept, like.layer, vector, kind="random", seed=int(seed), model=like.model,
                         null="isotropic")


# The null vectors a concept vector is compared with, each norm-matched to it and seeded:
# "isotropic": a uniformly random direction (:func:`random_vector`);
# "shuffled": the concept vector's own coordinates, permuted (same norm and value distribution, no direction);
# "covariance": a Gaussian draw in the span and covariance of the mean-subtracted baseline-word activations at
#   the layer (the directions real activations vary along);
# "other-word": the same recipe on a held-out word — a baseline word's activation minus the mean of the other
#   baseline words (an in-distribution null: a real concept direction, just not this one).
NULL_KINDS = ("isotropic", "shuffled", "covariance", "other-word")


@dataclass(frozen=True, eq=False)
class NullSource:
    """What the "covariance" and "other-word" nulls draw from: the baseline words' extraction activations
    ``activations [n_words, n_layers, d_model]`` (the words of :func:`concept_vectors`' baseline mean)."""

    words: tuple[str, ...]
    activations: WordActivations = field(repr=False)
    model: str = ""


def null_source(handle: ModelHandle, baseline_words: Iterable[str] | None = None, *, progress: bool = False
                ) -> NullSource:
    """The baseline words' activations (default the paper's 100, disk-cached like every word's) for the
    in-distribution nulls of :func:`null_vector`."""
    words = tuple(baseline_words) if baseline_words is not None else tuple(load_list("baseline_words"))
    if len(words) < 3:
        raise ValueError(f"the covariance and other-word nulls need at least 3 baseline words, got {len(words)}")
    return NullSource(words, word_activations(handle, words, progress=progress), model=handle.name)


def _null_generator(seed: int, concept: str, kind: str) -> torch.Generator:
    key = hashlib.sha256(f"{int(seed)}|{concept}|{kind}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))


def check_nulls(nulls: Iterable[str], source: NullSource | None = None) -> tuple[str, ...]:
    """``nulls`` as a tuple, each one of :data:`NULL_KINDS` (no repeats); the in-distribution kinds need a
    ``source`` — a ``ValueError`` naming the bad value otherwise."""
    nulls = (nulls,) if isinstance(nulls, str) else tuple(nulls)
    if not nulls:
        raise ValueError(f"no null kinds given; choose from {', '.join(NULL_KINDS)}")
    for kind in nulls:
        if kind not in NULL_KINDS:
            raise ValueError(f"unknown null kind {kind!r}; choose from {', '.join(NULL_KINDS)}")
    if len(set(nulls)) != len(nulls):
        raise ValueError(f"null kinds repeat: {list(nulls)}")
    return nulls


def null_vector(like: ConceptVector, seed: int, kind: str = "isotropic", source: NullSource | None = None
                ) -> ConceptVector:
    """A null vector of ``kind`` (one of :data:`NULL_KINDS`) with ``like``'s norm and layer, seeded by ``(seed,
    concept, kind)``: ``kind="random"``, ``null=kind``, ``seed``. "covariance" and "other-word" draw from
    ``source`` (:func:`null_source`) at ``like.layer``; "other-word" never picks ``like``'s own word."""
    check_nulls([kind])
    if kind == "isotropic":
        return random_vector(like, seed)
    generator = _null_generator(seed, like.concept, kind)
    v = like.vector.float()
    if kind == "shuffled":  # a permutation keeps the norm exactly: no rescaling
        vector = like.vector[torch.randperm(v.shape[-1], generator=generator)].clone()
        return ConceptVector(like.concept, like.layer, vector, kind="random", seed=int(seed), model=like.model,
                             null=kind)
    else:
        if source is None:
            raise ValueError(f"the {kind!r} null draws from the baseline words' activations: pass "
                             f"source=null_source(handle)")
        acts = source.activations[:, like.layer].float()  # [n_words, d_model]
        if acts.shape[-1] != v.shape[-1]:
            raise ValueError(f"the null source has d_model {acts.shape[-1]}; the vector has {v.shape[-1]}")
        if kind == "covariance":
            centred = acts - acts.mean(0)
            weights = torch.randn(len(acts), generator=generator, dtype=torch.float32)
            direction = centred.T @ weights / (len(acts) - 1) ** 0.5  # ~ N(0, centredᵀ centred / (n − 1))
        else:  # other-word
            allowed = [i for i, w in enumerate(source.words) if w != like.concept]
            pick = allowed[int(torch.randint(len(allowed), (1,), generator=generator))]
            others = torch.ones(len(acts), dtype=torch.bool)
            others[pick] = False
            direction = acts[pick] - acts[others].mean(0)
    vector = (direction / direction.norm() * v.norm()).to(like.vector.dtype)
    return ConceptVector(like.concept, like.layer, vector, kind="random", seed=int(seed), model=like.model, null=kind)


def with_random(vector: ConceptVector, n_random: int, seed: int = 0, *, nulls: Sequence[str] = ("isotropic",),
                source: NullSource | None = None) -> list[ConceptVector]:
    """``vector`` followed by ``n_random`` norm-matched null vectors of each kind in ``nulls`` (seeds ``seed ..
    seed + n_random − 1`` per kind; see :func:`null_vector`)."""
    return [vector, *(null_vector(vector, seed + k, kind, source) for kind in check_nulls(nulls, source)
                      for k in range(n_random))]


@dataclass(frozen=True, eq=False)
class VectorBank:
    """Concept vectors of several words at every layer: ``vectors[word_index, layer]`` is ``[d_model]``."""

    words: tuple[str, ...]
    vectors: WordActivations = field(repr=False)
    model: str = ""
    kind: str = "concept"

    def get(self, word: str, layer: int) -> ConceptVector:
        """The vector of ``word`` at ``layer``; an unknown word or layer is a ``ValueError``."""
        if word not in self.words:
            raise ValueError(f"concept {word!r} is not in this bank ({', '.join(self.words)})")
        check_layer_index(layer, self.vectors.shape[1], self.model)
        return ConceptVector(word, layer, self.vectors[self.words.index(word), layer], kind=self.kind,
                             model=self.model)

    def norms(self) -> torch.Tensor:
        """``[n_words, n_layers]`` L2 norms."""
        return self.vectors.float().norm(dim=-1)


def default_layer(handle: ModelHandle, layer: int | None = None) -> int:
    """``layer`` if given (checked), else two thirds of the depth: 20 of 30 (SmolLM2), 28 of 42 (Gemma-2-9B)."""
    if layer is None:
        return 2 * handle.arch.n_layers // 3
    return handle.check_layer(int(layer) if isinstance(layer, float) and layer.is_integer() else layer)


def default_layers(handle: ModelHandle, layers: Sequence[int] | None = None, *, n: int = 8) -> list[int]:
    """``layers`` if given (checked), else ``n`` layers evenly spread from the first to the last."""
    if layers is None:
        return sorted({int(round(x)) for x in np.linspace(0, handle.arch.n_layers - 1, n)})
    return [handle.check_layer(int(x) if isinstance(x, float) and x.is_integer() else x) for x in layers]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-id lists left-padded into one batch: ``(ids, attention_mask, position_ids)``, each ``[B, W]`` with
    ``W`` the longest length. The mask is 0 on padding; positions count from each row's first real token, as
    ``generate()`` does under left padding (a plain forward would use ``arange``), so every row's last position is
    its real last token at its real position."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in sequences])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def last_token_activations(handle: ModelHandle, prompts: Sequence[Prompt], *, batch_size: int = 16,
                           progress: bool = False) -> LastTokenActivations:
    """Residual stream at each prompt's last token after every decoder layer: ``[n_prompts, n_layers, d_model]``.

    Prompts of different lengths are left-padded into one batch (the last position is every row's real last
    token; position ids follow the attention mask).
    """
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="activations", disable=not progress):
        chunk = prompts[start:start + batch_size]
        ids, mask, positions = left_pad([p.input_ids for p in chunk], handle.tokenizer.pad_token_id)
        remote = {"remote": handle.remote} if handle.remote else {}
        with torch.no_grad(), handle.model.trace(ids.to(handle.device), attention_mask=mask.to(handle.device),
                                                 position_ids=positions.to(handle.device), **remote):
            acts = nnsight.save([layer.output[:, -1, :] for layer in handle.layers])
        out.append(torch.stack([a.float().cpu() for a in acts], dim=1))
    return torch.cat(out)


class ActivationCache:
    """Per-word activations ``[n_layers, d_model]`` on disk, one file per word, keyed by everything they depend on.

    Key: model name, revision, dtype, the rendered extraction template (chat template and system turn included)
    and the token position. Files are written atomically (temp file, then rename) and checked on read: an entry
    that fails to load or whose key, shape or checksum disagrees is rebuilt, never used.
    """

    def __init__(self, handle: ModelHandle, *, root: Path | None = None, position: str = "last") -> None:
        template = extraction_prompt(handle, "{word}").text
        self.key = {"model": handle.name, "revision": handle.revision, "dtype": str(handle.dtype),
                    "template": template, "position": position,
                    "shape": [handle.arch.n_layers, handle.arch.d_model]}
        self.folder = (root or cache_dir() / "activations") / handle.name / content_hash(self.key)

    def _path(self, word: str) -> Path:
        safe = "".join(c if c.isalnum() else "_" for c in word)
        return self.folder / f"{safe}-{hashlib.sha256(word.encode()).hexdigest()[:8]}.pt"

    def get(self, word: str) -> torch.Tensor | None:
        path = self._path(word)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, weights_only=True)
            ok = (entry["key"] == json.dumps(self.key, sort_keys=True) and entry["word"] == word
                  and list(entry["activation"].shape) == self.key["shape"]
                  and entry["checksum"] == _checksum(entry["activation"]))
        except Exception:
            ok = False
        if not ok:
            path.unlink(missing_ok=True)  # corrupted or stale: rebuild
            return None
        return entry["activation"]

    def put(self, word: str, activation: torch.Tensor) -> None:
        entry = {"key": json.dumps(self.key, sort_keys=True), "word": word, "activation": activation.clone(),
                 "checksum": _checksum(activation)}
        atomic_write(self._path(word), lambda tmp: torch.save(entry, tmp))


def _checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().float().numpy().tobytes()).hexdigest()


def word_activations(handle: ModelHandle, words: Iterable[str], *, cache: bool = True, batch_size: int = 16,
                     progress: bool = True) -> WordActivations:
    """Extraction-prompt activations of ``words``: ``[n_words, n_layers, d_model]`` (float32, CPU), cached."""
    words = list(words)
    store = ActivationCache(handle) if cache else None
    found = {w: store.get(w) for w in words} if store else {}
    missing = [w for w in dict.fromkeys(words) if found.get(w) is None]
    if missing:
        acts = last_token_activations(handle, [extraction_prompt(handle, w) for w in missing],
                                      batch_size=batch_size, progress=progress)
        for w, a in zip(missing, acts, strict=True):
            found[w] = a
            if store:
                store.put(w, a)
    return torch.stack([found[w] for w in words])


def concept_vectors(handle: ModelHandle, words: Iterable[str], *, baseline_words: Iterable[str] | None = None,
                    cache: bool = True, batch_size: int = 16, progress: bool = True) -> VectorBank:
    """Concept vectors for ``words`` at every layer: activation(word) − mean over ``baseline_words``.

    The activation is the residual stream after each decoder layer at one token: the last token of the chat-formatted
    prompt "Tell me about {word}" (:func:`prompts.extraction_prompt`, word lowercased) with the assistant turn opened,
    i.e. the final token of the assistant header, just before the model's first answer token (for ChatML the newline
    after ``<|im_start|>assistant``), as in the paper. ``baseline_words`` defaults to the paper's 100
    (``data/baseline_words.txt``). Returns a :class:`VectorBank` with ``vectors [n_words, n_layers, d_model]``.
    """
    words = tuple(validate_concept(w) for w in words)
    if not words:
        raise ValueError("no concept words given")
    baseline = list(baseline_words) if baseline_words is not None else list(load_list("baseline_words"))
    acts = word_activations(handle, list(words) + baseline, cache=cache, batch_size=batch_size, progress=progress)
    mean = acts[len(words):].mean(dim=0)
    return VectorBank(words, acts[: len(words)] - mean, model=handle.name)


def contrastive_vectors(handle: ModelHandle, pairs: Sequence[tuple[str, str]], *, chat: bool = True,
                        labels: Sequence[str] | None = None, batch_size: int = 16) -> VectorBank:
    """Vectors from contrastive prompt pairs ``(a, b)``: activation(b) − activation(a) at the last token.

    E.g. ``("Hi! How are you?", "HI! HOW ARE YOU?")`` (Godet's ALL-CAPS vector) or the localization pairs
    (specific → generic). ``chat=True`` wraps each text as a user turn with the generation prompt.
    """
    if not pairs:
        raise ValueError("no contrastive pairs given")

    def prompt(text: str) -> Prompt:
        if chat:
            return chat_prompt(handle, [{"role": "user", "content": text}], kind="contrastive", question=text)
        ids = tuple(handle.tokenizer(text, add_special_tokens=True)["input_ids"])
        return Prompt(text, ids, len(ids) - 1, "contrastive", text, "none (raw text)")

    prompts = [prompt(t) for pair in pairs for t in pair]
    acts = last_token_activations(handle, prompts, batch_size=batch_size)
    labels = tuple(labels) if labels is not None else tuple(f"{a} -> {b}" for a, b in pairs)
    return VectorBank(labels, acts[1::2] - acts[0::2], model=handle.name, kind="contrastive")


def load_vector(handle: ModelHandle, path: str | Path, *, layer: int, name: str | None = None) -> ConceptVector:
    """A vector saved with ``torch.save`` (a ``[d_model]`` tensor) or ``numpy.save``; size and values checked."""
    path = Path(path)
    if path.suffix == ".npy":
        tensor = torch.from_numpy(np.load(path))
    else:
        tensor = torch.load(path, weights_only=True)
    handle.check_layer(layer)
    if tensor.ndim != 1 or tensor.shape[0] != handle.arch.d_model:
        raise ValueError(f"vector in {path} has shape {tuple(tensor.shape)}; {handle.name} needs "
                         f"[{handle.arch.d_model}]")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"vector in {path} has non-finite values")
    return ConceptVector(name or path.stem, layer, tensor.float(), kind="file", model=handle.name)


def cosine_similarity_matrix(bank: VectorBank, layer: int) -> Similarity:
    """``[n_words, n_words]`` cosine similarities between the bank's vectors at ``layer``."""
    v = torch.nn.functional.normalize(bank.vectors[:, layer].float(), dim=-1)
    return v @ v.T



def residual_norms(handle: ModelHandle, prompt: Prompt, *, cache: bool = True) -> ResidualNorms:
    """‖h‖ at every layer: the median over ``prompt``'s tokens of the residual stream's L2 norm (decoder-layer
    output, no injection), ``[n_layers]`` float32 — the yardstick of :func:`relative_strength`.

    Measured once per (model, revision, dtype, prompt) and cached on disk (``<cache>/residual_norms``), written
    atomically and checked on read.
    """
    key = {"model": handle.name, "revision": handle.revision, "dtype": str(handle.dtype), "prompt": prompt.hash,
           "n_layers": handle.arch.n_layers}
    path = cache_dir() / "residual_norms" / handle.name / f"{content_hash(key)}.json"
    if cache and path.is_file():
        try:
            entry = json.loads(path.read_text())
            if entry["key"] == key and len(entry["norms"]) == handle.arch.n_layers:
                return torch.tensor(entry["norms"], dtype=torch.float32)
        except (ValueError, KeyError, TypeError):
            pass
    ids = torch.tensor([prompt.input_ids], device=handle.device)
    remote = {"remote": handle.remote} if handle.remote else {}
    with torch.no_grad(), handle.model.trace(ids, **remote):
        norms = nnsight.save([layer.output[0].float().norm(dim=-1) for layer in handle.layers])  # each [T]
    out = torch.stack([n.cpu().median() for n in norms]).float()
    if cache:
        atomic_write(path, json.dumps({"key": key, "norms": out.tolist()}))
    return out


def relative_strength(scale: float, vector: ConceptVector, residual_norm: float) -> float:
    """s·‖v‖ / ‖h‖: the injection's size against the residual stream it is added to (comparable across models,
    concepts and codebases; ``residual_norm`` from :func:`residual_norms` at the vector's layer)."""
    return float(scale) * vector.norm / float(residual_norm)


def scale_for(relative: float, vector: ConceptVector, residual_norm: float) -> float:
    """The scale ``s`` that gives ``vector`` the relative strength ``relative``: r·‖h‖ / ‖v‖."""
    if vector.norm == 0:
        raise ValueError(f"{vector!r} has norm 0: no scale gives it a relative strength")
    return float(relative) * float(residual_norm) / vector.norm
