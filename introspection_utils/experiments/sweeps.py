"""Sweeps over concepts × scales × layers × questions × vector kinds (:class:`SweepSpec` → a tidy table with its
metadata, resumable one question at a time); notebooks 02–06 and 08, the atlas and the explorer call them.

The columns are :data:`COLUMNS`, defined in ``docs/design.md`` ("The sweep table"). Over 400 lines because the
front doors keep their old keyword form for one release (it goes in 0.3)."""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from introspection_utils.core.paths import atomic_write, content_hash
from introspection_utils.core.results import SweepResult
from introspection_utils.engine.executors import LocalExecutor, ModelRecipe, RayExecutor, executor_for
from introspection_utils.engine.measure import Trial, measure
from introspection_utils.engine.metadata import metadata, save_table
from introspection_utils.engine.prompts import (
    CONTROL_CELLS,
    Prompt,
    check_answer_format,
    control_questions,
    default_wordings,
    introspection_prompt,
    question_tags,
)
from introspection_utils.engine.vectors import (
    ConceptVector,
    VectorBank,
    check_nulls,
    concept_vectors,
    null_source,
    residual_norms,
    scale_for,
    with_random,
)

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

LEFT_TO_MEASURE = "left to measure"  # a resumed sweep's report ends "<n> left to measure" (read by apps.findings)
COLUMNS = ["model", "concept", "vector_kind", "vector_seed", "vector_norm", "layer", "scale", "question_kind",
           "question", "question_about", "polarity", "expected", "answer_format", "logit_diff",
           "baseline_logit_diff", "delta", "answer_mass", "baseline_answer_mass", "null_kind", "effective_strength",
           "relative_strength"]
