"""The atlas: every concept measured the same way and given a calibrated verdict — is its "yes" introspection, or a
generic push of the logits that the control questions share?

The statistic (the introspection score I, ranked among the random vectors') lives in
:mod:`introspection_utils.stats.introspection_score`, the classes in :mod:`introspection_utils.stats.verdicts`; this
module runs the sweep the test needs and words the result.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from introspection_utils.core.paths import checkpoint
from introspection_utils.core.results import SweepResult, load_result
from introspection_utils.engine.metadata import save_table
from introspection_utils.engine.planted import HookedRow, planted_answers
from introspection_utils.engine.prompts import (
    ANSWER_FORMATS,
    control_questions,
    default_wordings,
    introspection_prompt,
    question_tags,
)
from introspection_utils.engine.vectors import check_nulls, concept_vectors, default_layer
from introspection_utils.experiments.sweeps import SweepSpec, control_battery, pick_controls, scale_sweep
from introspection_utils.models.embedded import cache_dir
from introspection_utils.stats.definitions import MIN_ANSWER_MASS
from introspection_utils.stats.plasmode import ANSWER_KINDS, Effect
from introspection_utils.stats.verdicts import (
    ALPHA,
    EFFECT_THRESHOLD,
    MIN_RANDOM,
    N_BOOT,
    class_counts,
    describe_verdict,
    verdicts,
)

if TYPE_CHECKING:
    from introspection_utils.engine.executors import LocalExecutor, RayExecutor
    from introspection_utils.engine.vectors import VectorBank
    from introspection_utils.models.handle import ModelHandle


def atlas_name(answer_format: str = "open") -> str:
    """The atlas's name in results and figures: ``atlas`` for the paper's open turn, ``atlas_<format>`` for the
    others (``atlas_binary``, ``atlas_prefill``), so one model's formats sit side by side (``<name>.csv``,
    ``<name>_sweep.csv``, figure ``11_<name>``)."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {list(ANSWER_FORMATS)}, got {answer_format!r}")
    return "atlas" if answer_format == "open" else f"atlas_{answer_format}"


