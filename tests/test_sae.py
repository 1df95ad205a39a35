"""The SAE experiment (09): the engine's residual read against the plain-PyTorch reference, SAE folders saved and
loaded offline, encode/decode shapes, top-feature selection with a hand-made SAE whose answer is known, the
yes-direction against a hand computation, and small-SAE training on a tiny model (loss falls, cached, seeded).

Nothing here touches the network: pretrained loading is only checked to refuse unknown names before downloading.
"""

from __future__ import annotations

import pytest
import torch

from introspection_utils.engine.measure import Trial, residuals
from introspection_utils.engine.prompts import control_questions, introspection_prompt
from introspection_utils.engine.vectors import ConceptVector


def needs_sae_lens():
    return pytest.importorskip("sae_lens", reason="sae-lens is the optional extra 'sae': pip install -e '.[sae]'")


def hand_sae(w_dec: torch.Tensor, layer: int | None):
    """A StandardSAE with decoder rows ``w_dec [d_sae, d_in]``, encoder ``w_dec.T``, zero biases, no input bias:
    features are ``relu(x @ w_dec.T)``."""
    needs_sae_lens()
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post") if layer is not None else SAEMetadata()
    sae = StandardSAE(StandardSAEConfig(d_in=w_dec.shape[1], d_sae=w_dec.shape[0], apply_b_dec_to_input=False,
                                        metadata=meta))
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def identity_sae(d: int, layer: int | None):
    """Features 0..d-1 read +x, features d..2d-1 read −x (ReLU): feature i rises exactly when x_i does."""
    eye = torch.eye(d)
    return hand_sae(torch.cat([eye, -eye]), layer)


def unit(handle, index: int, norm: float, layer: int) -> ConceptVector:
    v = torch.zeros(handle.arch.d_model)
    v[index] = norm
    return ConceptVector(f"e{index}", layer, v, kind="file", model=handle.name)


# ------------------------------------------------------------------ the engine's residual read


def test_residuals_match_reference_hooks_with_and_without_injection(tiny_perturbed, oracle):
    handle = tiny_perturbed
    ref = oracle.ref
    prompt, control = introspection_prompt(handle), introspection_prompt(handle, control_questions(1)[0])
    direction = torch.randn(handle.arch.d_model, generator=torch.Generator().manual_seed(5))
    v0 = ConceptVector("v", 0, direction / direction.norm() * 6.0, kind="random", seed=5, model=handle.name)
    trials = [Trial(prompt, v0, 3.0), Trial(prompt), Trial(control, v0, -2.0, layer=1), Trial(control, v0, 1.0,
                                                                                            window="last")]
    got = residuals(handle, trials, [1, 0], batch_size=2)
    assert got.shape == (len(trials), 2, handle.arch.d_model)
    for trial, row in zip(trials, got, strict=True):
        ids = oracle.ids(trial.prompt)
        injection = oracle._injection(trial)
        store = [None] * handle.arch.n_layers
        with torch.no_grad(), ref._injection(handle.torch_model, **injection), \
                ref._capture_layer_outputs(handle.torch_model, store):
            ref._forward(handle.torch_model, ids, torch.ones_like(ids))
        oracle.assert_close(row, torch.stack([store[1][0, -1], store[0][0, -1]]))


def test_residual_at_the_injection_layer_moves_by_exactly_the_injected_vector(tiny_llama):
    handle = tiny_llama
    prompt = introspection_prompt(handle)
    v = unit(handle, 3, 5.0, layer=0)
    with_, without = residuals(handle, [Trial(prompt, v, 2.0), Trial(prompt)], [0])
    torch.testing.assert_close(with_[0] - without[0], 2.0 * v.vector, atol=1e-5, rtol=0)


def test_residuals_refuse_a_bad_layer_before_compute(tiny_llama, forbid_compute):
    forbid_compute(tiny_llama)
    with pytest.raises(ValueError, match=r"layer 7 is out of range for tiny-llama \(0..1\)"):
        residuals(tiny_llama, [Trial(introspection_prompt(tiny_llama))], [7])


