"""Sweeps over concepts × scales × layers × questions × vector kinds → tidy DataFrames with metadata, resumable.

One row per trial: ``model, concept, vector_kind, vector_seed, vector_norm, layer, scale, question_kind, question,
question_about, logit_diff, baseline_logit_diff, delta, answer_mass, baseline_answer_mass`` (``delta = logit_diff −
baseline_logit_diff``, the question's own no-injection baseline; ``question_about`` "self" or "world";
``answer_mass`` = P(yes) + P(no) at the answer position, injected and not). Work is done one question at a time
and each finished question is written to disk, so an interrupted sweep picks up where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nnsight
import pandas as pd
import torch
import transformers
from tqdm.auto import tqdm

from introspection_utils.executors import LocalExecutor, ModelRecipe, RayExecutor, executor_for
from introspection_utils.inject import measure, trial_grid
from introspection_utils.models import package_version
from introspection_utils.paths import atomic_write, content_hash
from introspection_utils.prompts import (
    Prompt,
    control_questions,
    introspection_prompt,
    question_about,
    question_prompts,
)
from introspection_utils.vectors import ConceptVector, VectorBank, concept_vectors, with_random

if TYPE_CHECKING:
    from introspection_utils.models import ModelHandle

COLUMNS = ["model", "concept", "vector_kind", "vector_seed", "vector_norm", "layer", "scale", "question_kind",
           "question", "question_about", "logit_diff", "baseline_logit_diff", "delta", "answer_mass",
           "baseline_answer_mass"]


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep measures. ``introspection``: the introspection wording(s) (``None`` = the paper's trial line; a
    tuple asks each, e.g. :func:`prompts.introspection_questions`), then the ``controls``; ``n_random``
    norm-matched random vectors per concept (seeds ``seed..seed+k-1``)."""

    concepts: tuple[str, ...]
    scales: tuple[float, ...]
    layers: tuple[int, ...]
    controls: tuple[str, ...]
    n_random: int = 1
    seed: int = 0
    frame: str = "paper"
    answers: tuple[str, str] | None = None
    introspection: str | tuple[str, ...] | None = None
    ablation: str | None = None  # sha256 prefix of the ablated direction, if any (see ``direction_id``)

    @property
    def hash(self) -> str:
        return content_hash(self)

    def questions(self) -> list[tuple[str, str | None]]:
        """``(question_kind, question)`` pairs, the introspection wording(s) first."""
        wordings = self.introspection if isinstance(self.introspection, tuple) else (self.introspection,)
        return [*(("introspection", q) for q in wordings), *(("control", q) for q in self.controls)]


@dataclass
class SweepResult:
    """A sweep's tidy table and the metadata that says exactly how it was made."""

    df: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.csv`` and ``<path>.meta.json`` (atomically); returns the CSV path."""
        path = Path(path).with_suffix(".csv")
        atomic_write(path, self.df.to_csv(index=False))
        atomic_write(path.with_suffix(".meta.json"), json.dumps(self.meta, indent=1, default=str))
        return path


def load_result(path: str | Path) -> SweepResult:
    """Read a :class:`SweepResult` saved with :meth:`SweepResult.save`."""
    path = Path(path).with_suffix(".csv")
    df = pd.read_csv(path, dtype={"vector_seed": "Int64"})
    return SweepResult(df, json.loads(path.with_suffix(".meta.json").read_text()))


def _check_spec(handle: ModelHandle, spec: SweepSpec) -> None:
    if not spec.concepts:
        raise ValueError("no concepts given")
    if not spec.scales:
        raise ValueError("no scales given")
    for scale in spec.scales:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not torch.isfinite(
                torch.tensor(float(scale))):
            raise ValueError(f"scale {scale!r} must be a finite number")
    for layer in spec.layers:
        handle.check_layer(layer)
    if not spec.layers:
        raise ValueError("no layers given")
    if spec.n_random < 0:
        raise ValueError(f"n_random must be >= 0, got {spec.n_random}")


def direction_id(direction: torch.Tensor | None) -> str | None:
    """A short content hash naming an ablated direction in a spec (so resumed chunks match the direction)."""
    if direction is None:
        return None
    unit = torch.nn.functional.normalize(torch.as_tensor(direction).double(), dim=-1)
    data = unit.numpy().round(6).tobytes()  # rounded: the same direction at any scale gets the same name
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class _Unit:
    """One question's trials: what the runner resumes by and what an executor hands to a worker."""

    kind: str
    prompt: Prompt
    vectors: tuple[ConceptVector, ...]
    scales: tuple[float, ...]
    answers: tuple[str, str] | None
    batch_size: int | None
    ablate: torch.Tensor | None