def run_atlas(handle: ModelHandle, concepts: Sequence[str], scales: Sequence[float], *, layer: int | None = None,
              n_controls: int = 12, wordings: Sequence[str] | None = None, n_random: int = 2, seed: int = 0,
              n_boot: int = N_BOOT, alpha: float = ALPHA, effect_threshold: float = EFFECT_THRESHOLD,
              answer_format: str = "open", results_dir: str | Path | None = None, bank: VectorBank | None = None,
              progress: bool = True, nulls: Sequence[str] = ("isotropic",),
              executor: str | LocalExecutor | RayExecutor = "local", address: str | None = None,
              controls: Sequence[str] | str | None = "battery") -> tuple[pd.DataFrame, SweepResult]:
    """Measure every concept's scale sweep at one layer (default: 2/3 of the depth) with every introspection wording
    (``wordings``: default :func:`prompts.default_wordings`, detect and inverted), ``n_controls`` controls balanced by
    topic and expected answer, asked and read in ``answer_format`` (:data:`prompts.ANSWER_FORMATS`), and
    ``n_random`` random vectors per concept (pooled into the layer's null), and give each its verdict.

    ``nulls``: the null kinds of the random vectors (:data:`vectors.NULL_KINDS`; ``n_random`` of each per concept).
    The verdict is tested against the first; the table gains ``p_random_<kind>`` for every kind given
    (:func:`null_p_values`).
    ``controls``: ``"battery"`` (default) — ``n_controls`` picked from the model's own battery so that their
    no-injection answers span its range and the controls' line is identified (:func:`default_controls`, cached per
    model); ``None`` — the first ``n_controls`` of :func:`prompts.control_questions` (as sweeps saved before this
    default were asked); or the questions themselves.

    ``executor``, ``address``: where the sweep's questions run (``"ray"``: over the actors of a Ray cluster; see
    :func:`sweeps.run_sweep`); the verdicts are computed here from the assembled table.

    Returns ``(verdict table, sweep)`` (:func:`verdicts.verdicts` columns); with ``results_dir`` the sweep is saved
    as ``atlas_sweep.csv`` (resumable) and the table as ``atlas.csv``, each beside its ``.meta.json`` — named by
    :func:`atlas_name` (``atlas_binary.csv``, ``atlas_binary_sweep.csv``, … for the other answer formats).
    """
    name = atlas_name(answer_format)
    nulls = check_nulls(nulls)
    layer = default_layer(handle, layer)
    if n_controls < 2:
        raise ValueError(f"n_controls must be >= 2 (one about the model, one about the world), got {n_controls}")
    if len(concepts) * n_random < MIN_RANDOM:
        raise ValueError(f"the random-vector null needs at least {MIN_RANDOM} random vectors at the layer; "
                         f"{len(concepts)} concept(s) × n_random={n_random} give {len(concepts) * n_random}")
    wordings = list(wordings) if wordings is not None else default_wordings()
    if isinstance(controls, str):
        if controls != "battery":
            raise ValueError(f"controls must be 'battery', None or a list of questions, got {controls!r}")
        controls = default_controls(handle, n_controls, answer_format=answer_format)
    sweep = scale_sweep(handle, concepts, scales, layer=layer, n_controls=n_controls, controls=controls,
                        introspection=wordings,
                        n_random=n_random, seed=seed, answer_format=answer_format, results_dir=results_dir,
                        name=f"{name}_sweep", bank=bank, progress=progress, nulls=nulls, executor=executor,
                        address=address)
    table = verdicts(with_null(sweep.df, nulls[0]), alpha=alpha, effect_threshold=effect_threshold, n_boot=n_boot,
                     seed=seed)
    table = table.merge(null_p_values(sweep.df, nulls, seed=seed), on=["concept", "layer"], how="left")
    if results_dir is not None:
        save_table(handle, table, results_dir, name, concepts=list(concepts), scales=list(scales), layer=layer,
                   n_controls=n_controls, wordings=wordings, n_random=n_random, seed=seed, n_boot=n_boot,
                   alpha=alpha, effect_threshold=effect_threshold, answer_format=answer_format, nulls=list(nulls))
    return table, sweep


def default_controls(handle: ModelHandle, n_controls: int, *, answer_format: str = "open") -> list[str]:
    """``n_controls`` controls picked from ``handle``'s own no-injection answers to the whole battery
    (:func:`sweeps.pick_controls` of :func:`sweeps.control_battery`), so that their baselines span the model's range:
    on the embedded small model the first 12 of the list span too little for the controls' line to be fitted. The
    battery's answers are cached per model (revision, dtype, answer format, questions) in the model cache, so a
    second run asks nothing."""
    questions = list(control_questions())
    key = (handle.name, handle.revision, str(handle.dtype), answer_format, questions)
    battery = checkpoint(cache_dir() / "control_batteries", f"battery-{handle.name}", key,
                         lambda: control_battery(handle, answer_format=answer_format, questions=questions))
    return pick_controls(battery, n_controls)


