"""Attention from a prefilled answer token to the injected positions, per layer and head (notebook 05): the trials
for :func:`measure` and the maps it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from introspection_utils.engine.measure import Trial, measure
from introspection_utils.engine.prompts import answer_token_id, control_questions, introspection_prompt
from introspection_utils.engine.vectors import VectorBank, concept_vectors

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

__all__ = ["CONTROL_INJ", "INTRO_INJ", "INTRO_NOINJ", "AttentionMaps", "attention_maps"]


@dataclass
class AttentionMaps:
    """Layer × head attention maps ``[n_layers, n_heads]`` (from the answer token to the injected positions) for
    named conditions, with how they were made. ``stat``: "sum" or "max" over the injected positions."""

    model: str
    concept: str
    layer: int
    scale: float
    prefill: str
    stat: str
    maps: dict[str, np.ndarray]
    kinds: dict[str, str] = field(default_factory=dict)  # condition -> palette condition
    n_controls: int = 0
    control_no_injection: np.ndarray | None = None  # the control questions answered "Yes" without injection

    def condition_kind(self, name: str) -> str:
        return self.kinds.get(name, "introspection")

    def injection_effects(self) -> dict[str, np.ndarray]:
        """What the injection changes: introspection (injected − not) and control (injected − not), each against
        its own question's uninjected map, so differences between the questions' texts cancel."""
        return {"introspection": self.maps[INTRO_INJ] - self.maps[INTRO_NOINJ],
                "control": self.maps[CONTROL_INJ] - self.control_no_injection}

    def differences(self) -> dict[str, np.ndarray]:
        """The difference maps shown under the conditions: the injection's effect on the introspection question, on
        the control questions, and introspection minus control (a head specific to introspection is red there)."""
        effects = self.injection_effects()
        return {"injection effect, introspection\n(injected − no injection)": effects["introspection"],
                "injection effect, control\n(injected − no injection)": effects["control"],
                "introspection effect − control effect": effects["introspection"] - effects["control"]}


CONTROL_INJ = "control 'Yes', injected"
INTRO_INJ = "introspection 'Yes', injected"
INTRO_NOINJ = "introspection 'Yes', no injection"


def attention_maps(handle: ModelHandle, concept: str, scale: float, *, layer: int, n_controls: int = 10,
                   prefill: str = "Yes", stat: str = "sum", bank: VectorBank | None = None) -> AttentionMaps:
    """Attention from the prefilled answer token (``prefill``, the last position) to the injected positions, per
    layer and head, for three conditions: control questions answered ``prefill`` under injection (mean over
    ``n_controls`` questions), the introspection question answered ``prefill`` under injection, and without.

    The injection covers the question up to, not including, the prefilled answer token (window
    ``(injection_start, T−1)``), so the keys read are exactly the injected positions and the answer token's
    attention to itself is not counted.
    """
    if stat not in ("sum", "max"):
        raise ValueError(f"stat {stat!r}: use 'sum' or 'max'")
    if not prefill:
        raise ValueError("prefill is empty: the attention is read at the prefilled answer token")
    handle.check_layer(layer)
    bank = bank or concept_vectors(handle, [concept], progress=False)
    vector = bank.get(concept, layer)
    intro = introspection_prompt(handle, prefill=prefill)
    controls = [introspection_prompt(handle, q, prefill=prefill) for q in control_questions(n_controls)]
    answer = answer_token_id(handle, prefill)
    for p in [intro, *controls]:  # the last position must be the answer token itself, not a merge with the turn
        if p.input_ids[-1] != answer:
            raise ValueError(f"prefill {prefill!r} does not end the prompt as the answer token {answer} "
                             f"({handle.tokenizer.decode([answer])!r}); it tokenised as "
                             f"{handle.tokenizer.decode(list(p.input_ids[-2:]))!r}")

    def trial(prompt, s):
        return Trial(prompt, vector, float(s), window=(prompt.injection_start, len(prompt) - 1))

    n = len(controls)
    trials = ([trial(p, scale) for p in controls] + [trial(intro, scale), trial(intro, 0.0)]
              + [trial(p, 0.0) for p in controls])  # uninjected rows reuse each prompt's shared pass
    readout = measure(handle, trials, attention=True)
    values = (readout.attention_sum if stat == "sum" else readout.attention_max).numpy()
    maps = {CONTROL_INJ: values[:n].mean(axis=0), INTRO_INJ: values[n], INTRO_NOINJ: values[n + 1]}
    kinds = {CONTROL_INJ: "control", INTRO_INJ: "introspection", INTRO_NOINJ: "baseline"}
    return AttentionMaps(handle.name, concept, layer, float(scale), prefill, stat, maps, kinds, n,
                         control_no_injection=values[n + 2:].mean(axis=0))