# A fit of the controls' shift on their own baseline needs spread: chosen controls whose no-injection yes−no span
# less than this (logits) are reported (a warning, and ``control_span`` in the metadata).
MIN_CONTROL_SPAN = 2.0
STRENGTHS = ("raw", "relative")  # how a sweep's scales are read (see SweepSpec)


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep measures: the front door of :func:`scale_sweep`, :func:`layer_sweep` and :func:`run_sweep`
    (build one with the series' defaults with :meth:`build`). ``introspection``: the introspection wording(s)
    (``None`` = the paper's trial line; a tuple asks each, e.g. :func:`prompts.introspection_questions`), then the
    ``controls``; ``n_random`` norm-matched null vectors per concept and null kind in ``nulls`` (seeds
    ``seed..seed+k-1``). ``strength="raw"``: ``scales`` are the multiples s of each vector (the paper's convention;
    a negative s injects −|s|·v, the vector's opposite); ``"relative"``: they are relative strengths r, and each
    concept is injected at s = r·‖h‖/‖v‖ (its random vectors too). Its fields are saved in the table's metadata and
    its :attr:`hash` names the resumable chunks."""

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
    answer_format: str = "open"  # prompts.ANSWER_FORMATS
    nulls: tuple[str, ...] = ("isotropic",)
    strength: str = "raw"

    @classmethod
    def build(cls, concepts: Sequence[str], scales: Sequence[float], layers: Sequence[int], *,
              n_controls: int | None = 10, controls: Sequence[str] | None = None,
              introspection: str | Sequence[str] | None = None, nulls: Sequence[str] = ("isotropic",),
              **fields) -> SweepSpec:
        """A spec with the series' defaults: the first ``n_controls`` balanced control questions
        (:func:`prompts.control_questions`; ``0``: none) unless ``controls`` are given, and the default wordings of
        both polarities (:func:`prompts.default_wordings`) unless ``introspection`` names the wording(s) (one string:
        that wording alone). ``fields``: the other fields (``n_random``, ``seed``, ``frame``, ``answers``,
        ``answer_format``, ``strength``). A negative scale injects the vector's opposite (−s·v)."""
        if controls is None:
            controls = control_questions(n_controls) if n_controls != 0 else []
        if introspection is None:
            introspection = tuple(default_wordings())
        elif not isinstance(introspection, str):
            introspection = tuple(introspection)
            if not introspection:
                raise ValueError("introspection: give at least one wording (or None for the default wordings)")
        return cls(concepts=tuple(concepts), scales=tuple(scales), layers=tuple(layers), controls=tuple(controls),
                   introspection=introspection, nulls=tuple(nulls), **fields)

    @property
    def hash(self) -> str:
        return content_hash(self)

    def questions(self) -> list[tuple[str, str | None]]:
        """``(question_kind, question)`` pairs, the introspection wording(s) first."""
        wordings = self.introspection if isinstance(self.introspection, tuple) else (self.introspection,)
        return [*(("introspection", q) for q in wordings), *(("control", q) for q in self.controls)]


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
    check_answer_format(spec.answer_format)
    check_nulls(spec.nulls)
    if spec.strength not in STRENGTHS:
        raise ValueError(f"strength {spec.strength!r} must be one of {', '.join(STRENGTHS)}")


def direction_id(direction: torch.Tensor | None) -> str | None:
    """A short content hash naming an ablated direction in a spec (so resumed chunks match the direction)."""
    if direction is None:
        return None
    unit = torch.nn.functional.normalize(torch.as_tensor(direction).double(), dim=-1)
    data = unit.numpy().round(6).tobytes()  # rounded: the same direction at any scale gets the same name
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class _Unit:
    """One question's trials: what the runner resumes by and what an executor hands to a worker. ``pairs``: the
    (vector, scale) of each trial; ``h_norm [n_layers]``: the residual norms relative strength is read against."""

    kind: str
    prompt: Prompt
    pairs: tuple[tuple[ConceptVector, float], ...]
    answers: tuple[str, str] | None
    answer_format: str
    h_norm: tuple[float, ...]
    batch_size: int | None
    ablate: torch.Tensor | None


def _unit_label(index: int, unit: _Unit, spec: SweepSpec) -> str:
    """The trials of a unit, in words (what a failure report names)."""
    randoms = f" + random seeds {spec.seed}..{spec.seed + spec.n_random - 1}" if spec.n_random else ""
    return (f"question {index} ({unit.kind}: {unit.prompt.question!r}): concepts {', '.join(spec.concepts)} "
            f"(concept vectors{randoms}) × layers {list(spec.layers)} × scales {list(spec.scales)} = "
            f"{len(unit.pairs)} trials")


def _unit_frame(handle: ModelHandle, unit: _Unit) -> pd.DataFrame:
    """Measure one unit's trials: its rows of the tidy table (the work every executor runs, here or on an actor)."""
    trials = [Trial(unit.prompt, v, s) for v, s in unit.pairs]
    tags = question_tags(unit.prompt.question)
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
        "question_about": tags["about"],
        "polarity": tags["polarity"],
        "expected": tags["expected"],
        "answer_format": unit.answer_format,
        "logit_diff": readout.logit_diff.double().numpy(),
        "baseline_logit_diff": readout.baseline.double().numpy(),
        "answer_mass": readout.answer_mass.double().numpy(),
        "baseline_answer_mass": readout.baseline_answer_mass.double().numpy(),
        "null_kind": [t.vector.null or "" for t in trials],
        "effective_strength": [t.scale * t.vector.norm for t in trials],
        "relative_strength": [t.scale * t.vector.norm / unit.h_norm[t.vector.layer] for t in trials],
    })
    frame["delta"] = frame["logit_diff"] - frame["baseline_logit_diff"]
    return frame


def run_sweep(handle: ModelHandle, spec: SweepSpec, *, bank: VectorBank | None = None,
              results_dir: str | Path | None = None, name: str = "sweep", batch_size: int | None = None,
              progress: bool = True, ablate: torch.Tensor | None = None,
              executor: str | LocalExecutor | RayExecutor = "local", address: str | None = None) -> SweepResult:
    """Measure every (concept vector and random vectors) × scale × layer × question of ``spec``.

    With ``results_dir``, each finished question is written to ``<results_dir>/.chunks/<name>-<hash>/`` (the hash of
    the spec, the model, its revision and dtype) and reused on the next call with the same of each (resume), and the
    final table goes to ``<results_dir>/<name>.csv`` with ``<name>.meta.json``.

    ``executor``: where the questions are measured — ``"local"`` (here, in order), ``"ray"`` (one Ray actor per GPU
    or CPU worker of the cluster at ``address``: ``"auto"``, ``"HOST:PORT"``, or ``None`` for the connected or a new
    local cluster; see :mod:`introspection_utils.engine.executors`) or a
    :class:`~introspection_utils.engine.executors.RayExecutor`
    (kept open for the next sweep). The table, the chunks and the metadata are the same whichever runs them.
    """
    _check_spec(handle, spec)
    if direction_id(ablate) != spec.ablation:
        raise ValueError("spec.ablation must be direction_id(ablate): the spec names what the sweep ablates")
    runner, owned = executor_for(executor, address)
    if runner.name == "ray":
        ModelRecipe.of(handle)  # a remote handle is refused before any compute
    bank = bank or concept_vectors(handle, spec.concepts, progress=progress)
    source = null_source(handle) if spec.n_random and set(spec.nulls) & {"covariance", "other-word"} else None
    vectors = []
    for concept in spec.concepts:
        for layer in spec.layers:
            vectors.extend(with_random(bank.get(concept, layer), spec.n_random, spec.seed, nulls=spec.nulls,
                                       source=source))
    questions = spec.questions()
    reference = introspection_prompt(handle, questions[0][1], frame=spec.frame, kind=questions[0][0],
                                     answer_format=spec.answer_format)
    h_norm = residual_norms(handle, reference)  # [n_layers]: ‖h‖, the yardstick of relative strength
    if spec.strength == "relative":  # each concept (and its null vectors, norm-matched) at s = r·‖h‖/‖v‖
        scales_of = {v: [scale_for(r, bank.get(v.concept, v.layer), float(h_norm[v.layer])) for r in spec.scales]
                     for v in vectors}
    else:
        scales_of = {v: [float(s) for s in spec.scales] for v in vectors}
    # the chunks' folder names the model, its revision and dtype beside the spec: a rerun in another dtype (or a
    # model writing into the same folder) measures afresh instead of resuming from another model's answers
    made_by = content_hash({"spec": spec.hash, "model": handle.name, "revision": handle.revision,
                            "dtype": str(handle.dtype)})
    chunk_dir = Path(results_dir) / ".chunks" / f"{name}-{made_by}" if results_dir is not None else None
    if chunk_dir is not None:
        chunk_dir.mkdir(parents=True, exist_ok=True)
    frames: dict[int, pd.DataFrame] = {}
    todo: list[tuple[int, _Unit, Path | None]] = []
    prompt_hashes = []
    pairs = tuple((v, s) for v in vectors for s in scales_of[v])
    for index, (kind, question) in enumerate(questions):
        prompt = introspection_prompt(handle, question, frame=spec.frame, kind=kind, answer_format=spec.answer_format)
        prompt_hashes.append(prompt.hash)
        chunk_path = chunk_dir / f"{index:03d}-{prompt.hash}.csv" if chunk_dir is not None else None
        if chunk_path is not None and chunk_path.is_file():
            frames[index] = pd.read_csv(chunk_path, dtype={"vector_seed": "Int64", "null_kind": str})
            continue
        todo.append((index, _Unit(kind, prompt, pairs, spec.answers, spec.answer_format,
                                  tuple(float(x) for x in h_norm), batch_size, ablate), chunk_path))
    if frames and progress:  # a resumed run says what it kept and what is left
        kept = sum(len(f) for f in frames.values())
        tqdm.write(f"{name}: resumed from {chunk_dir}: kept {len(frames)} of {len(questions)} questions "
                   f"({kept} rows); {len(todo)} {LEFT_TO_MEASURE}")
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
    df["null_kind"] = df["null_kind"].fillna("")
    meta = metadata(handle, asdict(spec), prompt_hashes)
    meta["residual_norm"] = {"prompt": reference.hash, "statistic": "median over the prompt's tokens",
                             "by_layer": {int(layer): float(h_norm[layer]) for layer in spec.layers}}
    result = SweepResult(df, meta)
    result.meta["control_span"] = control_span(df)
    if result.meta["control_span"] is not None and result.meta["control_span"] < MIN_CONTROL_SPAN:
        warnings.warn(f"{name}: the control questions' no-injection yes−no spans {result.meta['control_span']:.2f} "
                      f"logits (< {MIN_CONTROL_SPAN:g}): a fit of their shift on their baseline has little spread to "
                      f"go on; pick controls from a battery (sweeps.control_battery, sweeps.pick_controls)",
                      stacklevel=2)
    if results_dir is not None:
        result.save(Path(results_dir) / name)
    return result


_LEGACY = ("layer", "scale", "n_controls", "controls", "introspection", "n_random", "seed", "frame", "answers",
           "answer_format", "nulls", "strength")  # the fields the keyword form of scale_sweep/layer_sweep spelled out


def _legacy_spec(spec: SweepSpec | Sequence[str], args: tuple, keywords: dict, *, sweep: str) -> SweepSpec:
    """The spec of a call in the old keyword form (``scale_sweep(h, concepts, scales, layer=..., n_controls=...)``),
    with a ``DeprecationWarning``; a call with a :class:`SweepSpec` passes through."""
    if isinstance(spec, SweepSpec):
        if args or keywords:
            raise TypeError(f"{sweep}_sweep(handle, spec, ...): the spec holds what is measured; only execution "
                            f"options may follow it (got {[*map(repr, args), *keywords]})")
        return spec
    unknown = sorted(set(keywords) - {*_LEGACY, "scales", "layers"})
    if unknown:
        raise TypeError(f"{sweep}_sweep() got unexpected keyword argument(s) {unknown}")
    warnings.warn(f"{sweep}_sweep(handle, concepts, ...) with the spec's fields as keywords is deprecated; pass a "
                  f"spec: {sweep}_sweep(handle, SweepSpec.build(concepts, ...), results_dir=..., ...)",
                  DeprecationWarning, stacklevel=3)
    axis = "scales" if sweep == "scale" else "layers"
    grid = args[0] if args else keywords.pop(axis)
    if len(args) > 1:
        raise TypeError(f"{sweep}_sweep() takes handle, concepts and {axis} positionally")
    single = {"scale": "layer", "layer": "scale"}[sweep]
    if single not in keywords:
        raise TypeError(f"{sweep}_sweep() missing the keyword argument {single!r}")
    point = [keywords.pop(single)]
    scales, layers = (grid, point) if sweep == "scale" else (point, grid)
    return SweepSpec.build(spec, scales, layers, **keywords)


def _run(handle: ModelHandle, spec: SweepSpec, ablate: torch.Tensor | None, **options) -> SweepResult:
    """Run a front door's spec: a direction given as ``ablate`` names itself in a spec that names none."""
    if ablate is not None and spec.ablation is None:
        spec = replace(spec, ablation=direction_id(ablate))
    return run_sweep(handle, spec, ablate=ablate, **options)


def scale_sweep(handle: ModelHandle, spec: SweepSpec, /, *legacy, results_dir: str | Path | None = None,
                name: str = "scale_sweep", bank: VectorBank | None = None, batch_size: int | None = None,
                progress: bool = True, ablate: torch.Tensor | None = None,
                executor: str | LocalExecutor | RayExecutor = "local", address: str | None = None,
                **legacy_fields) -> SweepResult:
    """Yes−no logit difference vs injection scale at the one layer of ``spec`` (build it with
    :meth:`SweepSpec.build`: the introspection wordings and balanced controls, concept vectors and norm-matched random
    ones). The rest are execution options: ``results_dir``/``name`` (saved table and resumable chunks), ``bank``
    (concept vectors already computed), ``batch_size``, ``progress``, ``ablate`` (a direction projected out of the
    residual stream in every pass, e.g. the refusal direction; the spec records its :func:`direction_id`),
    ``executor``/``address`` (where the questions run: ``"local"``, ``"ray"``; see :func:`run_sweep`).

    The old form ``scale_sweep(handle, concepts, scales, layer=..., n_controls=..., ...)`` still works for one
    release and warns (``DeprecationWarning``)."""
    spec = _legacy_spec(spec, legacy, legacy_fields, sweep="scale")
    if len(spec.layers) != 1:
        raise ValueError(f"scale_sweep measures one layer; the spec has layers {list(spec.layers)} "
                         f"(layer_sweep or run_sweep take several)")
    return _run(handle, spec, ablate, bank=bank, results_dir=results_dir, name=name, batch_size=batch_size,
                progress=progress, executor=executor, address=address)


def layer_sweep(handle: ModelHandle, spec: SweepSpec, /, *legacy, results_dir: str | Path | None = None,
                name: str = "layer_sweep", bank: VectorBank | None = None, batch_size: int | None = None,
                progress: bool = True, ablate: torch.Tensor | None = None,
                executor: str | LocalExecutor | RayExecutor = "local", address: str | None = None,
                **legacy_fields) -> SweepResult:
    """Yes−no logit difference vs injection layer at the one scale of ``spec`` (same questions, vectors and
    execution options as :func:`scale_sweep`; ``strength="relative"``: the scale is a relative strength, read at each
    layer's ‖h‖). The old keyword form (``layer_sweep(handle, concepts, layers, scale=..., ...)``) warns."""
    spec = _legacy_spec(spec, legacy, legacy_fields, sweep="layer")
    if len(spec.scales) != 1:
        raise ValueError(f"layer_sweep measures one scale; the spec has scales {list(spec.scales)} "
                         f"(scale_sweep or run_sweep take several)")
    return _run(handle, spec, ablate, bank=bank, results_dir=results_dir, name=name, batch_size=batch_size,
                progress=progress, executor=executor, address=address)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean delta per (concept, vector kind, layer, scale, question kind), with the control spread (std, n)."""
    keys = ["concept", "vector_kind", "layer", "scale", "question_kind"]
    return df.groupby(keys, as_index=False)["delta"].agg(mean="mean", std="std", n="count")


def control_span(df: pd.DataFrame) -> float | None:
    """The range (max − min, logits) of the control questions' no-injection yes−no in a sweep table (each control's
    ``baseline_logit_diff``); ``None`` with fewer than two controls."""
    controls = df[df["question_kind"] == "control"].groupby("question")["baseline_logit_diff"].first()
    return float(controls.max() - controls.min()) if len(controls) >= 2 else None


BATTERY_COLUMNS = ["model", "question", "about", "expected", "answer_format", "baseline_logit_diff", "p_yes",
                   "answer_mass"]


def control_battery(handle: ModelHandle, *, answer_format: str = "open", questions: Sequence[str] | None = None,
                    frame: str = "paper", answers: tuple | None = None, results_dir: str | Path | None = None,
                    name: str | None = None, batch_size: int | None = None) -> pd.DataFrame:
    """Every control question's no-injection answer on ``handle``: one row per question (:data:`BATTERY_COLUMNS`),
    in :func:`prompts.control_questions` order (default: all 60 balanced ones; or the given ``questions``).

    ``baseline_logit_diff``: yes − no over the answer sets; ``p_yes``: P(yes) within the answer sets
    (``sigmoid(baseline_logit_diff)``); ``answer_mass``: the probability of both sets under the full softmax.
    With ``results_dir`` it is saved as ``<name>.csv`` (default ``control_battery_<answer_format>``) beside its
    ``.meta.json`` (:func:`save_table`: answer set, format, model, versions).
    """
    check_answer_format(answer_format)
    questions = list(control_questions() if questions is None else questions)
    if not questions:
        raise ValueError("no control questions given")
    prompts = [introspection_prompt(handle, q, frame=frame, kind="control", answer_format=answer_format)
               for q in questions]
    readout = measure(handle, [Trial(p) for p in prompts], answers=answers, batch_size=batch_size)
    tags = [question_tags(q) for q in questions]
    diff = readout.baseline.double()
    df = pd.DataFrame({
        "model": handle.name, "question": questions, "about": [t["about"] for t in tags],
        "expected": [t["expected"] for t in tags], "answer_format": answer_format,
        "baseline_logit_diff": diff.numpy(), "p_yes": torch.sigmoid(diff).numpy(),
        "answer_mass": readout.baseline_answer_mass.double().numpy()})[BATTERY_COLUMNS]
    if results_dir is not None:
        save_table(handle, df, results_dir, name or f"control_battery_{answer_format}", questions=questions,
                   frame=frame, answers=answers, answer_format=answer_format)
    return df


def pick_controls(battery: pd.DataFrame, n: int, *, min_span: float = MIN_CONTROL_SPAN) -> list[str]:
    """``n`` controls from a :func:`control_battery` table that span its baseline range and keep the balance.

    How many come from each (about, expected) cell is decided as :func:`prompts.control_questions` deals them
    (round-robin, so both tags stay balanced); within a cell the picks sit at evenly spaced ranks of the cell's
    baselines (one pick: the lowest "no"-expected, the highest "yes"-expected, the middle ambiguous one), so the
    chosen set reaches towards both ends. Returned in dealing order. If the chosen baselines span less than
    ``min_span`` logits a ``UserWarning`` names the span.
    """
    missing = {"question", "about", "expected", "baseline_logit_diff"} - set(battery.columns)
    if missing:
        raise ValueError(f"battery lacks column(s) {sorted(missing)}; build it with sweeps.control_battery")
    if not 1 <= n <= len(battery):
        raise ValueError(f"n={n} controls requested; the battery has {len(battery)}")
    cells = {cell: battery[(battery["about"] == cell[0]) & (battery["expected"] == cell[1])]
             .sort_values("baseline_logit_diff", kind="stable")["question"].tolist() for cell in CONTROL_CELLS}
    counts = dict.fromkeys(CONTROL_CELLS, 0)
    order: list[tuple] = []
    while len(order) < n:
        open_cells = [c for c in CONTROL_CELLS if counts[c] < len(cells[c])]
        if not open_cells:
            raise ValueError(f"n={n}: the battery has only {len(order)} questions in the designed cells "
                             f"(about × expected)")
        for cell in open_cells[: n - len(order)]:
            counts[cell] += 1
            order.append(cell)
    picked: dict[tuple, list[str]] = {}
    for cell, k in counts.items():
        ranked, m = cells[cell], len(cells[cell])
        if k == 1:
            ranks = [{"no": 0, "yes": m - 1}.get(cell[1], (m - 1) // 2)]
        else:
            ranks = [round(i * (m - 1) / (k - 1)) for i in range(k)]
        picked[cell] = [ranked[r] for r in ranks]
    chosen = [picked[cell].pop(0) for cell in order]
    span = battery.set_index("question").loc[chosen, "baseline_logit_diff"]
    width = float(span.max() - span.min())
    if width < min_span:
        warnings.warn(f"the {n} chosen controls' no-injection yes−no spans {width:.2f} logits (< {min_span:g}); "
                      f"the battery's whole range is {float(np.ptp(battery['baseline_logit_diff'])):.2f}",
                      stacklevel=2)
    return chosen
