"""Localization (Godet): which of N sentences carried the injected vector, against chance and its confounds
(notebooks 10 and 13). Over 400 lines because the run, its table and its reading (accuracy with the position-matched
chance and the readout's movement, the found rule) share one row layout and are read together."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch

from introspection_utils.core.data import load_list, load_prompts
from introspection_utils.core.intervals import wilson_interval, z_score
from introspection_utils.core.paths import checkpoint, content_hash
from introspection_utils.core.results import SweepResult
from introspection_utils.engine.measure import Trial, answer_logits
from introspection_utils.engine.metadata import metadata
from introspection_utils.engine.prompts import Prompt, answer_token_id, chat_prompt
from introspection_utils.engine.vectors import (
    ConceptVector,
    VectorBank,
    concept_vectors,
    contrastive_vectors,
    default_layers,
    random_vector,
)
from introspection_utils.stats.accuracy import (
    chance_bar,
    chance_sentence,
    compared_with_chance,
    position_matched_chance,
    position_sentence,
    positions_balanced,
    readout_moved,
    unmoved_sentence,
)

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

Question = Literal["introspection", "abstract", "concrete"]
QUESTION_SECTIONS = {"introspection": "localization", "abstract": "localization_abstract",
                     "concrete": "localization_concrete"}
CONTROLS = ("abstract", "concrete", "no injection", "random", "shuffled")
DEFAULT_DEPTH = 0.5  # Godet's default injection depth (fraction of the layers): layer n_layers // 2
COLUMNS = ["model", "set_index", "n_sentences", "condition", "question_kind", "injected", "vector_kind",
           "vector_label", "vector_seed", "vector_norm", "layer", "scale", "target", "prediction", "correct",
           "target_margin"]


@dataclass(frozen=True)
class LocalizationPrompt:
    """One localization conversation: the :class:`Prompt` and each sentence's token span ``[start, end)``.

    ``spans[i]`` covers exactly the tokens of ``sentences[i]`` (a token is in if it overlaps the sentence's
    characters; a leading space merged into the first word's token is part of the sentence, the ": " before it
    is not). ``prompt.injection_start`` is the first sentence's first token.
    """

    prompt: Prompt
    sentences: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]
    question_kind: str

    def window(self, index: int) -> tuple[int, int]:
        """The injection window of sentence ``index`` (0-based), for :class:`measure.Trial`."""
        return self.spans[index]


def localization_prompt(handle: ModelHandle, sentences: Sequence[str], *, question: Question = "introspection",
                        system: str | None = None) -> LocalizationPrompt:
    """Godet's localization prompt for ``sentences`` (or its "most abstract"/"most concrete" control).

    user: preamble → assistant: "Ok." → user: "SENTENCE 1: … SENTENCE N: …\\n{question}" → assistant: prefill.
    Texts from ``data/prompts.toml`` ([localization], [localization_abstract], [localization_concrete]).
    """
    if question not in QUESTION_SECTIONS:
        raise ValueError(f"unknown localization question {question!r}; use one of {', '.join(QUESTION_SECTIONS)}")
    sentences = tuple(sentences)
    if not 2 <= len(sentences) <= 9:
        raise ValueError(f"{len(sentences)} sentences given; the digit readout needs 2..9")
    if any(not s.strip() for s in sentences):
        raise ValueError("a sentence is empty")
    prompts = load_prompts()
    p, frame = prompts[QUESTION_SECTIONS[question]], prompts["localization"]
    fmt = frame["sentence_format"]
    listing = " ".join(fmt.format(index=i + 1, sentence=s) for i, s in enumerate(sentences))
    content = f"{listing}\n{p['question']}"
    messages = [{"role": "user", "content": p["preamble"]}, {"role": "assistant", "content": frame["assistant_ack"]},
                {"role": "user", "content": content}]
    first = len(fmt.format(index=1, sentence="\0").split("\0")[0])  # characters before sentence 1
    prompt = chat_prompt(handle, messages, injection_from=first, prefill=p["prefill"], kind=f"localization-{question}",
                         question=p["question"], system=system)
    # Character range of each sentence inside the rendered text, then the tokens overlapping it.
    base = prompt.text.rindex(content)
    offsets = handle.tokenizer(prompt.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans, cursor = [], 0
    for i, sentence in enumerate(sentences):
        head = fmt.format(index=i + 1, sentence="\0").split("\0")[0]
        cursor = listing.index(head + sentence, cursor) + len(head)
        lo, hi = base + cursor, base + cursor + len(sentence)
        tokens = [t for t, (a, b) in enumerate(offsets) if b > lo and a < hi]
        spans.append((tokens[0], tokens[-1] + 1))
    return LocalizationPrompt(prompt, sentences, tuple(spans), question)


def digit_token_ids(handle: ModelHandle, n: int) -> list[int]:
    """Token ids of the answers "1".."n", each as the model would emit it (single tokens)."""
    if not 2 <= n <= 9:
        raise ValueError(f"n={n}: the digit readout covers 2..9 sentences")
    return [answer_token_id(handle, str(d)) for d in range(1, n + 1)]


def predict(logits: torch.Tensor) -> torch.Tensor:
    """The predicted sentence (1-based) from the digit logits ``[n, N]``: argmax over "1".."N". ``[n]`` long."""
    return logits.argmax(dim=-1) + 1


def sentence_sets(n_sets: int, n_sentences: int = 5, *, seed: int = 0,
                  pool: Sequence[str] | None = None) -> list[tuple[str, ...]]:
    """``n_sets`` sets of ``n_sentences`` distinct sentences drawn (seeded) from ``pool`` (default: Godet's 100)."""
    pool = list(pool) if pool is not None else list(load_list("godet_localization_sentences"))
    if not 2 <= n_sentences <= min(9, len(pool)):
        raise ValueError(f"n_sentences={n_sentences}; allowed 2..{min(9, len(pool))}")
    if n_sets < 1:
        raise ValueError(f"n_sets must be >= 1, got {n_sets}")
    rng = np.random.default_rng(seed)
    return [tuple(pool[i] for i in rng.choice(len(pool), n_sentences, replace=False)) for _ in range(n_sets)]


def shuffled_order(n: int, rng: np.random.Generator) -> list[int]:
    """A permutation of ``range(n)`` that moves every sentence (a derangement), drawn from ``rng``."""
    while True:
        order = [int(i) for i in rng.permutation(n)]
        if all(o != i for i, o in enumerate(order)):
            return order


def godet_pairs() -> list[tuple[str, str]]:
    """Godet's 50 contrastive pairs (specific, generic); his vector is act(generic) − act(specific)."""
    lines = list(load_list("godet_localization_contrastive_pairs"))
    return list(zip(lines[0::2], lines[1::2], strict=True))


def localization_bank(handle: ModelHandle, source: str = "concept", *, concepts: Sequence[str] | None = None,
                      progress: bool = True) -> VectorBank:
    """The vectors to inject: ``"concept"`` (``concepts``' concept vectors, default the paper's first 8 words) or
    ``"contrastive"`` (Godet's pairs as raw text, read at the last token, as his code does)."""
    if source == "concept":
        words = list(concepts) if concepts is not None else list(load_list("concept_words"))[:8]
        return concept_vectors(handle, words, progress=progress)
    if source == "contrastive":
        pairs = godet_pairs()
        labels = [f"{a} -> {b}" for a, b in pairs]
        return contrastive_vectors(handle, pairs, chat=False, labels=labels)
    raise ValueError(f"unknown vector source {source!r}; use 'concept' or 'contrastive'")


@dataclass(frozen=True)
class LocalizationSpec:
    """What a localization run measures: ``n_sets`` sentence sets of ``n_sentences`` (every sentence the target
    once), accuracy across ``scales`` at ``layer`` and across ``layers`` at ``scale``, with ``controls``."""

    n_sentences: int
    n_sets: int
    layer: int
    scales: tuple[float, ...]
    layers: tuple[int, ...]
    scale: float
    vectors: str = "concept"
    n_random: int = 1
    controls: tuple[str, ...] = CONTROLS
    seed: int = 0

    @property
    def hash(self) -> str:
        return content_hash(self)

    def grid(self) -> list[tuple[int, float]]:
        """The (layer, scale) points measured: the scale line at ``layer`` then the layer line at ``scale``."""
        points = [(self.layer, float(s)) for s in self.scales] + [(int(L), float(self.scale)) for L in self.layers]
        return list(dict.fromkeys(points))


def _check_spec(handle: ModelHandle, spec: LocalizationSpec) -> None:
    handle.check_layer(spec.layer)
    for layer in spec.layers:
        handle.check_layer(layer)
    for s in (*spec.scales, spec.scale):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not np.isfinite(s):
            raise ValueError(f"scale {s!r} must be a finite number")
    if not spec.scales:
        raise ValueError("no scales given")
    unknown = set(spec.controls) - set(CONTROLS)
    if unknown:
        raise ValueError(f"unknown controls {sorted(unknown)}; choose from {', '.join(CONTROLS)}")
    if spec.n_random < 0:
        raise ValueError(f"n_random must be >= 0, got {spec.n_random}")


@dataclass(frozen=True)
class _Row:
    """Bookkeeping of one trial (what the table says about it)."""

    set_index: int
    condition: str
    question_kind: str
    vector: ConceptVector | None
    layer: int | None
    scale: float
    target: int  # 1-based


def run_localization(handle: ModelHandle, *, vectors: str = "concept", concepts: Sequence[str] | None = None,
                     n_sentences: int = 5, n_sets: int = 3, layer: int | None = None,
                     scales: Sequence[float] = (4.0, 16.0), layers: Sequence[int] | None = None,
                     scale: float | None = None, n_random: int = 1, controls: Sequence[str] = CONTROLS,
                     seed: int = 0, bank: VectorBank | None = None, results_dir: str | Path | None = None,
                     name: str = "localization", batch_size: int | None = None, progress: bool = True
                     ) -> SweepResult:
    """Run the localization experiment and its controls; one row per (set, condition, layer, scale, target).

    ``layer=None``: the layer at depth :data:`DEFAULT_DEPTH`. ``layers=None``: 2 layers spread over the model
    (and ``layer``).
    ``scale=None``: the largest of ``scales``. Set ``i`` uses the bank's vector ``i mod n_words`` (concept or
    contrastive, see :func:`localization_bank`). Columns :data:`COLUMNS`; ``target`` and ``prediction`` are
    1-based sentence numbers; ``target_margin`` = target digit's logit − the best other digit's (> 0 iff correct).
    With ``results_dir`` the table and metadata are saved as ``<results_dir>/<name>.csv`` / ``.meta.json``.
    """
    layer = int(DEFAULT_DEPTH * handle.arch.n_layers) if layer is None else layer
    if layers is None:  # 2 inner layers spread over the model, plus the scale line's layer
        layers = sorted(set(default_layers(handle, n=4)[1:-1]) | {layer})
    spec = LocalizationSpec(n_sentences=n_sentences, n_sets=n_sets, layer=layer, scales=tuple(float(s) for s in scales),
                            layers=tuple(int(L) for L in layers), scale=float(max(scales) if scale is None else scale),
                            vectors=vectors, n_random=n_random, controls=tuple(controls), seed=seed)
    _check_spec(handle, spec)
    sets = sentence_sets(n_sets, n_sentences, seed=seed)
    bank = bank or localization_bank(handle, vectors, concepts=concepts, progress=progress)
    digits = digit_token_ids(handle, n_sentences)
    rng = np.random.default_rng([seed, 1])
    trials, rows, prompt_hashes = [], [], []

    def add(lp: LocalizationPrompt, row: _Row, window_index: int, vector: ConceptVector | None) -> None:
        trials.append(Trial(lp.prompt, vector, row.scale if vector is not None else 0.0, row.layer,
                            window=lp.window(window_index)))
        rows.append(row)

    for k, sentences in enumerate(sets):
        word = bank.words[k % len(bank.words)]
        questions = ["introspection"] + [q for q in ("abstract", "concrete") if q in spec.controls]
        prompts = {q: localization_prompt(handle, sentences, question=q) for q in questions}
        order = shuffled_order(n_sentences, rng)
        shuffled = localization_prompt(handle, [sentences[i] for i in order]) if "shuffled" in spec.controls else None
        prompt_hashes += [p.prompt.hash for p in prompts.values()] + ([shuffled.prompt.hash] if shuffled else [])
        for t in range(n_sentences):
            if "no injection" in spec.controls:
                for q, lp in prompts.items():  # same window as the injected trials: shares their prompt pass
                    add(lp, _Row(k, "no injection", q, None, None, 0.0, t + 1), t, None)
            for L, s in spec.grid():
                v = bank.get(word, L)
                add(prompts["introspection"], _Row(k, "introspection", "introspection", v, L, s, t + 1), t, v)
                for q in questions[1:]:
                    add(prompts[q], _Row(k, q, q, v, L, s, t + 1), t, v)
                if "random" in spec.controls:
                    for r in range(n_random):
                        rv = random_vector(v, seed + r)
                        add(prompts["introspection"], _Row(k, "random", "introspection", rv, L, s, t + 1), t, rv)
                if shuffled is not None:
                    j = order.index(t)  # where sentence t now stands
                    add(shuffled, _Row(k, "shuffled", "introspection", v, L, s, j + 1), j, v)

    # One sentence set at a time, each kept under <results_dir>/.chunks/ (resumable; rows are grouped by set).
    key = {"model": handle.name, "revision": handle.revision, "dtype": str(handle.dtype), "spec": asdict(spec),
           "words": list(bank.words), "bank": hashlib.sha256(bank.vectors.float().numpy().tobytes()).hexdigest()[:16]}
    logits = torch.cat([checkpoint(results_dir, f"{name}-set{k:03d}", {**key, "set": k, "sentences": list(sets[k])},
                                   lambda k=k: answer_logits(handle, [t for t, r in zip(trials, rows, strict=True)
                                                                      if r.set_index == k], digits,
                                                             batch_size=batch_size, progress=progress))
                        for k in range(len(sets))])
    df = _table(handle, rows, logits, n_sentences)
    result = SweepResult(df, metadata(handle, asdict(spec), prompt_hashes))
    result.meta["experiment"] = "localization"
    result.meta["sentence_sets"] = [list(s) for s in sets]
    result.meta["vector_words"] = list(bank.words)
    if results_dir is not None:
        result.save(Path(results_dir) / name)
    return result


def _table(handle: ModelHandle, rows: Sequence[_Row], logits: torch.Tensor, n_sentences: int) -> pd.DataFrame:
    prediction = predict(logits)
    target = torch.tensor([r.target for r in rows])
    target_logit = logits.gather(1, (target - 1)[:, None])[:, 0]
    others = logits.scatter(1, (target - 1)[:, None], float("-inf")).amax(dim=1)
    df = pd.DataFrame({
        "model": handle.name,
        "set_index": [r.set_index for r in rows],
        "n_sentences": n_sentences,
        "condition": [r.condition for r in rows],
        "question_kind": [r.question_kind for r in rows],
        "injected": [r.vector is not None and r.scale != 0 for r in rows],
        "vector_kind": [r.vector.kind if r.vector is not None else "none" for r in rows],
        "vector_label": [r.vector.concept if r.vector is not None else "" for r in rows],
        "vector_seed": pd.array([r.vector.seed if r.vector is not None else None for r in rows], dtype="Int64"),
        "vector_norm": [r.vector.norm if r.vector is not None else 0.0 for r in rows],
        "layer": pd.array([r.layer for r in rows], dtype="Int64"),
        "scale": [r.scale for r in rows],
        "target": target.numpy(),
        "prediction": prediction.numpy(),
        "target_margin": (target_logit - others).double().numpy(),
    })
    df["correct"] = df["prediction"] == df["target"]
    return df[COLUMNS]


def accuracy(df: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """Accuracy per (condition, question kind, layer, scale), with chance (1/N), a Wilson interval, and what a
    position bias and a readout the injection leaves alone would score.

    Columns: ``condition, question_kind, layer, scale, n, correct, accuracy, chance, ci_low, ci_high,
    position_chance`` (the accuracy of a responder answering sentence k as often as the same question without
    injection does, or as the random vectors do at that point — the largest;
    :func:`stats.accuracy.position_matched_chance`: 1/N exactly, as every sentence of a set is the target once),
    ``balanced`` (every position the target equally often), ``margin_shift`` (the median |target margin − the same
    set's and target's margin without injection|, logits; NaN without those rows and for the shuffled control, whose
    prompt has none) and ``moved`` (:func:`stats.accuracy.readout_moved`). ``layer`` is <NA> for the no-injection
    rows.
    """
    df = df.reset_index(drop=True)  # positions below are row numbers
    keys = ["condition", "question_kind", "layer", "scale"]
    n_pos = int(df["n_sentences"].max())
    has_positions = {"target", "prediction"} <= set(df.columns)  # a bare count table has no positions
    target = df["target"].to_numpy(dtype=np.int64) - 1 if has_positions else np.zeros(len(df), dtype=np.int64)
    answer = df["prediction"].to_numpy(dtype=np.int64) - 1 if has_positions else np.zeros(len(df), dtype=np.int64)
    none = df[df["condition"] == "no injection"]
    none_margin = (none.set_index(["set_index", "question_kind", "target"])["target_margin"]
                   if has_positions and {"set_index", "target_margin"} <= set(df.columns) else pd.Series(dtype=float))
    rows = []
    for key, g in df.groupby(keys, dropna=False, sort=True):
        at = df.index.get_indexer(g.index)
        condition, question, layer, scale = key
        refs = [answer[df.index.get_indexer(none.index[none["question_kind"] == question])]]
        if condition != "no injection" and not pd.isna(layer):
            rand = df[(df["condition"] == "random") & (df["layer"] == layer) & (df["scale"] == scale)]
            refs.append(answer[df.index.get_indexer(rand.index)])
        position_chance = (max((position_matched_chance(target[at], r, n_pos) for r in refs if len(r)),
                               default=float(np.mean(1.0 / g["n_sentences"]))) if has_positions else float("nan"))
        shift = float("nan")
        if condition not in ("no injection", "shuffled") and len(none_margin):
            base = none_margin.reindex(pd.MultiIndex.from_frame(g[["set_index", "question_kind", "target"]]))
            diff = np.abs(g["target_margin"].to_numpy(dtype=float) - base.to_numpy(dtype=float))
            shift = float(np.median(diff[~np.isnan(diff)])) if (~np.isnan(diff)).any() else float("nan")
        correct = int(g["correct"].sum())
        low, high = wilson_interval(correct, len(g), z=z_score(level))
        rows.append({**dict(zip(keys, key, strict=True)), "n": len(g), "correct": correct,
                     "accuracy": correct / len(g), "chance": float(np.mean(1.0 / g["n_sentences"])),
                     "ci_low": low, "ci_high": high, "position_chance": position_chance,
                     "balanced": has_positions and positions_balanced(target[at], n_pos), "margin_shift": shift,
                     "moved": condition != "no injection" and bool(np.isnan(shift) or readout_moved(shift))})
    out = pd.DataFrame(rows)
    out["layer"] = pd.array(out["layer"], dtype="Int64")
    return out


def accuracy_lines(result: SweepResult) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two lines of a run: accuracy vs scale at the spec's ``layer`` and vs layer at its ``scale``."""
    spec = result.meta["spec"]
    acc = accuracy(result.df)
    injected = acc[acc["condition"] != "no injection"]
    vs_scale = injected[injected["layer"] == spec["layer"]].sort_values(["condition", "scale"])
    vs_layer = injected[injected["scale"] == spec["scale"]].sort_values(["condition", "layer"])
    return vs_scale.reset_index(drop=True), vs_layer.reset_index(drop=True)


def agreement(df: pd.DataFrame, condition: str = "introspection", with_question: str = "abstract") -> pd.DataFrame:
    """How often ``condition``'s prediction equals the ``with_question`` control's under the same injection.

    Per (layer, scale): the fraction of trials where both questions pick the same sentence. Near 1 means the
    introspection answer is what "which sentence is most abstract?" would say anyway.
    """
    keys = ["set_index", "layer", "scale", "target"]
    a = df[df["condition"] == condition].set_index(keys)["prediction"]
    b = df[df["condition"] == with_question].set_index(keys)["prediction"]
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").reset_index()
    both["same"] = both["a"] == both["b"]
    return both.groupby(["layer", "scale"], as_index=False)["same"].mean().rename(columns={"same": "agreement"})


def localized(result: SweepResult) -> bool:
    """Whether the injected sentence is found: at the introspection question's best (layer, scale) the injection
    moves the readout (``moved``, :func:`accuracy`), the accuracy's interval lies above chance and above the
    position-matched chance (:func:`stats.accuracy.chance_bar`), and every control condition measured there scores
    below its low end."""
    acc = accuracy(result.df)
    inj = acc[acc["condition"] == "introspection"]
    best = inj.loc[inj["accuracy"].idxmax()]
    at = acc[(acc["layer"] == best["layer"]) & (acc["scale"] == best["scale"]) & (acc["condition"] != "introspection")]
    return bool(best["moved"] and best["ci_low"] > chance_bar(best) and (at["accuracy"] < best["ci_low"]).all())


def reading(result: SweepResult) -> str:
    """Sentences computed from the numbers: the best injected accuracy against chance and against each control."""
    spec = result.meta["spec"]
    acc = accuracy(result.df)
    chance = float(acc["chance"].iloc[0])
    inj = acc[acc["condition"] == "introspection"]
    best = inj.loc[inj["accuracy"].idxmax()]
    lines = [f"Chance is {chance:.0%} ({spec['n_sentences']} sentences). The introspection question localizes best at "
             f"layer {int(best['layer'])}, scale {best['scale']:g}: {chance_sentence(best)}.",
             position_sentence(best, "sentence sets", "the injected sentence at every position")]
    if not best["moved"]:
        lines.append(unmoved_sentence("that point", best["margin_shift"]).capitalize())
    at = acc[(acc["layer"] == best["layer"]) & (acc["scale"] == best["scale"])].set_index("condition")
    for condition in ("abstract", "concrete", "random", "shuffled"):
        if condition in at.index:
            row = at.loc[condition]
            rel = compared_with_chance(row["ci_low"], row["ci_high"], chance)
            lines.append(f"At the same point, the {condition} control scores {row['accuracy']:.0%} ({rel}).")
    if "abstract" in set(result.df["condition"]):
        agree = agreement(result.df)
        here = agree[(agree["layer"] == best["layer"]) & (agree["scale"] == best["scale"])]
        if len(here):
            lines.append(f"The introspection answer equals the 'most abstract' answer in "
                         f"{here['agreement'].iloc[0]:.0%} of trials there.")
    return " ".join(lines)
