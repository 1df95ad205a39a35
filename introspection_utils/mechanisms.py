"""Where is the introspection-specific "yes" made? One concept's attribution and patching maps in one call.

Composes :mod:`attribution` (which components write the yes−no difference, and the difference-in-differences:
introspection effect − control effect) and :mod:`patching` (which components carry it causally, real and
attribution patching, and how well the fast estimate agrees) for notebook 12 and its figure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from introspection_utils.attribution import attribution_cells, did_by_layer, difference_in_differences, totals
from introspection_utils.patching import (
    activation_patching,
    agreement,
    attribution_patching,
    concept_trials,
    default_sites,
    introspection_specific,
)
from introspection_utils.vectors import concept_vectors

if TYPE_CHECKING:
    from introspection_utils.models import ModelHandle


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
        over the controls (see :func:`introspection_utils.patching.introspection_specific`)."""
        if kind == "patched":
            return introspection_specific(self.patched, "effect")
        return introspection_specific(self.estimated, "estimate")


def mechanism_maps(handle: ModelHandle, concept: str, scale: float, *, layer: int, n_controls: int = 2,
                   patch_heads: bool = False, cap: float | None = None) -> MechanismMaps:
    """The attribution and patching maps of ``concept`` injected at ``layer`` with ``scale ×`` its raw vector, on
    the introspection question and ``n_controls`` control questions.

    Real patching covers every attention and MLP output above the injection layer (and every head there if
    ``patch_heads``: ~n_heads× slower); attribution patching always covers all of them and the heads.
    """
    handle.check_layer(layer)
    vector = concept_vectors(handle, [concept], progress=False).get(concept, layer)
    cells = attribution_cells(handle, vector, scale, n_controls=n_controls)
    model_diff = totals(cells, cap if cap is not None else handle.arch.final_logit_softcap)
    meta = cells[["trial", "question_kind", "injected"]].drop_duplicates()
    whole = difference_in_differences(model_diff.merge(meta, on="trial").assign(component="model"),
                                      by=["component"])
    trials = concept_trials(handle, vector, scale, n_controls=n_controls)
    sites = default_sites(handle, layer, heads=patch_heads)
    patched = activation_patching(handle, trials, sites)
    estimated = attribution_patching(handle, trials, default_sites(handle, layer, heads=True))
    return MechanismMaps(handle.name, concept, layer, float(scale), n_controls, cells, did_by_layer(cells),
                         difference_in_differences(cells[cells["component"] == "head"]), float(whole["did"].iloc[0]),
                         patched, estimated, agreement(patched, estimated))


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
