"""bfloat16 end to end: every step runs on a bf16 model and agrees with the float32 plain-hook reference.

The bf16 model under test is the float32 one cast to bfloat16 (``as_bfloat16``), so the only difference from the
reference is the dtype. Tolerances are stated per readout and sized to bf16's 8-bit mantissa (relative rounding
2⁻⁹ per operation, compounded over the layers): logits within ``LOGIT_TOL × max(1, max|reference|)``, and the sign of
yes − no the same wherever the reference is further than that from zero (a flip there would change a reading).
The readout itself is float32 (:func:`introspection_utils.engine.measure.readout_logits`): tested directly below.
"""

from __future__ import annotations

import copy

import pytest
import torch

from introspection_utils.engine.generation import generate
from introspection_utils.engine.measure import Trial, measure, readout_logits, residuals
from introspection_utils.engine.prompts import control_questions, introspection_prompt
from introspection_utils.engine.vectors import ConceptVector, concept_vectors
from introspection_utils.experiments import attribution, patching
from introspection_utils.experiments.refusal import instruction_prompts, last_logits
from introspection_utils.models import handle as models
from introspection_utils.models.handle import ModelHandle, load_model, wrap_model

LOGIT_TOL = 0.04  # |bf16 − fp32| ≤ 0.04 × max(1, max|fp32|) for logits and their differences
MASS_TOL = 0.02  # answer mass (a probability): absolute
ATTENTION_TOL = 0.02  # attention weights (probabilities): absolute
COSINE_MIN = 0.995  # concept vectors: bf16 vs fp32 direction
DEEP_TOL = 0.08  # the embedded 30-layer model: rounding compounds over 15 times the tiny models' depth


def copied(handle: ModelHandle, dtype: torch.dtype, device: str = "cpu") -> ModelHandle:
    """A copy of ``handle`` with its weights cast to ``dtype`` on ``device`` (same tokenizer and architecture)."""
    model = copy.deepcopy(handle.torch_model).to(device, dtype)
    return ModelHandle(handle.name, wrap_model(model, handle.tokenizer), handle.tokenizer, handle.arch,
                       revision=f"{handle.revision}-{device}-{str(dtype).removeprefix('torch.')}", dtype=dtype)


def as_bfloat16(handle: ModelHandle) -> ModelHandle:
    """A bf16 copy of ``handle`` (same weights rounded to bfloat16, same tokenizer and architecture)."""
    return copied(handle, torch.bfloat16)


@pytest.fixture(scope="session")
def pair(tiny_perturbed):
    """``(fp32, bf16)``: each tiny family (perturbed norms, Gemma-2 in its softcap's curved range) and its bf16 copy."""
    return tiny_perturbed, as_bfloat16(tiny_perturbed)


def vector(handle, seed: int, layer: int = 0, norm: float = 8.0) -> ConceptVector:
    direction = torch.randn(handle.arch.d_model, generator=torch.Generator().manual_seed(seed))
    return ConceptVector(f"v{seed}", layer, direction / direction.norm() * norm, kind="random", seed=seed,
                         model=handle.name)


def trials_of(handle) -> list[Trial]:
    intro, control = introspection_prompt(handle), introspection_prompt(handle, control_questions(1)[0])
    v0, v1 = vector(handle, 1, layer=0), vector(handle, 2, layer=1)
    return [Trial(intro), Trial(intro, v0, 4.0), Trial(intro, v0, -3.0), Trial(intro, v1, 6.0),
            Trial(control), Trial(control, v0, 2.0), Trial(control, v1, 8.0, window="last")]


def assert_agrees(actual, expected, tol: float = LOGIT_TOL, what: str = "") -> float:
    """``|actual − expected| ≤ tol × max(1, max|expected|)``; returns the largest difference."""
    actual, expected = torch.as_tensor(actual).detach().float(), torch.as_tensor(expected).detach().float()
    bound = tol * max(1.0, float(expected.abs().max()))
    worst = float((actual - expected).abs().max())
    assert worst <= bound, f"{what}: max |bf16 − fp32| = {worst:.4f} > {bound:.4f}"
    return worst


def assert_same_sign(actual, expected, tol: float = LOGIT_TOL) -> None:
    actual, expected = torch.as_tensor(actual).float(), torch.as_tensor(expected).float()
    clear = expected.abs() > tol * max(1.0, float(expected.abs().max()))
    assert clear.any(), "no readout far enough from zero to check its sign"
    assert torch.equal(actual[clear].sign(), expected[clear].sign()), (actual, expected)