@contextmanager
def planted_effect(handle: ModelHandle, spec: SweepSpec, effect: Effect, *, bank: VectorBank | None = None
                   ) -> Iterator[None]:
    """While open, ``handle``'s forward pass plants ``effect`` (a :class:`plasmode.Effect` of one of
    :data:`plasmode.ANSWER_KINDS`) into every answer to one of ``spec``'s questions injected with one of its concept
    vectors, at the answer position — what :meth:`plasmode.Effect.apply` plants into a sweep's concept rows, now through
    the real model (:func:`engine.planted.planted_answers`); random vectors and uninjected answers are left alone.
    Measure ``spec`` (or the same questions, layer and scales with other random vectors) inside it to check on the
    model the power the plasmode predicts from a plain sweep's numbers. ``spec``: one layer, raw scales."""
    if effect.kind not in ANSWER_KINDS:
        raise ValueError(f"{effect.kind!r} cannot be planted one answer at a time; choose one of "
                         f"{', '.join(ANSWER_KINDS)}")
    if len(spec.layers) != 1 or spec.strength != "raw":
        raise ValueError(f"planted_effect takes a spec with one layer and raw scales (got layers "
                         f"{list(spec.layers)}, strength {spec.strength!r})")
    layer = spec.layers[0]
    bank = bank or concept_vectors(handle, spec.concepts, progress=False)
    questions = spec.questions()
    prompts = [introspection_prompt(handle, q, frame=spec.frame, kind=kind, answer_format=spec.answer_format)
               for kind, q in questions]
    tags = [question_tags(p.question) for p in prompts]
    top = float(max(spec.scales))

    def rule(row: HookedRow) -> float:
        if row.vector is None:
            return row.answer
        tag = tags[row.prompt]
        return float(effect.answer(row.answer, scale=row.scale, polarity=tag["polarity"],
                                   about_self=tag["about"] == "self", top_scale=top))
    with planted_answers(handle, layer, prompts, [bank.get(c, layer) for c in spec.concepts], rule,
                         answers=spec.answers):
        yield


def recompute(results_dir: str | Path, answer_format: str = "open", *, n_boot: int | None = None) -> Path:
    """Recompute an atlas's verdict table from its saved sweep, without the model: reads ``<name>_sweep.csv`` in
    ``results_dir`` (:func:`atlas_name`), computes the verdicts exactly as :func:`run_atlas` does (the first null
    kind's random vectors; ``p_random_<kind>`` for every kind) with the seed, α, threshold and ``n_boot`` (unless
    given) of the saved table's spec, and writes ``<name>.csv`` beside a ``.meta.json`` that is the saved table's
    (or the sweep's) with ``recomputed_from`` naming the sweep — how a change of statistic reaches committed results
    without re-measuring.
    Returns the CSV path."""
    folder, name = Path(results_dir), atlas_name(answer_format)
    sweep = load_result(folder / f"{name}_sweep.csv")
    old = folder / f"{name}.meta.json"
    meta = load_result(folder / f"{name}.csv").meta if old.is_file() else dict(sweep.meta)
    spec = meta.get("spec", {})
    nulls = check_nulls(spec.get("nulls") or sweep.meta.get("spec", {}).get("nulls") or ("isotropic",))
    seed = int(spec.get("seed", 0))
    table = verdicts(with_null(sweep.df, nulls[0]), alpha=float(spec.get("alpha", ALPHA)),
                     effect_threshold=float(spec.get("effect_threshold", EFFECT_THRESHOLD)),
                     n_boot=int(n_boot if n_boot is not None else spec.get("n_boot", N_BOOT)), seed=seed)
    table = table.merge(null_p_values(sweep.df, nulls, seed=seed), on=["concept", "layer"], how="left")
    return SweepResult(table, {**meta, "recomputed_from": f"{name}_sweep.csv",
                               "statistic": "null-learned I (stats.introspection_score)"}).save(folder / name)


def null_kinds(df: pd.DataFrame) -> pd.Series:
    """Each row's null kind: the ``null_kind`` column, "isotropic" for random rows of a table without one (the
    only kind there was), "" for concept rows."""
    if "null_kind" in df:
        kinds = df["null_kind"].fillna("").astype(str)
        return kinds.where((kinds != "") | (df["vector_kind"] != "random"), "isotropic")
    return pd.Series(["isotropic" if k == "random" else "" for k in df["vector_kind"]], index=df.index)


