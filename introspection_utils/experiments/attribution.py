"""Direct logit attribution of the yes−no difference and its difference-in-differences (introspection effect −
control effect); :mod:`.mechanisms` (notebook 12) calls it."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from introspection_utils.engine.components import PromptPass, frozen_scale, rms_gain
from introspection_utils.engine.measure import Trial, check_trials
from introspection_utils.engine.prompts import Prompt, question_prompts, yes_no_ids
from introspection_utils.engine.vectors import ConceptVector, concept_vectors
from introspection_utils.stats.shifts import specific

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

TRIAL_COLUMNS = ["model", "concept", "vector_kind", "vector_seed", "layer", "scale", "question_kind", "question",
                 "injected"]
COLUMNS = [*TRIAL_COLUMNS, "trial", "component", "comp_layer", "head", "yes", "no", "diff"]
CELL_KEYS = ["component", "comp_layer", "head"]


def trial_metadata(handle: ModelHandle, trial: Trial) -> dict:
    """The metadata columns :data:`TRIAL_COLUMNS` of one trial."""
    v = trial.vector
    return {"model": handle.name, "concept": v.concept if v is not None else None,
            "vector_kind": v.kind if v is not None else None, "vector_seed": v.seed if v is not None else None,
            "layer": trial.injection_layer, "scale": float(trial.scale), "question_kind": trial.prompt.kind,
            "question": trial.prompt.question, "injected": trial.injected}


def direct_logit_attribution(handle: ModelHandle, trials: Sequence[Trial], *, answers: tuple[str, str] | None = None,
                             progress: bool = False) -> pd.DataFrame:
    """The yes and no logits at each trial's answer position split into components (see the module docstring).

    One row per trial × component, columns :data:`COLUMNS`: ``component`` is "embed", "injection" (the injected
    vector, at ``comp_layer`` = the injection layer), "attn", "mlp", "head" (``head`` set) or "attn_bias" /
    "unembed_bias" where the model has those biases; ``yes`` / ``no`` are the component's share of the raw
    (pre-softcap) logits, ``diff = yes − no``. Head rows split the attention rows: sum either, not both. The
    sum over the non-head components of ``yes`` (``no``) is the raw yes (no) logit; see :func:`totals`.
    """
    check_trials(handle, trials)
    answer_ids = torch.tensor(yes_no_ids(handle, *(answers or (None, None))), device=handle.device)
    d, n_layers, n_heads, dh = handle.arch.d_model, handle.arch.n_layers, handle.arch.n_heads, handle.head_dim
    unembed = handle.lm_head._module
    w_u = unembed.weight[answer_ids].detach().float().cpu()  # [2, D]
    b_u = unembed.bias[answer_ids].detach().float().cpu() if unembed.bias is not None else None
    g_final = rms_gain(handle.final_norm._module, d, handle.device).cpu()
    sublayer_norms = handle.sublayer_norms
    g_attn = [rms_gain(handle.attention_out(i)._module, d, handle.device).cpu() if sublayer_norms else None
              for i in range(n_layers)]
    w_o = [handle.output_projection(i)._module.weight.detach().float().cpu() for i in range(n_layers)]  # [D, H·dh]
    b_o = [(b.detach().float().cpu() if (b := handle.output_projection(i)._module.bias) is not None else None)
           for i in range(n_layers)]

    # One forward per prompt, injection layer and window; uninjected trials ride along (zero vector) with the first.
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, trial in enumerate(trials):
        if trial.injected:
            groups[(trial.prompt, trial.injection_layer, trial.span())].append(index)
    for index, trial in enumerate(trials):
        if not trial.injected:
            key = next((k for k in groups if k[0] == trial.prompt), (trial.prompt, None, trial.span()))
            groups[key].append(index)
    passes: dict[Prompt, PromptPass] = {}  # the prefix runs once per prompt

    def project(vectors: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Residual pieces ``[..., D]`` → their (yes, no) shares of the raw logits ``[..., 2]`` through the final
        norm with its scale frozen at ``scale`` (one run's ``1 / rms``)."""
        return (scale * vectors * g_final) @ w_u.T

    frames: list[pd.DataFrame | None] = [None] * len(trials)
    bar = tqdm(total=len(trials), desc="attribution", disable=not progress)
    for (prompt, layer, _span), members in groups.items():
        last = len(prompt) - 1
        cached = min([last] + [trials[i].span()[0] for i in members])
        if prompt not in passes or passes[prompt].start > cached:
            passes[prompt] = PromptPass(handle, prompt.input_ids, cached)
        run = passes[prompt]
        injection = run.injection([trials[i] for i in members], layer=layer)
        out = run.forward(len(members), answer_ids=answer_ids, injection=injection, read=torch.tensor([last]))
        scale_f = frozen_scale(out.final_in, out.final_out, g_final)  # [R]

        for r, index in enumerate(members):
            rows: list[tuple] = [("embed", None, None, project(out.embed[r, 0], scale_f[r]))]
            if trials[index].injected and bool(trials[index].weights()[last]):
                rows.append(("injection", layer, None, project(injection.add[r].float().cpu(), scale_f[r])))
            for i in range(n_layers):
                z = out.z[i][r, 0].view(n_heads, dh)  # [H, dh]
                heads = torch.einsum("hk,dhk->hd", z, w_o[i].view(d, n_heads, dh))  # [H, D] through W_O
                bias = b_o[i]
                if g_attn[i] is not None:  # Gemma-2/3: the post-attention norm with its scale frozen
                    raw = heads.sum(0) + (bias if bias is not None else 0)
                    s = frozen_scale(raw, out.attn[i][r, 0], g_attn[i])
                    heads = s * heads * g_attn[i]
                    bias = s * bias * g_attn[i] if bias is not None else None
                rows.append(("attn", i, None, project(out.attn[i][r, 0], scale_f[r])))
                shares = project(heads, scale_f[r])
                rows += [("head", i, h, shares[h]) for h in range(n_heads)]
                if bias is not None:
                    rows.append(("attn_bias", i, None, project(bias, scale_f[r])))
                rows.append(("mlp", i, None, project(out.mlp[i][r, 0], scale_f[r])))
            if b_u is not None:
                rows.append(("unembed_bias", None, None, b_u))
            values = torch.stack([v for *_, v in rows]).numpy()
            frame = pd.DataFrame({"component": [c for c, *_ in rows], "comp_layer": [ly for _, ly, *_ in rows],
                                  "head": [h for _, _, h, _ in rows], "yes": values[:, 0], "no": values[:, 1]})
            for key, value in trial_metadata(handle, trials[index]).items():
                frame[key] = value
            frame["trial"] = index
            frames[index] = frame
        bar.update(len(members))
    bar.close()
    df = pd.concat(frames, ignore_index=True)
    df["diff"] = df["yes"] - df["no"]
    for column in ("comp_layer", "head", "vector_seed"):
        df[column] = df[column].astype("Int64")
    return df[COLUMNS]