# ------------------------------------------------------------------ the float32 readout boundary


def test_readout_is_float32_and_equals_the_float32_model_on_upcast_activations(pair):
    fp32, bf16 = pair
    hidden = torch.randn(3, fp32.arch.d_model, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    rows = torch.tensor([5, 17, 300])
    got = readout_logits(bf16, hidden, rows)
    assert got.dtype == torch.float32
    # The fp32 model's own final norm and unembedding on the same (upcast) activations, by plain torch:
    with torch.no_grad():
        logits = fp32.torch_model.lm_head(fp32.torch_model.model.norm(hidden.float()))[:, rows]
        cap = fp32.arch.final_logit_softcap
        expected = cap * torch.tanh(logits / cap) if cap else logits
    # Only the norm's and unembedding's weights are bf16-rounded (inputs and arithmetic are float32):
    assert_agrees(got, expected, tol=0.01, what="readout")


def test_readout_of_a_float32_model_is_its_own_logits(tiny_perturbed, oracle):
    trials = trials_of(tiny_perturbed)
    oracle.assert_close(measure(tiny_perturbed, trials).logit_diff, oracle.logit_diff(tiny_perturbed, trials))


# ------------------------------------------------------------------ measure: yes−no, answer mass, lens, attention


def test_bf16_measure_agrees_with_the_float32_reference(pair, oracle):
    fp32, bf16 = pair
    trials = trials_of(fp32)
    got = measure(bf16, trials, lens=True)
    assert got.logit_diff.dtype == torch.float32 and got.lens.dtype == torch.float32
    expected = oracle.logit_diff(fp32, trials)
    assert_agrees(got.logit_diff, expected, what="yes−no")
    assert_same_sign(got.logit_diff, expected)
    assert_agrees(got.lens, oracle.lens(fp32, trials), what="lens")
    mass = measure(fp32, trials).answer_mass  # fp32 engine = reference within 1e-4 (tests/test_inject.py)
    assert float((got.answer_mass - mass).abs().max()) <= MASS_TOL
    assert (got.answer_mass <= 1 + 1e-6).all() and (got.answer_mass > 0).all()


def test_bf16_attention_agrees_with_the_float32_reference(pair, oracle):
    fp32, bf16 = pair
    trials = [t for t in trials_of(fp32) if t.injected][:3]
    got = measure(bf16, trials, attention=True)
    for i, trial in enumerate(trials):
        expected = oracle.attention(fp32, trial)
        assert float((got.attention_sum[i] - expected["sum"].float()).abs().max()) <= ATTENTION_TOL


def test_bf16_cached_and_full_strategies_agree(pair):
    _, bf16 = pair
    trials = trials_of(bf16)
    cached, full = measure(bf16, trials), measure(bf16, trials, strategy="full")
    assert_agrees(cached.logit_diff, full.logit_diff, what="cached vs full")


# ------------------------------------------------------------------ vectors, residuals, generation


def test_bf16_concept_vectors_point_where_the_float32_ones_do(pair, isolated_cache):
    fp32, bf16 = pair
    words, baseline = ["Sandwich", "Water"], ["Apple", "River", "Stone", "Music"]
    a = concept_vectors(fp32, words, baseline_words=baseline, cache=False)
    b = concept_vectors(bf16, words, baseline_words=baseline, cache=False)
    for word in words:
        for layer in range(fp32.arch.n_layers):
            va, vb = a.get(word, layer).vector, b.get(word, layer).vector
            assert vb.dtype == torch.float32  # stored float32; cast to the model's dtype when injected
            if float(va.norm()) < 1e-6:  # Gemma's sliding window hides the word from the last token at layer 0
                assert float(vb.norm()) < 1e-6
                continue
            assert float(torch.nn.functional.cosine_similarity(va, vb, dim=0)) >= COSINE_MIN


def test_bf16_residuals_agree_with_the_float32_engine(pair):
    fp32, bf16 = pair
    trials = trials_of(fp32)
    got, expected = residuals(bf16, trials, [0, 1]), residuals(fp32, trials, [0, 1])
    assert got.dtype == torch.float32
    assert_agrees(got, expected, tol=0.02, what="residuals")


def test_bf16_generation_runs_and_starts_like_float32_where_the_choice_is_clear(pair):
    fp32, bf16 = pair
    trials = [t for t in trials_of(fp32) if t.injected][:2]
    got = generate(bf16, trials, max_new_tokens=4)
    assert len(got) == len(trials) and all(isinstance(text, str) for text in got)
    for trial, text in zip(trials, got, strict=True):
        expected = generate(fp32, [trial], max_new_tokens=1)[0]
        if expected:  # the first generated token agrees unless fp32's top two are within bf16 rounding
            assert text.startswith(expected) or _margin(fp32, trial) < LOGIT_TOL * 30


def _margin(handle, trial) -> float:
    with torch.no_grad():
        logits = handle.torch_model(torch.tensor([trial.prompt.input_ids])).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


# ------------------------------------------------------------------ mechanisms, refusal


def test_bf16_attribution_and_patching_agree_with_float32(pair):
    fp32, bf16 = pair
    trials = [t for t in trials_of(fp32) if t.injected][:2]
    cap = fp32.arch.final_logit_softcap
    dla32 = attribution.totals(attribution.direct_logit_attribution(fp32, trials), cap)
    dla16 = attribution.totals(attribution.direct_logit_attribution(bf16, trials), cap)
    assert_agrees(dla16["diff"].to_numpy().copy(), dla32["diff"].to_numpy().copy(), what="attribution totals")
    sites = patching.default_sites(fp32, 0)
    p32 = patching.activation_patching(fp32, trials, sites)
    p16 = patching.activation_patching(bf16, trials, sites)
    assert_agrees(p16["patched"].to_numpy().copy(), p32["patched"].to_numpy().copy(), what="activation patching")


def test_bf16_ablated_logits_agree_with_float32(pair):
    fp32, bf16 = pair
    prompts = instruction_prompts(fp32, ["Explain how bread is made.", "Write a poem about the sea."])
    direction = torch.randn(fp32.arch.d_model, generator=torch.Generator().manual_seed(3))
    got, expected = last_logits(bf16, prompts, ablate=direction), last_logits(fp32, prompts, ablate=direction)
    assert got.dtype == torch.float32
    assert_agrees(got, expected, what="ablated logits")
    trials = trials_of(fp32)
    assert_agrees(measure(bf16, trials, ablate=direction).logit_diff,
                  measure(fp32, trials, ablate=direction).logit_diff, what="ablated yes−no")


# ------------------------------------------------------------------ the embedded model


def test_embedded_model_in_bf16_agrees_with_the_float32_reference(smollm, oracle):
    bf16 = load_model(dtype="bfloat16")  # from its own bf16-stored folder: the fp32 weights rounded once
    assert bf16.dtype == torch.bfloat16 and bf16.revision == smollm.revision
    for (name, a), (_, b) in zip(smollm.torch_model.state_dict().items(), bf16.torch_model.state_dict().items(),
                                 strict=True):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), name
    bank = concept_vectors(smollm, ["Sandwich"], baseline_words=["Apple", "River", "Stone", "Music"], cache=False)
    layer = 2 * smollm.arch.n_layers // 3
    v = bank.get("Sandwich", layer)
    intro, control = introspection_prompt(smollm), introspection_prompt(smollm, control_questions(1)[0])
    trials = [Trial(p, v, s) for p in (intro, control) for s in (0.0, 2.0, 4.0, 8.0)]
    got, expected = measure(bf16, trials).logit_diff, oracle.logit_diff(smollm, trials)
    assert_agrees(got, expected, tol=DEEP_TOL, what="embedded yes−no")
    assert_same_sign(got, expected, tol=DEEP_TOL)


