"""SAE features under injection (notebook 09): does an SAE at the injection layer see the concept, and do
"yes"-like features rise later?"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from introspection_utils.core.data import load_list
from introspection_utils.engine.measure import Trial, residuals
from introspection_utils.engine.prompts import chat_prompt, question_prompts, yes_no_ids
from introspection_utils.engine.vectors import concept_vectors, with_random
from introspection_utils.experiments.sae_train import as_layer_map, reconstruction, token_activations

if TYPE_CHECKING:
    from introspection_utils.engine.vectors import VectorBank
    from introspection_utils.models.handle import ModelHandle


def later_layer(handle: ModelHandle, layer: int, later: int | None = None) -> int:
    """``later`` if given (checked, above ``layer``), else halfway from ``layer`` to the last layer: 24 for an
    injection at 20 of 30 (SmolLM2), 34 for 28 of 42 (Gemma-2-9B)."""
    handle.check_layer(layer)
    if later is None:
        return (layer + handle.arch.n_layers - 1) // 2 if layer < handle.arch.n_layers - 1 else layer
    later = handle.check_layer(int(later))
    if later < layer:
        raise ValueError(f"later_layer {later} is below the injection layer {layer}")
    return later


# ----------------------------------------------------------------------------------------------- SAE quality


QUALITY_COLUMNS = ["model", "sae_layer", "source", "d_sae", "fve", "l0", "mse", "n_tokens", "measured_on"]


def quality_texts(handle: ModelHandle, n_sentences: int = 50, n_controls: int = 10) -> list[str]:
    """Text of this model's own prompts, no generation: the paper's sentences as user turns and the experiment's
    question prompts (injected-thought and ``n_controls`` control questions), chat-formatted."""
    sentences = load_list("sentences")[:n_sentences]
    prompts = [chat_prompt(handle, [{"role": "user", "content": s}], kind="quality") for s in sentences]
    return [p.text for p in prompts + question_prompts(handle, n_controls)]


def sae_quality(handle: ModelHandle, saes: Any, *, texts: Sequence[str] | None = None,
                progress: bool = False) -> pd.DataFrame:
    """How well each SAE reconstructs this model's residual stream: a tidy table (:data:`QUALITY_COLUMNS`) with
    the fraction of variance explained ``fve``, ``l0`` (active features per token) and ``mse``.

    An SAE trained here reports its stored held-out numbers (held out by text, prefix duplicates
    dropped:
    :func:`introspection_utils.experiments.sae_train.heldout_split`); any other (pretrained, e.g. Gemma Scope) is
    measured on
    ``texts`` (default :func:`quality_texts`; every token but each text's first) — the model's activations,
    not the ones the SAE was trained on.
    """
    saes = as_layer_map(handle, saes)
    pretrained = [layer for layer, sae in saes.items() if sae.cfg.metadata.get("heldout_texts") is None]
    acts = None
    if pretrained:
        texts = list(texts) if texts is not None else quality_texts(handle)
        acts = token_activations(handle, texts, pretrained, progress=progress)  # [N, len(pretrained), D]
    rows = []
    for layer, sae in saes.items():
        meta = sae.cfg.metadata
        if layer in pretrained:
            q = reconstruction(sae, acts[:, pretrained.index(layer)])
            rows.append({"source": "pretrained", **q, "n_tokens": len(acts),
                         "measured_on": f"{len(texts)} texts of this model (all tokens but the first)"})
        else:
            rows.append({"source": "trained here", "fve": meta["fve"], "l0": meta["l0"], "mse": meta["mse"],
                         "n_tokens": meta["n_heldout"],
                         "measured_on": f"{meta['heldout_texts']} held-out texts, {meta['heldout_dropped']} "
                                        f"prefix-duplicate tokens dropped"})
        rows[-1].update(model=handle.name, sae_layer=layer, d_sae=sae.cfg.d_sae)
    return pd.DataFrame(rows, columns=QUALITY_COLUMNS)


# ----------------------------------------------------------------------------------------------- readouts


def _encode(sae: Any, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[n, d_sae]`` of ``resid [n, D]`` and the relative squared reconstruction error
    ``‖x − x̂‖² / ‖x‖²`` of each row ``[n]`` (float32, CPU)."""
    with torch.no_grad():
        x = resid.to(sae.W_dec.device, sae.W_dec.dtype)
        feats = sae.encode(x)
        err = (sae.decode(feats) - x).float().pow(2).sum(-1) / x.float().pow(2).sum(-1).clamp_min(1e-12)
    return feats.float().cpu(), err.cpu()


def encode_with_error(handle: ModelHandle, saes: Any, trials: Sequence[Trial], *, batch_size: int | None = None
                      ) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`encode_injected` plus each SAE's relative reconstruction error on the residuals it encoded:
    ``{layer: (with_injection, without, error_with [n], error_without [n])}``."""
    saes = as_layer_map(handle, saes)
    plain = [Trial(t.prompt, window=t.window) for t in trials]
    resid = residuals(handle, [*trials, *plain], list(saes), batch_size=batch_size)  # [2n, n_layers, D]
    n = len(trials)
    out = {}
    for i, (layer, sae) in enumerate(saes.items()):
        feats, err = _encode(sae, resid[:, i])
        out[layer] = (feats[:n], feats[n:], err[:n], err[n:])
    return out


def encode_injected(handle: ModelHandle, saes: Any, trials: Sequence[Trial], *, batch_size: int | None = None
                    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """SAE feature activations at the answer position (each trial's last token), with and without its injection.

    ``saes``: ``{layer: SAE}`` or one SAE that names its layer. Returns ``{layer: (with_injection, without)}``,
    each ``[n_trials, d_sae]`` (float32, CPU); ``without`` encodes the same prompt uninjected. One batched engine
    call (:func:`introspection_utils.engine.measure.residuals`) reads every layer for all trials.
    """
    encoded = encode_with_error(handle, saes, trials, batch_size=batch_size)
    return {layer: (a_with, a_without) for layer, (a_with, a_without, _, _) in encoded.items()}


def top_features_gained(with_injection: torch.Tensor, without: torch.Tensor, *, k: int = 10) -> pd.DataFrame:
    """The ``k`` features whose mean activation over the rows rises most with the injection.

    ``with_injection``/``without``: ``[n, d_sae]`` (or ``[d_sae]``). Columns: ``rank, feature, act_without,
    act_with, gain`` (means over rows; ``gain = act_with − act_without``), sorted by gain, ties by feature index.
    """
    if with_injection.shape != without.shape:
        raise ValueError(f"shapes differ: {tuple(with_injection.shape)} vs {tuple(without.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    a_with = with_injection.reshape(-1, with_injection.shape[-1]).float().mean(0)
    a_without = without.reshape(-1, without.shape[-1]).float().mean(0)
    gain = (a_with - a_without).numpy()
    order = np.lexsort((np.arange(len(gain)), -gain))[:k]  # largest gain first, then lowest index
    return pd.DataFrame({"rank": np.arange(1, len(order) + 1), "feature": order,
                         "act_without": a_without.numpy()[order], "act_with": a_with.numpy()[order],
                         "gain": gain[order]})


def yes_direction(handle: ModelHandle, answers: tuple[str, str] | None = None) -> torch.Tensor:
    """The residual direction that raises logit(yes) − logit(no) through the final norm: ``g ⊙ (W_U[yes] −
    W_U[no])`` with ``g`` the final norm's per-dimension gain (read off the module, so Gemma's ``1 + w`` is
    handled). ``[d_model]`` float32. (The norm's division by the RMS scales every direction alike.)"""
    yes, no = yes_no_ids(handle, *(answers or (None, None)))
    with torch.no_grad():
        w_u = handle.lm_head._module.weight.float()
        norm = handle.final_norm._module
        ones = torch.ones(1, handle.arch.d_model, device=w_u.device, dtype=next(norm.parameters()).dtype)
        gain = norm(ones)[0].float()  # RMS of ones is 1: the output is the gain (up to the eps)
        return ((w_u[yes] - w_u[no]) * gain).cpu()


def yes_scores(handle: ModelHandle, sae: Any, answers: tuple[str, str] | None = None) -> torch.Tensor:
    """Cosine of each SAE feature's decoder direction with :func:`yes_direction`: ``[d_sae]``. A feature with a
    high score, when active, pushes the answer towards "yes" directly (before any later layer transforms it)."""
    direction = yes_direction(handle, answers)
    w_dec = sae.W_dec.detach().float().cpu()
    return torch.nn.functional.cosine_similarity(w_dec, direction[None], dim=-1)


def yes_features(handle: ModelHandle, saes: Any, *, k: int = 5) -> pd.DataFrame:
    """The ``k`` most yes-pointing features of each SAE: columns ``sae_layer, rank, feature, yes_score``."""
    rows = []
    for layer, sae in as_layer_map(handle, saes).items():
        scores = yes_scores(handle, sae)
        top = torch.topk(scores, min(k, len(scores)))
        rows += [{"sae_layer": layer, "rank": r + 1, "feature": int(f), "yes_score": float(s)}
                 for r, (s, f) in enumerate(zip(top.values, top.indices, strict=True))]
    return pd.DataFrame(rows)


FEATURE_COLUMNS = ["model", "concept", "vector_kind", "vector_seed", "layer", "scale", "question_kind", "question",
                   "trial", "sae_layer", "feature", "act_without", "act_with", "gain", "recon_error_without",
                   "recon_error_with"]


def sae_features(handle: ModelHandle, saes: Any, concepts: Sequence[str], *, layer: int, scale: float,
                 n_controls: int = 2, n_random: int = 1, seed: int = 0, bank: VectorBank | None = None
                 ) -> pd.DataFrame:
    """SAE features at the answer position when each concept is injected at ``layer`` × ``scale``, on the
    injected-thought question and ``n_controls`` control questions, with the concept vector and ``n_random``
    norm-matched random vectors. Every SAE in ``saes`` (``{layer: SAE}``, layers ≥ ``layer`` to see the
    injection) is read in the same pass.

    A tidy table (:data:`FEATURE_COLUMNS`), one row per trial × SAE layer × feature *active with or without the
    injection* (an absent feature is 0 in both): ``act_without``/``act_with`` and their difference ``gain``;
    ``recon_error_without``/``recon_error_with``: the SAE's relative squared reconstruction error ``‖x − x̂‖² /
    ‖x‖²`` on the trial's residual it read, uninjected and injected (how far to trust the features of that row).
    """
    handle.check_layer(layer)
    saes = as_layer_map(handle, saes)
    early = [sae_l for sae_l in saes if sae_l < layer]
    if early:
        raise ValueError(f"SAE layer(s) {early} are below the injection layer {layer}: the injection cannot reach "
                         f"them")
    bank = bank or concept_vectors(handle, concepts, progress=False)
    prompts = question_prompts(handle, n_controls)
    trials, info = [], []
    for concept in concepts:
        for v in with_random(bank.get(concept, layer), n_random, seed):
            for prompt in prompts:
                trials.append(Trial(prompt, v, float(scale)))
                info.append({"model": handle.name, "concept": concept, "vector_kind": v.kind, "vector_seed": v.seed,
                             "layer": layer, "scale": float(scale), "question_kind": prompt.kind,
                             "question": prompt.question})
    encoded = encode_with_error(handle, saes, trials)
    frames = []
    for sae_l, (a_with, a_without, err_with, err_without) in encoded.items():
        trial_idx, feature = torch.nonzero((a_with > 0) | (a_without > 0), as_tuple=True)
        frame = pd.DataFrame(info).iloc[trial_idx.numpy()].reset_index(drop=True)
        frame["trial"] = trial_idx.numpy()
        frame["sae_layer"] = sae_l
        frame["feature"] = feature.numpy()
        frame["act_without"] = a_without[trial_idx, feature].numpy()
        frame["act_with"] = a_with[trial_idx, feature].numpy()
        frame["gain"] = frame["act_with"] - frame["act_without"]
        frame["recon_error_without"] = err_without[trial_idx].numpy()
        frame["recon_error_with"] = err_with[trial_idx].numpy()
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)[FEATURE_COLUMNS]
    df["vector_seed"] = df["vector_seed"].astype("Int64")
    return df


def _dense(table: pd.DataFrame, sae_layer: int, features: Sequence[int], **where: Any) -> pd.DataFrame:
    """``[trial, feature]`` rows for every selected trial and every feature in ``features`` (absent = 0)."""
    rows = table[table["sae_layer"] == sae_layer]
    for column, value in where.items():
        rows = rows[rows[column] == value]
    trials = table.loc[np.logical_and.reduce([table[c] == v for c, v in where.items()])
                       if where else slice(None), "trial"].unique()
    grid = pd.MultiIndex.from_product([sorted(trials), list(features)], names=["trial", "feature"])
    values = rows.set_index(["trial", "feature"])[["act_without", "act_with", "gain"]]
    return values.reindex(grid, fill_value=0.0).reset_index()


def top_gained(table: pd.DataFrame, concept: str, *, sae_layer: int, question_kind: str = "introspection",
               vector_kind: str = "concept", k: int = 10) -> pd.DataFrame:
    """:func:`top_features_gained` on a :func:`sae_features` table: the ``k`` features of the SAE at
    ``sae_layer`` that gain most (mean over the matching trials) for ``concept``."""
    where = {"concept": concept, "question_kind": question_kind, "vector_kind": vector_kind}
    sel = table[(table["sae_layer"] == sae_layer)]
    for column, value in where.items():
        sel = sel[sel[column] == value]
    if sel.empty:
        raise ValueError(f"no active features for {where} at SAE layer {sae_layer}")
    features = sorted(sel["feature"].unique())
    dense = _dense(table, sae_layer, features, **where)
    mean = dense.groupby("feature")[["act_without", "act_with", "gain"]].mean()
    n = dense["trial"].nunique()
    mean = mean.reset_index().sort_values(["gain", "feature"], ascending=[False, True]).head(k)
    return mean.assign(rank=range(1, len(mean) + 1), n_trials=n)[
        ["rank", "feature", "act_without", "act_with", "gain", "n_trials"]].reset_index(drop=True)


def yes_feature_gain(table: pd.DataFrame, yes: pd.DataFrame, concept: str) -> pd.DataFrame:
    """Mean activation change of each SAE layer's yes-features (:func:`yes_features`) for ``concept``, per
    question kind and vector kind: columns ``sae_layer, vector_kind, question_kind, act_without, act_with, gain``
    (means over the yes-features and the trials)."""
    rows = []
    for sae_layer, group in yes.groupby("sae_layer"):
        for vector_kind in ("concept", "random"):
            for question_kind in ("introspection", "control"):
                where = {"concept": concept, "vector_kind": vector_kind, "question_kind": question_kind}
                if not np.logical_and.reduce([table[c] == v for c, v in where.items()]).any():
                    continue
                dense = _dense(table, sae_layer, group["feature"].tolist(), **where)
                rows.append({"sae_layer": sae_layer, "vector_kind": vector_kind, "question_kind": question_kind,
                             **dense[["act_without", "act_with", "gain"]].mean().to_dict()})
    return pd.DataFrame(rows)


def reconstruction_errors(table: pd.DataFrame) -> pd.DataFrame:
    """Mean relative reconstruction error of the residuals each SAE read in a :func:`sae_features` table, per SAE
    layer, vector kind and question kind (one value per trial, averaged): columns ``sae_layer, vector_kind,
    question_kind, n_trials, recon_error_without, recon_error_with``."""
    trials = table.drop_duplicates(["trial", "sae_layer"])
    grouped = trials.groupby(["sae_layer", "vector_kind", "question_kind"])
    out = grouped[["recon_error_without", "recon_error_with"]].mean()
    return out.assign(n_trials=grouped.size()).reset_index()[
        ["sae_layer", "vector_kind", "question_kind", "n_trials", "recon_error_without", "recon_error_with"]]


def describe_sae_features(table: pd.DataFrame, yes: pd.DataFrame, concept: str, *, k: int = 10) -> str:
    """A computed reading: what the injection-layer SAE sees, how concept-specific it is (overlap of the top-k with
    the random vector's and the other concepts'), and whether the yes-features rise at each SAE layer."""
    layer = int(table["layer"].iloc[0])
    scale = float(table["scale"].iloc[0])
    first = int(table["sae_layer"].min())
    top = top_gained(table, concept, sae_layer=first, k=k)
    lead = top.iloc[0]
    parts = [f"{concept} × {scale:g} at layer {layer}: at SAE layer {first} the top gained feature on the "
             f"injected-thought question is #{int(lead.feature)} ({lead.act_without:.2f} → {lead.act_with:.2f})."]
    if (table["vector_kind"] == "random").any():
        rand = top_gained(table, concept, sae_layer=first, vector_kind="random", k=k)
        shared = len(set(top["feature"]) & set(rand["feature"]))
        parts.append(f"{shared} of its top {len(top)} are also in the random vector's top {len(rand)} "
                     f"({'mostly injection-generic' if shared > len(top) / 2 else 'mostly concept-specific'}).")
    others = [c for c in table["concept"].unique() if c != concept]
    if others:
        overlap = [len(set(top["feature"]) & set(top_gained(table, c, sae_layer=first, k=k)["feature"]))
                   for c in others]
        parts.append(f"Overlap with the other concepts' top {k}: {', '.join(map(str, overlap))}.")
    gains = yes_feature_gain(table, yes, concept)
    for sae_layer, g in gains[gains["vector_kind"] == "concept"].groupby("sae_layer"):
        by_q = g.set_index("question_kind")["gain"]
        text = ", ".join(f"{q} {by_q[q]:+.3f}" for q in ("introspection", "control") if q in by_q)
        scores = yes.loc[yes["sae_layer"] == sae_layer, "yes_score"]
        parts.append(f"SAE layer {sae_layer}: its {len(scores)} most yes-pointing features (cosine with the yes "
                     f"direction {scores.min():.2f}–{scores.max():.2f}) change by {text} on average.")
    errors = reconstruction_errors(table[table["concept"] == concept])
    errors = errors[errors["vector_kind"] == "concept"].groupby("sae_layer")[
        ["recon_error_without", "recon_error_with"]].mean()
    parts.append("Reconstruction error on the residuals read (‖x − x̂‖²/‖x‖², uninjected → injected): " + ", ".join(
        f"SAE layer {sae_l} {row.recon_error_without:.2f} → {row.recon_error_with:.2f}" for sae_l, row in
        errors.iterrows()) + ".")
    return " ".join(parts)


def describe_quality(quality: pd.DataFrame) -> str:
    """One sentence per SAE of a :func:`sae_quality` table (as notebook 09 saves it): where its reconstruction
    quality was measured, variance explained and L0."""
    return " ".join(f"SAE layer {int(q.sae_layer)} ({q.source}, d_sae={int(q.d_sae)}): variance explained "
                    f"{q.fve:.1%}, L0 {q.l0:.1f} features/token, on {int(q.n_tokens)} tokens ({q.measured_on})."
                    for q in quality.itertuples())


def describe_sae(saes: Mapping[int, Any], quality: pd.DataFrame | None = None) -> str:
    """One line per SAE: where it comes from and its reconstruction quality — the stored held-out numbers of a
    trained one (held out by text), and for a pretrained one the :func:`sae_quality` row if ``quality`` is given."""
    lines = []
    measured = {} if quality is None else quality.set_index("sae_layer").to_dict("index")
    for layer, sae in sorted(saes.items()):
        meta = sae.cfg.metadata
        if meta.get("fve") is not None:
            held = (f"{meta['n_heldout']} tokens of {meta['heldout_texts']} held-out texts (of {meta['n_texts']}; "
                    f"{meta['heldout_dropped']} prefix duplicates of training tokens dropped)"
                    if meta.get("heldout_texts") is not None else "held-out tokens")
            lines.append(f"layer {layer}: small SAE trained here, d_sae={sae.cfg.d_sae}, on {meta['n_tokens']} tokens;"
                         f" on {held}: variance explained {meta['fve']:.1%}, L0 {meta['l0']:.1f} features/token, "
                         f"{meta['dead_fraction']:.0%} never fire")
        elif layer in measured:
            q = measured[layer]
            lines.append(f"layer {layer}: pretrained {meta.get('model_name') or ''} SAE, d_sae={sae.cfg.d_sae}; on "
                         f"{q['n_tokens']} tokens of {q['measured_on']}: variance explained {q['fve']:.1%}, "
                         f"L0 {q['l0']:.1f} features/token")
        else:
            lines.append(f"layer {layer}: pretrained {meta.get('model_name') or ''} SAE, d_sae={sae.cfg.d_sae} "
                         f"(quality not measured: pass sae_quality(...))")
    return "\n".join(lines)