# ------------------------------------------------------------------ loading


def test_sae_saved_to_a_folder_loads_back_identically(tmp_path):
    from introspection_utils.experiments.sae_train import load_sae_from_folder, sae_layer

    sae = hand_sae(torch.randn(24, 16, generator=torch.Generator().manual_seed(0)), layer=1)
    sae.save_model(tmp_path / "sae")
    loaded = load_sae_from_folder(tmp_path / "sae")
    assert type(loaded).__name__ == "StandardSAE" and sae_layer(loaded) == 1
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(loaded, name), getattr(sae, name), atol=0, rtol=0)
    x = torch.randn(5, 16)
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), atol=0, rtol=0)


def test_loading_a_folder_without_an_sae_names_the_missing_files(tmp_path):
    needs_sae_lens()
    from introspection_utils.experiments.sae_train import load_sae_from_folder

    with pytest.raises(FileNotFoundError, match="missing cfg.json, sae_weights.safetensors"):
        load_sae_from_folder(tmp_path)


def test_pretrained_loading_refuses_unknown_names_before_any_download():
    needs_sae_lens()
    from introspection_utils.experiments.sae_train import load_sae

    with pytest.raises(ValueError, match="unknown SAE release 'gemma-scope-9b-nope'"):
        load_sae("gemma-scope-9b-nope", "layer_20/width_16k/canonical")
    with pytest.raises(ValueError, match="has no SAE 'layer_99/width_16k/canonical'"):
        load_sae("gemma-scope-9b-pt-res-canonical", "layer_99/width_16k/canonical")


def test_encode_decode_shapes_and_identity_reconstruction():
    sae = identity_sae(16, layer=0)
    x = torch.randn(3, 7, 16)
    feats = sae.encode(x)
    assert feats.shape == (3, 7, 32) and (feats >= 0).all()
    out = sae.decode(feats)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)  # relu(x) − relu(−x) = x


def test_an_sae_of_the_wrong_width_or_layer_is_refused(tiny_llama):
    from introspection_utils.experiments.sae import encode_injected
    from introspection_utils.experiments.sae_train import check_sae

    with pytest.raises(ValueError, match="d_in=16; tiny-llama has d_model=64"):
        check_sae(tiny_llama, identity_sae(16, layer=0), 0)
    with pytest.raises(ValueError, match="reads layer 1 .* used at layer 0"):
        encode_injected(tiny_llama, {0: identity_sae(64, layer=1)}, [Trial(introspection_prompt(tiny_llama))])
    with pytest.raises(ValueError, match="does not say its layer"):
        encode_injected(tiny_llama, identity_sae(64, layer=None), [Trial(introspection_prompt(tiny_llama))])


# ------------------------------------------------------------------ readouts


def test_top_feature_gained_is_the_injected_coordinate(tiny_llama):
    from introspection_utils.experiments.sae import encode_injected, top_features_gained

    handle = tiny_llama
    sae = identity_sae(handle.arch.d_model, layer=1)
    prompt = introspection_prompt(handle)
    trials = [Trial(prompt, unit(handle, 7, 1.0, layer=1), 40.0), Trial(prompt, unit(handle, 7, 1.0, layer=1), 30.0)]
    (layer, (with_, without)), = encode_injected(handle, sae, trials).items()
    assert layer == 1 and with_.shape == without.shape == (2, 2 * handle.arch.d_model)
    torch.testing.assert_close(without[0], without[1])  # the same prompt uninjected
    top = top_features_gained(with_, without, k=3)
    assert list(top.columns) == ["rank", "feature", "act_without", "act_with", "gain"]
    assert top["feature"].iloc[0] == 7 and top["rank"].tolist() == [1, 2, 3]
    # Only coordinate 7 moved at the injection layer: every other feature's gain is exactly 0.
    assert top["gain"].iloc[0] > 30 - 1e-3 and (top["gain"].iloc[1:].abs() < 1e-5).all()
    torch.testing.assert_close(torch.tensor(top["gain"].iloc[0]), (with_ - without)[:, 7].mean())