def totals(df: pd.DataFrame, cap: float | None = None) -> pd.DataFrame:
    """Per trial: the raw yes / no logits rebuilt from the components (head rows left out: they split "attn"), and
    the yes−no difference through the softcap ``cap`` if given — what the model's own logits say. Columns
    ``trial, yes, no, raw_diff, diff``."""
    whole = df[df["component"] != "head"].groupby("trial")[["yes", "no"]].sum()
    capped = whole if not cap else cap * np.tanh(whole / cap)
    return pd.DataFrame({"yes": whole["yes"], "no": whole["no"], "raw_diff": whole["yes"] - whole["no"],
                         "diff": capped["yes"] - capped["no"]}).reset_index()


def attribution_cells(handle: ModelHandle, concept: str | ConceptVector, scale: float, *, layer: int | None = None,
                      n_controls: int = 4, answers: tuple[str, str] | None = None) -> pd.DataFrame:
    """Direct logit attribution for the four cells: the introspection question and ``n_controls`` control questions
    (paper frame), each injected with ``scale ×`` the concept's vector at ``layer`` and uninjected.

    ``concept``: a word (its vector at ``layer``, default two thirds of the depth) or a :class:`ConceptVector`.
    Returns :func:`direct_logit_attribution`'s table (``injected`` tells the cells apart).
    """
    vector = _vector(handle, concept, layer)
    trials = [Trial(p, vector, float(s)) for p in question_prompts(handle, n_controls) for s in (scale, 0.0)]
    return direct_logit_attribution(handle, trials, answers=answers)


def _vector(handle: ModelHandle, concept: str | ConceptVector, layer: int | None) -> ConceptVector:
    if isinstance(concept, ConceptVector):
        return concept
    layer = 2 * handle.arch.n_layers // 3 if layer is None else handle.check_layer(layer)
    return concept_vectors(handle, [concept], progress=False).get(concept, layer)


def difference_in_differences(df: pd.DataFrame, *, value: str = "diff", by: Sequence[str] = CELL_KEYS
                              ) -> pd.DataFrame:
    """Per component (``by``), the four cells and their difference-in-differences from a table of
    :func:`attribution_cells` (or any table with ``question_kind``, ``injected`` and ``value``):

    ``intro_injected, intro_base, control_injected, control_base`` (controls averaged over questions; the table
    must hold one concept, vector and scale),
    ``intro_effect = intro_injected − intro_base``, ``control_effect`` likewise, ``did = intro_effect −
    control_effect``. Rows sorted by ``|did|``, largest first.
    """
    by = list(by)
    cell = (np.where(df["question_kind"] == "introspection", "intro", "control")
            + np.where(df["injected"].astype(bool), "_injected", "_base"))
    table = df.assign(cell=cell)
    # Mean over the control questions of each cell (each question contributes once per cell).
    wide = table.groupby([*by, "cell"], dropna=False)[value].mean().unstack("cell")
    missing = {"intro_injected", "intro_base", "control_injected", "control_base"} - set(wide.columns)
    if missing:
        raise ValueError(f"the table lacks the cell(s) {sorted(missing)}: it needs the introspection and control "
                         f"questions, each injected and uninjected")
    wide = wide[["intro_injected", "intro_base", "control_injected", "control_base"]].copy()
    wide["intro_effect"] = wide["intro_injected"] - wide["intro_base"]
    wide["control_effect"] = wide["control_injected"] - wide["control_base"]
    wide["did"] = specific(wide["intro_effect"], wide["control_effect"])
    wide = wide.reset_index()
    for k in by:
        if k in ("comp_layer", "head"):
            wide[k] = wide[k].astype("Int64")
    return wide.reindex(wide["did"].abs().sort_values(ascending=False).index).reset_index(drop=True)


def did_by_layer(df: pd.DataFrame) -> pd.DataFrame:
    """The difference-in-differences per layer: each layer's attention + MLP (+ the injected vector at its layer),
    the embedding as layer −1; columns as :func:`difference_in_differences`, sorted by layer."""
    whole = df[~df["component"].isin(["head", "unembed_bias"])].copy()
    whole["comp_layer"] = whole["comp_layer"].fillna(-1)
    summed = whole.groupby(["trial", "comp_layer", "question_kind", "injected"], as_index=False)["diff"].sum()
    return difference_in_differences(summed, by=["comp_layer"]).sort_values("comp_layer").reset_index(drop=True)
