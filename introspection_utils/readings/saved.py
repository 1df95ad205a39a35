"""Each notebook's sentences recomputed from the tables it saved (``<notebook>_sentences(results) -> list[str]``,
empty when the tables are absent); the registry's entries point at them and ``apps/findings.py`` writes them out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from introspection_utils.core.results import load_result
from introspection_utils.experiments import grading, localization, mechanisms, refusal, sae
from introspection_utils.experiments.organisms import evaluation as organisms_evaluation
from introspection_utils.experiments.tasks import congruence, forced_choice, strength
from introspection_utils.readings import sentences as readings


def _concepts(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df.loc[df["vector_kind"] == "concept", "concept"]))


def _sweep_readings(results: Path, name: str, describe: Callable[[pd.DataFrame, str], str]) -> list[str]:
    if not (results / f"{name}.csv").is_file():
        return []
    df = load_result(results / f"{name}.csv").df
    return [describe(df, c) for c in _concepts(df)]


def scale_sweep_sentences(results: Path) -> list[str]:
    """Notebook 02: each concept's scale-sweep reading (``scale_sweep``)."""
    return _sweep_readings(results, "scale_sweep", readings.describe_scale_sweep)


def layer_sweep_sentences(results: Path) -> list[str]:
    """Notebook 03: each concept's layer-sweep reading (``layer_sweep``)."""
    return _sweep_readings(results, "layer_sweep", readings.describe_layer_sweep)


def logit_lens_sentences(results: Path) -> list[str]:
    """Notebook 04: each concept's logit-lens reading (``logit_lens``)."""
    return _sweep_readings(results, "logit_lens", readings.describe_lens)


def attention_sentences(results: Path) -> list[str]:
    """Notebook 05: the top heads (``attention_top_heads``) and their ablation (``attention_head_ablation``)."""
    texts = []
    if (results / "attention_top_heads.csv").is_file():
        top = pd.read_csv(results / "attention_top_heads.csv")
        text = readings.describe_top_heads(top.head(3))
        texts.append(text[0].upper() + text[1:])
    if (results / "attention_head_ablation.csv").is_file():
        texts.append(mechanisms.describe_head_ablation(pd.read_csv(results / "attention_head_ablation.csv")))
    return texts


def interference_sentences(results: Path) -> list[str]:
    """Notebook 06: bomb below baseline (layer and scale sweeps), confusion's co-movement."""
    texts = []
    if (results / "interference_layer_sweep.csv").is_file():
        texts.append(readings.describe_below_baseline(load_result(results / "interference_layer_sweep.csv").df,
                                                      "Bomb", x="layer"))
    if (results / "interference_scale_sweep.csv").is_file():
        df = load_result(results / "interference_scale_sweep.csv").df
        texts += [readings.describe_below_baseline(df, "Bomb"), readings.describe_comovement(df, "Confusion")]
    return texts


def grading_sentences(results: Path) -> list[str]:
    """Notebook 07: the graded answers' rates (``graded_responses``)."""
    path = results / "graded_responses.csv"
    return [grading.describe_grading(pd.read_csv(path))] if path.is_file() else []


def refusal_ablation_sentences(results: Path) -> list[str]:
    """Notebook 08: the refusal direction, each concept's sweep with and without its ablation, the ablation points."""
    texts = []
    if (results / "refusal_direction_scores.csv").is_file():
        texts.append(refusal.describe_direction(pd.read_csv(results / "refusal_direction_scores.csv")))
    if (results / "refusal_sweep.csv").is_file() and (results / "refusal_sweep_ablated.csv").is_file():
        plain, ablated = (load_result(results / f"{n}.csv").df for n in ("refusal_sweep", "refusal_sweep_ablated"))
        texts += [readings.describe_refusal_ablation(plain, ablated, c,
                                                     from_scale=readings.choose_switch_scale(plain, c)[0])
                  for c in _concepts(plain)]
    if (results / "refusal_ablation_points.csv").is_file():
        points = pd.read_csv(results / "refusal_ablation_points.csv")
        texts += [refusal.describe_ablation_points(points, c) for c in dict.fromkeys(points["concept"])]
    return texts


def sae_sentences(results: Path) -> list[str]:
    """Notebook 09: the SAEs' quality and each concept's features (``sae_features``, ``sae_yes_features``)."""
    if not ((results / "sae_features.csv").is_file() and (results / "sae_yes_features.csv").is_file()):
        return []
    table, yes = pd.read_csv(results / "sae_features.csv"), pd.read_csv(results / "sae_yes_features.csv")
    quality = ([sae.describe_quality(pd.read_csv(results / "sae_quality.csv"))]
               if (results / "sae_quality.csv").is_file() else [])
    return quality + [sae.describe_sae_features(table, yes, c) for c in _concepts(table)]


def localization_sentences(results: Path) -> list[str]:
    """Notebook 10: the localization reading (``localization``)."""
    path = results / "localization.csv"
    return [localization.reading(load_result(path))] if path.is_file() else []


def task_sentences(results: Path) -> list[str]:
    """Notebook 13: each task's reading from its saved table (forced choice, congruence, strength, localization)."""
    out = []
    for name, summarise, describe in (("forced_choice", forced_choice.forced_choice_summary,
                                       forced_choice.describe_forced_choice),
                                      ("congruence", congruence.congruence_summary, congruence.describe_congruence),
                                      ("strength_comparison", strength.strength_summary, strength.describe_strength)):
        if (results / f"{name}.csv").is_file():
            out.append(describe(summarise(load_result(results / name).df)))
    if (results / "localization_13.csv").is_file():
        out.append(localization.reading(load_result(results / "localization_13")))
    return out


def mechanism_sentences(results: Path) -> list[str]:
    """Notebook 12: each concept's attribution and patching reading and their contrast (``mechanisms_*``)."""
    if not (results / "mechanisms_agreement.csv").is_file():
        return []
    maps = mechanisms.load_maps(results)
    return [mechanisms.describe(m) for m in maps] + [mechanisms.contrast(maps)]


def organism_sentences(results: Path) -> list[str]:
    """Notebook 14: the organisms' reading (``organisms``), each model's target and rule included."""
    path = results / "organisms.csv"
    return [organisms_evaluation.describe_organisms(load_result(path).df)] if path.is_file() else []