def test_top_features_gained_orders_by_gain_then_index():
    from introspection_utils.experiments.sae import top_features_gained

    without = torch.zeros(1, 5)
    with_ = torch.tensor([[1.0, 3.0, 0.0, 3.0, -1.0]])
    top = top_features_gained(with_, without, k=4)
    assert top["feature"].tolist() == [1, 3, 0, 2]
    with pytest.raises(ValueError, match="shapes differ"):
        top_features_gained(with_, torch.zeros(2, 5))


def test_yes_direction_is_the_norm_gain_times_the_unembedding_difference(tiny_perturbed):
    from introspection_utils.engine.prompts import yes_no_ids
    from introspection_utils.experiments.sae import yes_direction, yes_features

    handle = tiny_perturbed
    yes, no = yes_no_ids(handle)
    weight = handle.torch_model.model.norm.weight.detach().float()
    gain = 1 + weight if handle.arch.family.startswith("Gemma") else weight  # Gemma's RMSNorm scales by 1 + w
    w_u = handle.torch_model.lm_head.weight.detach().float()
    expected = gain * (w_u[yes] - w_u[no])
    torch.testing.assert_close(yes_direction(handle), expected, rtol=1e-4, atol=1e-6)
    # An SAE whose feature 2 decodes along that direction ranks it first, with cosine 1.
    w_dec = torch.randn(6, handle.arch.d_model, generator=torch.Generator().manual_seed(0))
    w_dec[2] = 3 * expected
    top = yes_features(handle, {1: hand_sae(w_dec, layer=1)}, k=2)
    assert top["feature"].iloc[0] == 2 and top["yes_score"].iloc[0] == pytest.approx(1.0, abs=1e-5)


def test_sae_feature_table_reading_and_figure(tiny_llama, isolated_cache):
    from introspection_utils.engine.vectors import VectorBank
    from introspection_utils.experiments import sae as S
    from introspection_utils.plotting.sae import plot_sae_features

    handle = tiny_llama
    d = handle.arch.d_model
    bank = VectorBank(("Sandwich", "Water"), torch.stack([
        torch.stack([unit(handle, 5, 1.0, 0).vector] * 2), torch.stack([unit(handle, 9, 1.0, 0).vector] * 2)]),
        model=handle.name)
    saes = {0: identity_sae(d, 0), 1: identity_sae(d, 1)}
    table = S.sae_features(handle, saes, ["Sandwich", "Water"], layer=0, scale=30.0, n_controls=1, n_random=1,
                           bank=bank)
    assert list(table.columns) == S.FEATURE_COLUMNS
    assert set(table["sae_layer"]) == {0, 1} and set(table["question_kind"]) == {"introspection", "control"}
    assert ((table["act_with"] > 0) | (table["act_without"] > 0)).all()
    torch.testing.assert_close(torch.tensor(table["gain"].values),
                               torch.tensor((table["act_with"] - table["act_without"]).values))
    assert S.top_gained(table, "Sandwich", sae_layer=0, k=1)["feature"].iloc[0] == 5
    assert S.top_gained(table, "Water", sae_layer=0, k=1)["feature"].iloc[0] == 9
    yes = S.yes_features(handle, saes, k=3)
    gains = S.yes_feature_gain(table, yes, "Sandwich")
    assert set(gains["question_kind"]) == {"introspection", "control"} and set(gains["sae_layer"]) == {0, 1}
    reading = S.describe_sae_features(table, yes, "Sandwich", k=5)
    assert "top gained feature on the injected-thought question is #5" in reading and "SAE layer 1" in reading
    fig = plot_sae_features(table, yes, "Sandwich", k=5)
    assert len(fig.axes) == 2 and "Sandwich" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match=r"below the injection layer 1"):
        S.sae_features(handle, saes, ["Sandwich"], layer=1, scale=1.0, bank=bank)