def with_null(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The sweep table with only the random vectors of null ``kind`` (concept rows kept): what the random-vector
    test of :func:`verdicts.verdicts` sees when it is tested against that null."""
    check_nulls([kind])
    kinds = null_kinds(df)
    keep = (df["vector_kind"] != "random") | (kinds == kind)
    if not (keep & (df["vector_kind"] == "random")).any():
        raise ValueError(f"the table has no random vectors of null kind {kind!r} (it has "
                         f"{sorted(set(kinds[df['vector_kind'] == 'random']))})")
    return df[keep]


def null_p_values(df: pd.DataFrame, nulls: Sequence[str], *, seed: int = 0) -> pd.DataFrame:
    """The random-vector p-value of every concept under each null kind: ``concept, layer, p_random_<kind>`` (kind
    with "-" as "_"), each from :func:`verdicts.verdicts` on the table restricted to that kind's random vectors."""
    out = None
    for kind in check_nulls(nulls):
        column = f"p_random_{kind.replace('-', '_')}"
        table = verdicts(with_null(df, kind), seed=seed, n_boot=1, mde=False)[["concept", "layer", "p_random"]]
        table = table.rename(columns={"p_random": column})
        out = table if out is None else out.merge(table, on=["concept", "layer"], how="outer")
    return out


def summary(table: pd.DataFrame, df: pd.DataFrame, *, alpha: float = ALPHA) -> str:
    """Sentences computed from a verdict table and its sweep: the class counts, each introspection-specific concept
    (and each injection detector) in :func:`verdicts.describe_verdict`'s brief words (or the concept with the
    smallest q-value when none is), what the atlas could have found (its MDE), whether the concepts as a group are
    beyond their nulls, and how many readings sit at a low answer mass."""
    counts = class_counts(table)
    parts = [f"{len(table)} concepts at layer {', '.join(map(str, sorted(table['layer'].unique())))}: "
             + ", ".join(f"{n} {c}" for c, n in counts.items()) + f" (α = {alpha:g}, Benjamini–Hochberg)."]
    named = table[table["class"].isin(["introspection-specific", "injection detector"])]
    parts += [f"'{row['concept']}' is {describe_verdict(row, alpha=alpha, brief=True)}."
              for _, row in named.iterrows()]
    if (table["class"] != "introspection-specific").all():
        best = table.iloc[0]
        parts.append(f"None is introspection-specific; the smallest q-value is '{best['concept']}': "
                     f"{describe_verdict(best, alpha=alpha, brief=True)}.")
    if table["q_value"].isna().all():
        parts.append(f"No test was run: the layer has {int(table['n_random'].max())} random vectors (the test needs "
                     f"≥ {MIN_RANDOM}).")
    else:
        first = table.iloc[0]
        pop = first["population_p"]
        parts.append(f"As a group the concepts are {'' if pop <= alpha else 'not '}beyond their random vectors "
                     f"(one-sided rank test p = {pop:.2g}); the random vectors' own response beyond the controls is "
                     f"I = {first['generic']:+.2f}.")
        mde = first["mde"]
        parts.append(f"This atlas would call a wording effect of I = {mde:.2f} logits for 80% of its concepts (its "
                     f"MDE, on its own noise)." if not pd.isna(mde) else
                     f"No wording effect up to the largest tried is called for 80% of its concepts: with "
                     f"{int(first['n_random'])} random vectors no p-value goes below {first['min_p']:.2g}.")
    low = int(table["low_mass"].sum())
    if low:
        parts.append(f"{low} of {len(table)} concepts are read where the introspection answer mass P(yes)+P(no) is "
                     f"below {MIN_ANSWER_MASS} at the largest scale (median {table['answer_mass'].median():.2f}): "
                     f"there 'yes over no' is not the model's answer.")
    return " ".join(parts)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Recompute saved atlases' verdict tables from their sweeps "
                                                 "(no model needed).")
    parser.add_argument("results_dir", help="e.g. figures/qwen2.5-coder-1.5b-instruct/results")
    parser.add_argument("--formats", nargs="*", default=list(ANSWER_FORMATS))
    args = parser.parse_args()
    for answer_format in args.formats:
        if (Path(args.results_dir) / f"{atlas_name(answer_format)}_sweep.csv").is_file():
            print(recompute(args.results_dir, answer_format))