# ------------------------------------------------------------------ choosing the dtype; the CUDA path on CPU


def test_bf16_conversion_is_a_folder_of_its_own_named_by_its_dtype(isolated_cache, monkeypatch):
    from introspection_utils.models import embedded

    calls = []

    def convert(gguf, out, chat_template=None, dtype=torch.float32):
        calls.append((out.name, dtype))
        (out / "model.safetensors").write_bytes(b"w" * (2 if dtype == torch.bfloat16 else 4))

    monkeypatch.setattr(embedded, "_convert_gguf", convert)
    fp32, bf16 = embedded.converted_dir(), embedded.converted_dir(dtype=torch.bfloat16)
    assert bf16.name == fp32.name + "-bfloat16" and fp32.parent == bf16.parent
    assert [dtype for _, dtype in calls] == [torch.float32, torch.bfloat16]
    assert embedded.converted_dir(dtype=torch.bfloat16) == bf16 and len(calls) == 2  # cached, not redone
    with pytest.raises(ValueError, match="stored in float32 or bfloat16, not torch.float16"):
        embedded.converted_dir(dtype=torch.float16)


def test_auto_dtype_follows_the_cpu_flags(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert models.cpu_flags(cpuinfo) == {"fpu", "sse", "avx2", "avx512f", "avx512_bf16"}
    assert models.fast_bfloat16("cpu", {"avx2", "amx_bf16"}) and not models.fast_bfloat16("cpu", {"avx2", "fma"})
    assert models.cpu_flags(tmp_path / "missing") == set()
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert load_model("tiny-llama", dtype="auto", device="cpu").dtype == torch.bfloat16
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx2"})
    assert load_model("tiny-llama", dtype="auto", device="cpu").dtype == torch.float32
    monkeypatch.setattr(models, "cpu_flags", lambda: {"avx512_bf16"})
    assert models.resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # a torch built without oneDNN
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.resolve_dtype(None, "cpu") == torch.float32  # the explicit default on a CPU


def test_auto_dtype_on_cuda_asks_for_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: calls.append(
        including_emulation) or True)
    assert models.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert calls == [False]  # emulated bf16 (pre-Ampere) is not the fast path
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert models.resolve_dtype("auto", "cuda:1") == torch.float32
    assert models.resolve_dtype(None, "cuda") == torch.bfloat16  # the explicit default on a GPU