# ------------------------------------------------------------------ training a small SAE

TINY_TRAIN = dict(n_words=4, n_sentences=4, n_controls=1, max_new_tokens=8, d_sae=128, steps=100, batch_size=32,
                  l1_coefficient=1.0)


def test_training_on_a_tiny_model_lowers_heldout_error_and_is_cached(tiny_llama, isolated_cache, monkeypatch):
    needs_sae_lens()
    from introspection_utils.experiments import sae_train as S

    saes = S.train_saes(tiny_llama, [1, 0], progress=False, **TINY_TRAIN)
    assert sorted(saes) == [0, 1]
    for layer, sae in saes.items():
        meta = sae.cfg.metadata
        assert S.sae_layer(sae) == layer and sae.cfg.d_sae == 128 and sae.cfg.d_in == tiny_llama.arch.d_model
        assert meta["mse"] < 0.7 * meta["heldout_mse_init"], (layer, meta["mse"], meta["heldout_mse_init"])
        assert 0 < meta["fve"] <= 1 and meta["n_tokens"] > 100
    folder = S.sae_cache_folder(tiny_llama, S.Corpus(**{k: v for k, v in TINY_TRAIN.items()
                                                        if k in S.Corpus.__dataclass_fields__}),
                                S.TrainSpec(**{k: v for k, v in TINY_TRAIN.items()
                                               if k in S.TrainSpec.__dataclass_fields__}))
    assert (folder / "layer_0" / "cfg.json").is_file() and (folder / "corpus.json").is_file()
    monkeypatch.setattr(S, "corpus_texts", lambda *a, **k: pytest.fail("the cached SAEs were not reused"))
    monkeypatch.setattr(S, "train_sae_on", lambda *a, **k: pytest.fail("the cached SAEs were not reused"))
    again = S.train_sae(tiny_llama, 1, progress=False, **TINY_TRAIN)
    torch.testing.assert_close(again.W_dec, saes[1].W_dec, atol=0, rtol=0)


def test_training_is_reproducible_by_seed():
    needs_sae_lens()
    from introspection_utils.experiments.sae_train import TrainSpec, train_sae_on

    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=-1)
    acts = ((torch.rand(600, 12, generator=g) < 0.15) * torch.rand(600, 12, generator=g) * 4) @ directions
    spec = TrainSpec(d_sae=24, steps=40, batch_size=32, seed=3)
    before = torch.random.get_rng_state()
    a, stats_a = train_sae_on(acts, spec)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global generator is left alone
    b, stats_b = train_sae_on(acts, spec)
    c, _ = train_sae_on(acts, TrainSpec(d_sae=24, steps=40, batch_size=32, seed=4))
    torch.testing.assert_close(a.W_dec, b.W_dec, atol=0, rtol=0)
    assert stats_a["mse"] == stats_b["mse"] and not torch.equal(a.W_dec, c.W_dec)


def test_unknown_training_setting_is_an_error_before_compute(tiny_llama, forbid_compute):
    needs_sae_lens()
    from introspection_utils.experiments.sae_train import train_saes

    forbid_compute(tiny_llama)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['width'\]"):
        train_saes(tiny_llama, [0], width=3)
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        train_saes(tiny_llama, [5])


# ------------------------------------------------------------------ quality: held out by text, shown with readings


def _prefix_duplicates(encoded, train_texts, rows):
    """Independent count: rows (token index in token_activations order) whose prefix occurs in a training text."""
    index = [(i, t) for i, ids in enumerate(encoded) for t in range(1, len(ids))]
    train_prefixes = {tuple(encoded[i][:t + 1]) for i in train_texts for t in range(1, len(encoded[i]))}
    return sum(tuple(encoded[index[r][0]][:index[r][1] + 1]) in train_prefixes for r in rows)


