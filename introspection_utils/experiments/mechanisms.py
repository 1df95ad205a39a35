"""Where the introspection-specific "yes" is made: one concept's attribution and patching maps in one call, and their
readings (notebooks 05 and 12)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from introspection_utils.core.deprecation import renamed
from introspection_utils.core.paths import checkpoint
from introspection_utils.engine.metadata import save_table
from introspection_utils.engine.vectors import concept_vectors
from introspection_utils.experiments.attribution import (
    attribution_cells,
    did_by_layer,
    difference_in_differences,
    totals,
)
from introspection_utils.experiments.patching import (
    activation_patching,
    attribution_agreement,
    attribution_patching,
    concept_trials,
    default_sites,
    introspection_specific,
    specific_shift,
)

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle


@dataclass
class MechanismMaps:
    """One concept's maps at one layer and scale.

    ``attribution``: the direct-logit-attribution table of the four cells; ``did_layers`` / ``did_heads``: its
    difference-in-differences per layer and per head; ``shift``: the model's own yes−no difference-in-differences
    (introspection effect − control effect, softcap included); ``patched`` / ``estimated``: activation and
    attribution patching at the answer position; ``agreement``: their Pearson / Spearman correlation over the
    components both cover.
    """

    model: str
    concept: str
    layer: int
    scale: float
    n_controls: int
    attribution: pd.DataFrame
    did_layers: pd.DataFrame
    did_heads: pd.DataFrame
    shift: float
    patched: pd.DataFrame
    estimated: pd.DataFrame
    agreement: dict

    def specific_patching(self, kind: str = "patched") -> pd.DataFrame:
        """Per direction and site, the patching effect (or estimate) on the introspection question minus its mean
        over the controls (see :func:`introspection_utils.experiments.patching.introspection_specific`)."""
        if kind == "patched":
            return introspection_specific(self.patched, "effect")
        return introspection_specific(self.estimated, "estimate")


def mechanism_maps(handle: ModelHandle, concept: str, scale: float, *, layer: int, n_controls: int = 2,
                   patch_heads: bool = False, cap: float | None = None,
                   checkpoints: str | Path | None = None) -> MechanismMaps:
    """The attribution and patching maps of ``concept`` injected at ``layer`` with ``scale ×`` its raw vector, on
    the introspection question and ``n_controls`` control questions.

    Real patching covers every attention and MLP output above the injection layer (and every head there if
    ``patch_heads``: ~n_heads× slower); attribution patching always covers all of them and the heads.
    ``checkpoints``: a results folder where each of the three passes (attribution, real patching, attribution
    patching) is kept as it finishes (:func:`paths.checkpoint`), so an interrupted run resumes from the last one.
    """
    handle.check_layer(layer)
    vector = concept_vectors(handle, [concept], progress=False).get(concept, layer)
    key = {"model": handle.name, "revision": handle.revision, "dtype": str(handle.dtype), "concept": concept,
           "scale": float(scale), "layer": layer, "n_controls": n_controls, "patch_heads": patch_heads,
           "vector": hashlib.sha256(vector.vector.float().numpy().tobytes()).hexdigest()[:16]}
    cells = checkpoint(checkpoints, "mechanisms-attribution", key,
                       lambda: attribution_cells(handle, vector, scale, n_controls=n_controls))
    model_diff = totals(cells, cap if cap is not None else handle.arch.final_logit_softcap)
    meta = cells[["trial", "question_kind", "injected"]].drop_duplicates()
    whole = difference_in_differences(model_diff.merge(meta, on="trial").assign(component="model"),
                                      by=["component"])
    trials = concept_trials(handle, vector, scale, n_controls=n_controls)
    sites = default_sites(handle, layer, heads=patch_heads)
    patched = checkpoint(checkpoints, "mechanisms-patching", key, lambda: activation_patching(handle, trials, sites))
    estimated = checkpoint(checkpoints, "mechanisms-attribution-patching", key, lambda: attribution_patching(
        handle, trials, default_sites(handle, layer, heads=True)))
    return _assemble(handle.name, concept, layer, float(scale), n_controls, cells, float(whole["did"].iloc[0]),
                     patched, estimated)


def _assemble(model: str, concept: str, layer: int, scale: float, n_controls: int, cells: pd.DataFrame,
              shift: float, patched: pd.DataFrame, estimated: pd.DataFrame) -> MechanismMaps:
    return MechanismMaps(model, concept, layer, scale, n_controls, cells, did_by_layer(cells),
                         difference_in_differences(cells[cells["component"] == "head"]), shift, patched, estimated,
                         attribution_agreement(patched, estimated))


def load_maps(folder: Path) -> list[MechanismMaps]:
    """The maps of every concept :func:`save_tables` wrote into ``folder`` (e.g. a findings run's ``results/``),
    rebuilt from the tables alone: the readings of :func:`describe` and :func:`contrast` come out the same."""
    folder = Path(folder)
    maps = []
    for row in pd.read_csv(folder / "mechanisms_agreement.csv").itertuples():
        cells, patched, estimated = (pd.read_csv(folder / f"mechanisms_{name}_{row.concept}.csv") for name in
                                     ("attribution", "patching", "attribution_patching"))
        maps.append(_assemble(row.model, row.concept, int(row.layer), float(row.scale), int(row.n_controls), cells,
                              float(row.shift), patched, estimated))
    return maps


def describe(maps: MechanismMaps, top: int = 3) -> str:
    """A reading computed from the numbers: the introspection-specific shift, the components that write most of it
    (attribution) and carry most of it (patching), and the attribution-patching agreement."""
    layers = maps.did_layers[maps.did_layers["comp_layer"] >= 0]
    components = difference_in_differences(maps.attribution[~maps.attribution["component"].isin(["head"])])
    components = components[components["component"].isin(["attn", "mlp", "injection"])].head(top)
    named = ", ".join(f"L{int(r.comp_layer)} {r.component} ({r.did:+.2f})" for r in components.itertuples())
    heads = ", ".join(f"L{int(r.comp_layer)}H{int(r.head)} ({r.did:+.2f})" for r in maps.did_heads.head(top)
                      .itertuples())
    total = float(layers["did"].sum() + maps.did_layers[maps.did_layers["comp_layer"] < 0]["did"].sum())
    necessity = maps.specific_patching().query("direction == 'necessity'").head(1)
    carried = (f"; patching: removing the injection's change from {necessity['site'].iloc[0]} alone moves the "
               f"introspection answer {necessity['specific'].iloc[0]:+.2f} logits more than the controls'"
               if len(necessity) else "")
    a = maps.agreement
    return (f"{maps.concept} (layer {maps.layer}, scale {maps.scale:g}): the injection moves the introspection "
            f"answer {maps.shift:+.2f} logits more than the control mean (yes − no, after the softcap if any; "
            f"{total:+.2f} in raw logits, summed over the components). Largest component shares of that "
            f"difference: {named}; heads: {heads}{carried}. Attribution patching vs real patching over "
            f"{a['n']} components: Pearson r = {a['pearson']:.2f}, Spearman ρ = {a['spearman']:.2f}.")


def contrast(maps: Sequence[MechanismMaps]) -> str:
    """Which concept's introspection shift separates from the controls' most, and which is closest to a shared
    shift (the smallest |difference-in-differences|), from the numbers."""
    ranked = sorted(maps, key=lambda m: m.shift, reverse=True)
    best, shared = ranked[0], min(maps, key=lambda m: abs(m.shift))
    if len(maps) < 2:
        return f"One concept only: {best.concept}'s introspection-specific shift is {best.shift:+.2f} logits."
    toward = "towards yes" if best.shift > 0 else "and even that is away from yes (no concept separates here)"
    return (f"Most separated towards yes on the introspection question: {best.concept} ({best.shift:+.2f} logits "
            f"beyond the controls' shift, {toward}); closest to a shared shift: {shared.concept} "
            f"({shared.shift:+.2f}). Compare their rows: components red in one map and not the other are the "
            f"candidates for what makes the separation.")


def top_heads(maps: MechanismMaps, k: int = 2) -> list[tuple[int, int]]:
    """The ``k`` heads with the largest |difference-in-differences| of direct logit attribution."""
    return [(int(r.comp_layer), int(r.head)) for r in maps.did_heads.head(k).itertuples()]


def describe_head_ablation(table: pd.DataFrame) -> str:
    """A reading of :func:`introspection_utils.experiments.patching.head_ablation`: does the introspection-specific
    shift
    survive without the heads?"""
    shifts = specific_shift(table).set_index("ablation")["specific"]
    first = table.iloc[0]
    heads = table.loc[table["ablation"] != "none", "heads"].iloc[0]  # "none" rows name no heads (NaN once saved)
    intact = float(shifts.get("none", float("nan")))
    parts = [f"{mode}-ablated {float(v):+.2f} ({_kept(float(v), intact)})" for mode, v in shifts.items()
             if mode != "none"]
    return (f"{first['concept']} at scale {first['scale']:g}, layer {first['layer']}: the introspection-specific "
            f"shift (introspection shift − control mean shift, each from its own uninjected baseline under the "
            f"same ablation) is {intact:+.2f} logits with every head intact, and with {heads} " + ", ".join(parts)
            + ".")


def _kept(value: float, intact: float) -> str:
    if not np.isfinite(intact) or abs(intact) < 0.05:
        return "the intact shift is too small (< 0.05 logits) for a ratio to mean anything"
    return f"{100 * value / intact:.0f}% of the intact shift"


def save_tables(handle: ModelHandle, maps: Sequence[MechanismMaps], folder: Path) -> list[Path]:
    """Write each concept's attribution, patching and attribution-patching tables and one agreement table
    (``mechanisms_agreement.csv``, :func:`agreement_table`) into ``folder``, each beside its metadata
    (:func:`introspection_utils.engine.metadata.save_table`); :func:`load_maps` reads them back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for m in maps:
        spec = {"concept": m.concept, "layer": m.layer, "scale": m.scale, "n_controls": m.n_controls}
        for name, table in (("attribution", m.attribution), ("patching", m.patched),
                            ("attribution_patching", m.estimated)):
            written.append(save_table(handle, table, folder, f"mechanisms_{name}_{m.concept}", **spec))
    spec = {"concepts": [m.concept for m in maps], "n_controls": max(m.n_controls for m in maps)}
    return [*written, save_table(handle, agreement_table(maps), folder, "mechanisms_agreement", **spec)]


def agreement_table(maps: Sequence[MechanismMaps]) -> pd.DataFrame:
    """Attribution patching vs real patching per concept: model, concept, layer, scale, n_controls, shift (the
    model's own difference-in-differences), pearson, spearman, n (components both cover)."""
    return pd.DataFrame([{"model": m.model, "concept": m.concept, "layer": m.layer, "scale": m.scale,
                          "n_controls": m.n_controls, "shift": m.shift, **m.agreement} for m in maps])


def most_separated(maps: Sequence[MechanismMaps]) -> MechanismMaps:
    """The concept whose introspection shift goes furthest towards yes beyond the controls' (largest DiD)."""
    return max(maps, key=lambda m: m.shift)


# the old name, one release
__getattr__ = renamed(__name__, globals(), {"describe_ablation": "describe_head_ablation"})
