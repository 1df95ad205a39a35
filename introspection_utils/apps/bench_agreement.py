"""Does the atlas read the same in bfloat16? The atlas of the findings run, on a subset of its concepts, computed
end to end in float32 and in bfloat16 (concept vectors, their random vectors, the sweep, the verdicts), compared.

    python -m introspection_utils.bench --agreement [--concepts 10] [--model NAME] --readme docs/benchmark.md

The settings are the findings file's ``["11"]`` table (layer, scales, controls, wordings, random vectors per concept;
``data/findings/qwen2.5-coder-1.5b-instruct.toml``), the concepts the first ``--concepts`` of its atlas variants'
list (the write-up's seven and the paper's first three), then the rest of ``["11"]``'s. Each dtype's model is loaded
alone (one model in memory at a time) and its concept vectors are extracted afresh (no cache), so each dtype's wall
time is its whole atlas; the control questions are picked once, from the float32 model's battery (the atlas's
default), and asked in both. Reported: class agreement (how many concepts get the same class), max and median |ΔI| (the
introspection residual, logits), the per-trial yes − no difference and sign agreement, each dtype's wall time;
``--readme FILE`` writes it into FILE's ``<!-- agreement:start -->`` block.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from introspection_utils.core.data import tomllib
from introspection_utils.core.paths import project_root, replace_block
from introspection_utils.engine.prompts import select_wordings
from introspection_utils.engine.throughput import load_average, load_words, measured_line
from introspection_utils.engine.vectors import concept_vectors, default_layer
from introspection_utils.experiments.atlas import default_controls, run_atlas
from introspection_utils.models.handle import DEFAULT_MODEL, load_model

FINDINGS = "data/findings/qwen2.5-coder-1.5b-instruct.toml"
MODEL = "qwen2.5-coder-1.5b-instruct"
N_CONCEPTS = 10
DTYPES = ("float32", "bfloat16")


def atlas_settings(findings: str | Path = FINDINGS, n_concepts: int = N_CONCEPTS) -> dict:
    """The atlas's settings from the findings file's ``["11"]`` table, with the first ``n_concepts`` concepts of its
    variants' list (``["11.binary"]``) followed by the rest of ``["11"]``'s."""
    path = Path(findings)
    path = path if path.is_absolute() else project_root() / path
    config = tomllib.loads(path.read_text(encoding="utf-8"))
    atlas = dict(config.get("11", {}))
    if not atlas.get("concepts"):
        raise ValueError(f"{path} has no [\"11\"] table with concepts")
    first = list(config.get("11.binary", {}).get("concepts", []))
    ordered = first + [c for c in atlas["concepts"] if c not in first]
    if not 1 <= n_concepts <= len(ordered):
        raise ValueError(f"--concepts {n_concepts}: choose 1..{len(ordered)} (the atlas's concepts in {path.name})")
    return {"concepts": ordered[:n_concepts], "scales": list(atlas["scales"]), "layer": atlas.get("layer"),
            "n_controls": int(atlas["n_controls"]), "n_random": int(atlas["n_random"]),
            "wordings": atlas.get("wordings", "default"), "source": path.name}


def atlas_in(model: str, dtype: str, settings: dict, *, device: str | None = None,
             controls: list[str] | None = None) -> dict:
    """The atlas of ``settings`` on ``model`` loaded in ``dtype``: its verdict table, sweep table, control questions
    and wall times (``vectors_s``: the concept vectors, extracted without the cache; ``atlas_s``: sweep and
    verdicts). ``controls``: the questions to ask (default: the atlas's own pick from this model's battery,
    :func:`~introspection_utils.experiments.atlas.default_controls`, not timed)."""
    handle = load_model(model, dtype=dtype, device=device)
    layer = default_layer(handle, settings["layer"])
    controls = list(controls) if controls is not None else default_controls(handle, settings["n_controls"])
    start = time.perf_counter()
    bank = concept_vectors(handle, settings["concepts"], cache=False, progress=False)
    vectors_s = time.perf_counter() - start
    start = time.perf_counter()
    table, sweep = run_atlas(handle, settings["concepts"], settings["scales"], layer=layer,
                             n_controls=settings["n_controls"], wordings=select_wordings(settings["wordings"]),
                             n_random=settings["n_random"], bank=bank, progress=False, controls=controls)
    atlas_s = time.perf_counter() - start
    result = {"dtype": dtype, "model": handle.name, "layer": layer, "device": handle.device, "table": table,
              "controls": controls,
              "sweep": sweep.df, "vectors_s": vectors_s, "atlas_s": atlas_s}
    del handle, bank
    gc.collect()
    return result


def dtype_agreement(a: dict, b: dict) -> dict:
    """Two atlases of the same settings compared: concepts with the same class, |ΔI| max and median, the concepts
    whose class differs (``(concept, class in a, class in b)``), and on the sweeps' trials (same order in both)
    |Δ yes − no| max and median and how many have the same sign."""
    merged = a["table"][["concept", "class", "I"]].merge(b["table"][["concept", "class", "I"]], on="concept",
                                                         suffixes=("_a", "_b"))
    if len(merged) != len(a["table"]) or len(merged) != len(b["table"]):
        raise ValueError("the two atlases do not hold the same concepts")
    same = merged["class_a"] == merged["class_b"]
    delta_i = (merged["I_a"] - merged["I_b"]).abs()
    keys = ["concept", "vector_kind", "vector_seed", "scale", "question"]
    trials = a["sweep"][keys + ["logit_diff"]].merge(b["sweep"][keys + ["logit_diff"]], on=keys,
                                                     suffixes=("_a", "_b"))
    if len(trials) != len(a["sweep"]) or len(trials) != len(b["sweep"]):
        raise ValueError("the two atlases' sweeps do not hold the same trials")
    diff = (trials["logit_diff_a"] - trials["logit_diff_b"]).abs()
    return {"n": len(merged), "same_class": int(same.sum()), "max_dI": float(delta_i.max()),
            "median_dI": float(delta_i.median()),
            "differ": [(r.concept, r.class_a, r.class_b) for r in merged[~same].itertuples()],
            "n_trials": len(trials), "max_diff": float(diff.max()), "median_diff": float(diff.median()),
            "same_sign": int(((trials["logit_diff_a"] > 0) == (trials["logit_diff_b"] > 0)).sum())}


def agreement_block(settings: dict, runs: dict[str, dict], result: dict, line: str) -> str:
    """The ``agreement`` block of ``docs/benchmark.md``: one row per dtype (trials, wall times, the class counts),
    the agreement in words, the settings, and ``line``
    (:func:`~introspection_utils.engine.throughput.measured_line`)."""
    first = next(iter(runs.values()))
    lines = [f"| {first['model']}, atlas at layer {first['layer']}, {result['n']} concepts | trials | concept "
             f"vectors | sweep + verdicts | trials/s | classes |", "|---|---|---|---|---|---|"]
    for dtype, run in runs.items():
        counts = run["table"]["class"].value_counts()
        classes = ", ".join(f"{n} {c}" for c, n in counts.items())
        lines.append(f"| **{dtype}** | {len(run['sweep'])} | {run['vectors_s']:.0f} s | {run['atlas_s']:.0f} s | "
                     f"{len(run['sweep']) / run['atlas_s']:.1f} | {classes} |")
    speed = runs["float32"]["atlas_s"] / runs["bfloat16"]["atlas_s"]
    differ = "; ".join(f"{c}: {x} in float32, {y} in bfloat16" for c, x, y in result["differ"])
    lines += ["", f"**Classes agree on {result['same_class']}/{result['n']} concepts "
                  f"({result['same_class'] / result['n']:.0%})**" + (f" (differ: {differ})" if differ else "")
              + f"; |ΔI| max {result['max_dI']:.3f}, median {result['median_dI']:.3f} logits; per trial |Δ yes − no| "
                f"max {result['max_diff']:.3f}, median {result['median_diff']:.3f}, same sign on "
                f"{result['same_sign']}/{result['n_trials']}; the bf16 atlas (sweep + verdicts) ran {speed:.2f}× "
                f"the float32 one. Settings from {settings['source']} [\"11\"]: concepts "
                f"{', '.join(settings['concepts'])}; scales {settings['scales']}; {settings['n_controls']} controls; "
                f"wordings {settings['wordings']!r}; {settings['n_random']} random vectors per concept; seed 0; "
                f"each dtype end to end (its own concept vectors and random vectors), the same control questions "
                f"(picked from the {next(iter(runs))} model's battery).", line]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    """``python -m introspection_utils.bench --agreement`` (its arguments: ``--model``, ``--concepts``, ``--device``,
    ``--readme``, ``--block``)."""
    model = MODEL if args.model == DEFAULT_MODEL else args.model
    settings = atlas_settings(n_concepts=args.concepts or N_CONCEPTS)
    load = load_average()
    runs = {}
    for dtype in DTYPES:  # the controls picked once (by the first dtype's model), the same questions for both
        runs[dtype] = atlas_in(model, dtype, settings, device=args.device,
                               controls=next(iter(runs.values()))["controls"] if runs else None)
        run = runs[dtype]
        print(f"[{dtype}] {len(run['sweep'])} trials: vectors {run['vectors_s']:.1f} s, sweep + verdicts "
              f"{run['atlas_s']:.1f} s; classes {run['table']['class'].value_counts().to_dict()}", flush=True)
    result = dtype_agreement(runs["float32"], runs["bfloat16"])
    end = load_average()
    print(f"classes agree on {result['same_class']}/{result['n']}; |dI| max {result['max_dI']:.3f}, median "
          f"{result['median_dI']:.3f}; differ: {result['differ']}")
    print(load_words(load, end))
    if args.readme:
        command = ("python -m introspection_utils.bench --agreement"
                   + (f" --model {model}" if model != MODEL else "")
                   + (f" --concepts {args.concepts}" if args.concepts else "")
                   + (f" --device {args.device}" if args.device else "")
                   + (f" --block {args.block}" if args.block not in (None, "agreement") else "")
                   + " --readme docs/benchmark.md")
        line = measured_line(runs["float32"]["device"], load_start=load, load_end=end, command=command)
        replace_block(Path(args.readme), args.block or "agreement", agreement_block(settings, runs, result, line))
        print(f"written into {args.readme}")