def test_heldout_split_is_by_text_and_drops_prefix_duplicates():
    from introspection_utils.experiments.sae_train import heldout_split

    encoded = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7, 8], [1, 9, 9], [1, 2, 3, 4, 0]]
    train, held, stats = heldout_split(encoded, 0.4, seed=0)
    index = [(i, t) for i, ids in enumerate(encoded) for t in range(1, len(ids))]
    held_texts = {index[r][0] for r in held.tolist()}
    train_texts = {index[r][0] for r in train.tolist()}
    assert stats["heldout_texts"] == 2 and not held_texts & train_texts
    assert len(train) + stats["heldout_candidates"] == len(index)  # every token of a training text trains
    assert _prefix_duplicates(encoded, train_texts, held.tolist()) == 0
    candidates = [r for r, (i, _) in enumerate(index) if i not in train_texts]
    assert stats["heldout_dropped"] == _prefix_duplicates(encoded, train_texts, candidates) > 0
    with pytest.raises(ValueError, match="at least 2 texts"):
        heldout_split(encoded[:1], 0.1, seed=0)


def test_trained_sae_quality_is_held_out_by_text_without_prefix_leaks(tiny_llama, isolated_cache):
    needs_sae_lens()
    import json

    from introspection_utils.experiments import sae_train
    from introspection_utils.experiments.sae import describe_quality, describe_sae, sae_quality

    sae = sae_train.train_sae(tiny_llama, 0, progress=False, **TINY_TRAIN)
    meta = sae.cfg.metadata
    folder = sae_train.sae_cache_folder(tiny_llama, sae_train.Corpus(**{
        k: v for k, v in TINY_TRAIN.items() if k in sae_train.Corpus.__dataclass_fields__}), sae_train.TrainSpec(**{
            k: v for k, v in TINY_TRAIN.items() if k in sae_train.TrainSpec.__dataclass_fields__}))
    texts = json.loads((folder / "corpus.json").read_text())["texts"]
    encoded = sae_train.encode_texts(tiny_llama, texts)
    train, held, stats = sae_train.heldout_split(encoded, 0.1, seed=0)
    assert meta["n_texts"] == len(texts) and meta["heldout_texts"] == stats["heldout_texts"] >= 1
    assert meta["n_heldout"] == len(held) and meta["heldout_dropped"] == stats["heldout_dropped"] > 0
    index = [(i, t) for i, ids in enumerate(encoded) for t in range(1, len(ids))]
    train_texts = {index[r][0] for r in train.tolist()}
    assert _prefix_duplicates(encoded, train_texts, held.tolist()) == 0
    # The old row split leaked: most of its held-out tokens had a prefix twin in training.
    rows = torch.randperm(len(index), generator=torch.Generator().manual_seed(0))
    n_old = max(1, int(0.1 * len(index)))
    old_train_rows, old_held = rows[n_old:].tolist(), rows[:n_old].tolist()
    old_prefixes = {tuple(encoded[index[r][0]][:index[r][1] + 1]) for r in old_train_rows}
    leaked = sum(tuple(encoded[index[r][0]][:index[r][1] + 1]) in old_prefixes for r in old_held) / n_old
    assert leaked > 0.2
    quality = sae_quality(tiny_llama, {0: sae})
    assert quality["source"].tolist() == ["trained here"] and quality["fve"].iloc[0] == pytest.approx(meta["fve"])
    line = describe_sae({0: sae})
    assert f"{meta['heldout_texts']} held-out texts" in line and "prefix duplicates of training tokens dropped" in line
    saved = describe_quality(quality)  # the findings' reading of the table notebook 09 saves
    assert saved.startswith("SAE layer 0 (trained here") and f"variance explained {meta['fve']:.1%}" in saved
    assert f"{meta['heldout_texts']} held-out texts" in saved