def _unit_label(index: int, unit: _Unit, spec: SweepSpec) -> str:
    """The trials of a unit, in words (what a failure report names)."""
    randoms = f" + random seeds {spec.seed}..{spec.seed + spec.n_random - 1}" if spec.n_random else ""
    return (f"question {index} ({unit.kind}: {unit.prompt.question!r}): concepts {', '.join(spec.concepts)} "
            f"(concept vectors{randoms}) × layers {list(spec.layers)} × scales {list(spec.scales)} = "
            f"{len(unit.vectors) * len(unit.scales)} trials")


def _unit_frame(handle: ModelHandle, unit: _Unit) -> pd.DataFrame:
    """Measure one unit's trials: its rows of the tidy table (the work every executor runs, here or on an actor)."""
    trials = trial_grid(list(unit.vectors), [unit.prompt], unit.scales)
    readout = measure(handle, trials, answers=unit.answers, batch_size=unit.batch_size, ablate=unit.ablate)
    frame = pd.DataFrame({
        "model": handle.name,
        "concept": [t.vector.concept for t in trials],
        "vector_kind": [t.vector.kind for t in trials],
        "vector_seed": pd.array([t.vector.seed for t in trials], dtype="Int64"),
        "vector_norm": [t.vector.norm for t in trials],
        "layer": [t.vector.layer for t in trials],
        "scale": [t.scale for t in trials],
        "question_kind": unit.kind,
        "question": unit.prompt.question,
        "question_about": question_about(unit.prompt.question),
        "logit_diff": readout.logit_diff.double().numpy(),
        "baseline_logit_diff": readout.baseline.double().numpy(),
        "answer_mass": readout.answer_mass.double().numpy(),
        "baseline_answer_mass": readout.baseline_answer_mass.double().numpy(),
    })
    frame["delta"] = frame["logit_diff"] - frame["baseline_logit_diff"]
    return frame