@pytest.mark.parametrize("bad", ["float99", "int8", torch.int64])
def test_unknown_dtype_names_the_allowed_ones(bad):
    with pytest.raises(ValueError, match="unknown dtype .*'auto', 'float32', 'bfloat16', 'float16'"):
        load_model("tiny-llama", dtype=bad)


def test_a_model_asked_for_on_the_cpu_stays_there_on_a_gpu_machine(monkeypatch):
    """nnsight wraps the model in a transformers pipeline, which moves a model given no device to the first GPU:
    on an H200 ``load_model(..., device="cpu")`` came back on ``cuda:0``. Here CUDA is made to look present (any
    move towards it would fail on this CPU build of torch)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    handle = load_model("tiny-llama", device="cpu", dtype="float32")
    assert handle.device == torch.device("cpu")


def test_device_map_path_places_and_casts_on_cpu():
    """The GPU users' path (a local folder with ``device_map``, accelerate places the weights) run on the CPU."""
    from introspection_utils.models.embedded import converted_smollm2_dir

    handle = load_model(str(converted_smollm2_dir()), dtype="bfloat16", device="cpu", device_map="cpu")
    assert handle.device == torch.device("cpu") and handle.dtype == torch.bfloat16
    assert {p.dtype for p in handle.torch_model.parameters()} == {torch.bfloat16}
    trial = Trial(introspection_prompt(handle))
    readout = measure(handle, [trial])
    assert readout.logit_diff.dtype == torch.float32 and torch.isfinite(readout.logit_diff).all()


def test_the_findings_run_loads_every_notebook_in_the_auto_dtype():
    """``make findings`` passes ``dtype = "auto"`` to every notebook (bf16 on a CPU with AMX / AVX-512 BF16 or a
    CUDA GPU with bf16, float32 elsewhere), no notebook's table overrides it (a variant that reruns a notebook in
    another dtype is named after it), and every notebook loads its model with that parameter (so sweeps, the atlas,
    the tasks and the SAE training all run in it)."""
    import json

    from introspection_utils.core.data import tomllib
    from introspection_utils.core.paths import project_root

    root = project_root()
    findings = tomllib.loads((root / "data/findings/qwen2.5-coder-1.5b-instruct.toml").read_text(encoding="utf-8"))
    assert findings["all"]["dtype"] == "auto"
    assert not [name for name, table in findings.items() if isinstance(table, dict) and name != "all"
                and "." not in name and "dtype" in table]
    # a variant may run its notebook once more in another dtype (14.float32), and is then named after it, alone or
    # first (14.float32_extra_concepts)
    assert all(name.split(".", 1)[1].split("_")[0] == table["dtype"] for name, table in findings.items()
               if isinstance(table, dict) and "." in name and "dtype" in table)
    for path in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        parameters = next("".join(c["source"]) for c in cells if "parameters" in c["metadata"].get("tags", []))
        code = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert "\ndtype = " in f"\n{parameters}", f"{path.name} declares no dtype parameter"
        assert "load_model(model, dtype=dtype)" in code, f"{path.name} does not load its model in its dtype"