def test_pretrained_sae_quality_on_this_models_activations(tiny_llama):
    from introspection_utils.experiments.sae import QUALITY_COLUMNS, describe_sae, sae_quality
    from introspection_utils.experiments.sae_train import token_activations

    d = tiny_llama.arch.d_model
    texts = ["Hello there, how are you today?", "The cat sat on the mat and looked out of the window."]
    keep = torch.zeros(d)
    keep[:16] = 1
    half = hand_sae(torch.cat([torch.diag(keep), -torch.diag(keep)]), layer=1)  # reconstructs coordinates 0..15
    saes = {0: identity_sae(d, 0), 1: half}
    table = sae_quality(tiny_llama, saes, texts=texts)
    assert list(table.columns) == QUALITY_COLUMNS and set(table["source"]) == {"pretrained"}
    acts = token_activations(tiny_llama, texts, [0, 1])  # [N, 2, D]
    ident, partial = table.set_index("sae_layer").loc[0], table.set_index("sae_layer").loc[1]
    assert ident.fve == pytest.approx(1.0, abs=1e-5) and ident.l0 == pytest.approx(d)
    x = acts[:, 1]
    expected = 1 - x[:, 16:].pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean()
    assert partial.fve == pytest.approx(float(expected), rel=1e-4) and partial.l0 == pytest.approx(16)
    assert partial.n_tokens == len(acts) == sum(len(tiny_llama.tokenizer(t)["input_ids"]) - 1 for t in texts)
    text = describe_sae(saes, table)
    assert "variance explained 100.0%" in text and f"variance explained {float(expected):.1%}" in text


def test_every_feature_reading_carries_the_reconstruction_error_of_its_residuals(tiny_llama):
    from introspection_utils.engine.vectors import VectorBank
    from introspection_utils.experiments import sae as S

    handle = tiny_llama
    d = handle.arch.d_model
    keep = torch.zeros(d)
    keep[:32] = 1
    half = hand_sae(torch.cat([torch.diag(keep), -torch.diag(keep)]), layer=1)
    bank = VectorBank(("Sandwich",), torch.stack([torch.stack([unit(handle, 5, 1.0, 0).vector] * 2)]),
                      model=handle.name)
    saes = {0: identity_sae(d, 0), 1: half}
    table = S.sae_features(handle, saes, ["Sandwich"], layer=0, scale=30.0, n_controls=1, n_random=0, bank=bank)
    assert {"recon_error_without", "recon_error_with"} <= set(table.columns)
    exact = table[table["sae_layer"] == 0]
    assert (exact[["recon_error_without", "recon_error_with"]].abs() < 1e-6).all().all()
    prompt = introspection_prompt(handle)
    with_, without = residuals(handle, [Trial(prompt, bank.get("Sandwich", 0), 30.0), Trial(prompt)], [1])[:, 0]
    row = table[(table["sae_layer"] == 1) & (table["question_kind"] == "introspection")].iloc[0]
    assert row.recon_error_with == pytest.approx(float(with_[32:].pow(2).sum() / with_.pow(2).sum()), rel=1e-4)
    assert row.recon_error_without == pytest.approx(float(without[32:].pow(2).sum() / without.pow(2).sum()),
                                                    rel=1e-4)
    errors = S.reconstruction_errors(table)
    assert set(errors["sae_layer"]) == {0, 1} and (errors["n_trials"] == 1).all()
    yes = S.yes_features(handle, saes, k=3)
    assert "Reconstruction error on the residuals read" in S.describe_sae_features(table, yes, "Sandwich", k=5)


def test_sae_modules_import_only_downwards():
    import ast
    from pathlib import Path

    import introspection_utils

    root = Path(introspection_utils.__file__).parent

    def imports(name, folder="experiments"):
        tree = ast.parse((root / folder / f"{name}.py").read_text())
        return {node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("introspection_utils")}

    above = ("introspection_utils.plotting", "introspection_utils.readings")
    assert not {m for m in imports("sae_train") if m.startswith(above) or m == "introspection_utils.experiments.sae"}
    assert not {m for m in imports("sae") if m.startswith(above)}
    assert "introspection_utils.experiments.sae" in imports("sae", "plotting")