def run_sweep(handle: ModelHandle, spec: SweepSpec, *, bank: VectorBank | None = None,
              results_dir: str | Path | None = None, name: str = "sweep", batch_size: int | None = None,
              progress: bool = True, ablate: torch.Tensor | None = None,
              executor: str | LocalExecutor | RayExecutor = "local", address: str | None = None) -> SweepResult:
    """Measure every (concept vector and random vectors) × scale × layer × question of ``spec``.

    With ``results_dir``, each finished question is written to ``<results_dir>/.chunks/<name>-<spec hash>/`` and
    reused on the next call with the same spec (resume), and the final table goes to ``<results_dir>/<name>.csv``
    with ``<name>.meta.json``.

    ``executor``: where the questions are measured — ``"local"`` (here, in order), ``"ray"`` (one Ray actor per GPU
    or CPU worker of the cluster at ``address``: ``"auto"``, ``"HOST:PORT"``, or ``None`` for the connected or a new
    local cluster; see :mod:`introspection_utils.executors`) or a :class:`~introspection_utils.executors.RayExecutor`
    (kept open for the next sweep). The table, the chunks and the metadata are the same whichever runs them.
    """
    _check_spec(handle, spec)
    if direction_id(ablate) != spec.ablation:
        raise ValueError("spec.ablation must be direction_id(ablate): the spec names what the sweep ablates")
    runner, owned = executor_for(executor, address)
    if runner.name == "ray":
        ModelRecipe.of(handle)  # a remote handle is refused before any compute
    bank = bank or concept_vectors(handle, spec.concepts, progress=progress)
    vectors = []
    for concept in spec.concepts:
        for layer in spec.layers:
            vectors.extend(with_random(bank.get(concept, layer), spec.n_random, spec.seed))
    chunk_dir = Path(results_dir) / ".chunks" / f"{name}-{spec.hash}" if results_dir is not None else None
    if chunk_dir is not None:
        chunk_dir.mkdir(parents=True, exist_ok=True)
    frames: dict[int, pd.DataFrame] = {}
    todo: list[tuple[int, _Unit, Path | None]] = []
    prompt_hashes = []
    for index, (kind, question) in enumerate(spec.questions()):
        prompt = introspection_prompt(handle, question, frame=spec.frame, kind=kind)
        prompt_hashes.append(prompt.hash)
        chunk_path = chunk_dir / f"{index:03d}-{prompt.hash}.csv" if chunk_dir is not None else None
        if chunk_path is not None and chunk_path.is_file():
            frames[index] = pd.read_csv(chunk_path, dtype={"vector_seed": "Int64"})
            continue
        todo.append((index, _Unit(kind, prompt, tuple(vectors), tuple(spec.scales), spec.answers, batch_size, ablate),
                     chunk_path))
    where = " (Ray)" if runner.name == "ray" else ""
    bar = tqdm(total=len(frames) + len(todo), initial=len(frames), desc=f"{name}: questions{where}",
               disable=not progress)
    try:
        done = runner.map(handle, _unit_frame, [u for _, u, _ in todo],
                          labels=[_unit_label(i, u, spec) for i, u, _ in todo])
        for position, frame in done:  # in the order units finish; written at once, assembled by index below
            index, _, chunk_path = todo[position]
            if chunk_path is not None:
                atomic_write(chunk_path, frame.to_csv(index=False))
            frames[index] = frame
            bar.update()
    finally:
        bar.close()
        if owned:
            runner.close()
    df = pd.concat([frames[i] for i in sorted(frames)], ignore_index=True)[COLUMNS]
    df["vector_seed"] = df["vector_seed"].astype("Int64")
    result = SweepResult(df, metadata(handle, asdict(spec), prompt_hashes))
    if results_dir is not None:
        result.save(Path(results_dir) / name)
    return result


def metadata(handle: ModelHandle, spec: Mapping[str, Any], prompt_hashes: Sequence[str]) -> dict:
    """Everything needed to say how a result was made: model, revision, dtype, the prompts' hash, the experiment's
    ``spec`` (any experiment's parameters as a plain mapping, e.g. ``asdict(SweepSpec)``; its ``seed`` and its
    content hash recorded beside it), package and library versions, time."""
    return {
        "model": handle.name, "revision": handle.revision, "dtype": str(handle.dtype).removeprefix("torch."),
        "family": handle.arch.family, "prompt_hash": hashlib.sha256("".join(prompt_hashes).encode()).hexdigest()[:16],
        "seed": spec.get("seed"), "spec": dict(spec), "spec_hash": content_hash(dict(spec)),
        "package_version": package_version(), "torch": torch.__version__, "nnsight": nnsight.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save_table(handle: ModelHandle, df: pd.DataFrame, folder: str | Path, name: str, **spec: Any) -> Path:
    """Any result table (a top-heads table, refusal scores, SAE features, ...) saved the way sweeps are:
    ``folder/name.csv`` beside ``name.meta.json`` (:func:`metadata`: model, revision, dtype, seed, versions and
    ``spec``, the parameters that made it). The prompt hash covers the question prompts the experiments share: the
    introspection prompt and the first ``spec["n_controls"]`` control questions (the introspection prompt alone
    when there is no ``n_controls``). Returns the CSV path."""
    n_controls = spec.get("n_controls")
    prompts = question_prompts(handle, n_controls) if n_controls else [introspection_prompt(handle)]
    return SweepResult(df, metadata(handle, spec, [p.hash for p in prompts])).save(Path(folder) / name)


def _spec(handle: ModelHandle, concepts: Sequence[str], scales: Sequence[float], layers: Sequence[int], *,
          n_controls: int | None, controls: Sequence[str] | None, introspection: str | Sequence[str] | None,
          **kwargs) -> SweepSpec:
    if controls is None:
        controls = control_questions(n_controls) if n_controls != 0 else []
    if introspection is not None and not isinstance(introspection, str):
        introspection = tuple(introspection)
        if not introspection:
            raise ValueError("introspection: give at least one wording (or None for the paper's trial line)")
    return SweepSpec(concepts=tuple(concepts), scales=tuple(scales), layers=tuple(layers), controls=tuple(controls),
                     introspection=introspection, **kwargs)


def scale_sweep(handle: ModelHandle, concepts: Sequence[str], scales: Sequence[float], *, layer: int,
                n_controls: int | None = 10, controls: Sequence[str] | None = None,
                introspection: str | Sequence[str] | None = None, n_random: int = 1,
                seed: int = 0, frame: str = "paper", answers: tuple[str, str] | None = None,
                results_dir: str | Path | None = None, name: str = "scale_sweep",
                bank: VectorBank | None = None, progress: bool = True, ablate: torch.Tensor | None = None,
                executor: str | LocalExecutor | RayExecutor = "local", address: str | None = None) -> SweepResult:
    """Yes−no logit difference vs injection scale at one ``layer``, for the introspection question and the first
    ``n_controls`` control questions (balanced self/world; or the given ``controls``), concept vectors and
    ``n_random`` random ones. ``introspection``: the wording(s) asked (default the paper's trial line; pass
    :func:`prompts.introspection_questions` for all of them, as the verdicts need).
    ``ablate``: a direction projected out of the residual stream in every pass (e.g. the refusal direction).
    ``executor``, ``address``: where the questions run (``"local"``, ``"ray"``; see :func:`run_sweep`)."""
    spec = _spec(handle, concepts, scales, [layer], n_controls=n_controls, controls=controls,
                 introspection=introspection, n_random=n_random,
                 seed=seed, frame=frame, answers=answers, ablation=direction_id(ablate))
    return run_sweep(handle, spec, bank=bank, results_dir=results_dir, name=name, progress=progress,
                     ablate=ablate, executor=executor, address=address)


def layer_sweep(handle: ModelHandle, concepts: Sequence[str], layers: Sequence[int], *, scale: float,
                n_controls: int | None = 10, controls: Sequence[str] | None = None,
                introspection: str | Sequence[str] | None = None, n_random: int = 1,
                seed: int = 0, frame: str = "paper", answers: tuple[str, str] | None = None,
                results_dir: str | Path | None = None, name: str = "layer_sweep",
                bank: VectorBank | None = None, progress: bool = True, ablate: torch.Tensor | None = None,
                executor: str | LocalExecutor | RayExecutor = "local", address: str | None = None) -> SweepResult:
    """Yes−no logit difference vs injection layer at one ``scale`` (same questions and vectors as
    :func:`scale_sweep`)."""
    spec = _spec(handle, concepts, [scale], layers, n_controls=n_controls, controls=controls,
                 introspection=introspection, n_random=n_random,
                 seed=seed, frame=frame, answers=answers, ablation=direction_id(ablate))
    return run_sweep(handle, spec, bank=bank, results_dir=results_dir, name=name, progress=progress,
                     ablate=ablate, executor=executor, address=address)


def concept_rows(df: pd.DataFrame, concept: str) -> pd.DataFrame:
    """The rows of ``concept`` in a tidy table (sweep, lens, ...); an empty table or an absent concept is a
    ``ValueError`` that lists the concepts the table has."""
    if df.empty:
        raise ValueError("the sweep table is empty")
    if concept not in set(df["concept"]):
        raise ValueError(f"concept {concept!r} is not in the table ({', '.join(sorted(df['concept'].unique()))})")
    return df[df["concept"] == concept]


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean delta per (concept, vector kind, layer, scale, question kind), with the control spread (std, n)."""
    keys = ["concept", "vector_kind", "layer", "scale", "question_kind"]
    return df.groupby(keys, as_index=False)["delta"].agg(mean="mean", std="std", n="count")
