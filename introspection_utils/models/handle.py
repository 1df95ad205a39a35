"""Load a chat model as one handle (:func:`load_model`): the nnsight model, its tokenizer and the architecture facts
every step needs; everything above ``models/`` takes a handle."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import numbers
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from nnsight import CONFIG, TransformersModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from introspection_utils.core import data
from introspection_utils.core.paths import model_name
from introspection_utils.models.embedded import (
    DEFAULT_MODEL,
    EMBEDDED,
    converted_dir,
    converted_gguf_dir,
    converted_smollm2_dir,
    gguf_revision,
    is_gguf_path,
)
from introspection_utils.models.families import FAMILIES, TINY, TINY_FAMILIES, TINY_FIELDS, Family
from introspection_utils.models.memory import check_fits
from introspection_utils.models.names import HUB_ALIASES as HUB_ALIASES  # re-exported: names used from here
from introspection_utils.models.names import check_device, hub_offline_check, resolve_name
from introspection_utils.models.names import known_names as known_names


@dataclass(frozen=True)
class Architecture:
    """Facts about a loaded model that the engine needs, independent of its family."""

    family: str  # the transformers class name, e.g. "Gemma2ForCausalLM"
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    final_logit_softcap: float | None  # Gemma-2: logits = cap * tanh(logits / cap)
    supports_system_role: bool  # Gemma templates reject a system message


class ModelHandle:
    """A loaded model: ``model`` (nnsight ``TransformersModel``), ``tokenizer``, ``arch`` and where its parts are.

    ``name`` is the short id used in file paths and result tables; ``revision`` pins the exact weights (a hub
    commit hash or the GGUF's sha256); ``remote`` says whether traces run on NDIF; ``source`` is what
    :func:`load_model` was given (a hub id, a folder, ``name`` for the embedded models), so that another process
    can load the same model (the Ray executor's actors).
    """

    def __init__(self, name: str, model: Any, tokenizer: Any, arch: Architecture, *, revision: str,
                 dtype: torch.dtype, remote: bool | str = False, base_model: bool = False,
                 source: str | None = None) -> None:
        self.name = name
        self.source = source or name
        self.model = model
        self.tokenizer = tokenizer
        self.arch = arch
        self.revision = revision
        self.dtype = dtype
        self.remote = remote
        self.base_model = base_model  # no chat tuning: reported to give high false-positive rates
        self._family = FAMILIES[arch.family]

    def __repr__(self) -> str:
        a = self.arch
        return (f"ModelHandle({self.name!r}, {a.family}, layers={a.n_layers}, d_model={a.d_model}, "
                f"heads={a.n_heads}, dtype={str(self.dtype).removeprefix('torch.')}, revision={self.revision[:24]!r})")

    @property
    def layers(self) -> Any:
        """The decoder layers (nnsight envoys); ``layers[i].output`` is the residual stream ``[B, T, D]``."""
        return _get_path(self.model, self._family.layers)

    @property
    def embeddings(self) -> Any:
        """The token-embedding module; its output is the residual stream before layer 0, ``[B, T, D]``."""
        return _get_path(self.model, self._family.embeddings)

    @property
    def final_norm(self) -> Any:
        return _get_path(self.model, self._family.final_norm)

    @property
    def lm_head(self) -> Any:
        return _get_path(self.model, self._family.lm_head)

    def attention(self, layer: int) -> Any:
        """The self-attention module of ``layer``; its output is ``(attn_output, attn_weights [B, H, Tq, Tk])``."""
        return self.layers[layer].self_attn

    @property
    def sublayer_norms(self) -> bool:
        """Whether the family norms the attention and MLP outputs before the residual add (Gemma-2/3)."""
        return self._family.sublayer_norms

    def attention_out(self, layer: int) -> Any:
        """The module whose output is what attention adds to the residual stream at ``layer``: Gemma-2/3's
        post-attention norm (output ``[B, T, D]``), else the self-attention (output ``(attn_output, weights)``)."""
        return self.layers[layer].post_attention_layernorm if self._family.sublayer_norms else self.attention(layer)

    def mlp_out(self, layer: int) -> Any:
        """The module whose output ``[B, T, D]`` is what the MLP adds to the residual stream at ``layer``: Gemma-2/3's
        post-feedforward norm, else the MLP itself."""
        return self.layers[layer].post_feedforward_layernorm if self._family.sublayer_norms else self.layers[layer].mlp

    def output_projection(self, layer: int) -> Any:
        """The attention's output projection (W_O); its input ``[B, T, n_heads × head_dim]`` is the heads' outputs
        side by side, head ``h`` in columns ``h × head_dim .. (h + 1) × head_dim``."""
        return self.attention(layer).o_proj

    @property
    def head_dim(self) -> int:
        return self.output_projection(0)._module.in_features // self.arch.n_heads

    @property
    def torch_model(self) -> torch.nn.Module:
        """The underlying plain PyTorch module (for hooks, state dicts, parameter counts)."""
        return self.model._module

    @property
    def device(self) -> torch.device:
        return next(self.torch_model.parameters()).device

    def check_layer(self, layer: int) -> int:
        """Return ``layer`` if it is a valid decoder-layer index, else raise one clear ``ValueError``."""
        return check_layer_index(layer, self.arch.n_layers, self.name)


def check_layer_index(layer: Any, n_layers: int, model: str) -> int:
    """``layer`` as an int if it indexes one of ``model``'s ``n_layers`` decoder layers, else the one error."""
    allowed = f"0..{n_layers - 1}"
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise ValueError(f"layer {layer!r} is not a layer index: {model} has decoder layers {allowed} (integers)")
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer!r} is out of range for {model} ({allowed})")
    return int(layer)


def wrap_model(hf_model: Any, tokenizer: Any) -> TransformersModel:
    """``hf_model`` wrapped for tracing, left on the device it is on.

    nnsight wraps a loaded module in a transformers pipeline, and a pipeline given no device moves the model to the
    first GPU when one is visible: ``load_model(..., device="cpu")`` on a GPU machine came back on ``cuda:0``
    (seen on an H200). Naming the model's own device keeps it where it was put; a model sharded by ``device_map``
    is never moved by the pipeline, so it is given none.
    """
    if getattr(hf_model, "hf_device_map", None):
        return TransformersModel(hf_model, tokenizer=tokenizer)
    return TransformersModel(hf_model, tokenizer=tokenizer, device=next(hf_model.parameters()).device)


def _get_path(obj: Any, path: str) -> Any:
    for attr in path.split("."):
        obj = getattr(obj, attr)
    return obj


def _test_tokenizer(family: Family) -> Any:
    """The embedded model's tokenizer for a test model (tiny or random) of ``family``, with the family's template."""
    tokenizer = AutoTokenizer.from_pretrained(converted_smollm2_dir())
    if family.template is not None:
        tokenizer.chat_template = data.chat_template(family.template)
    return tokenizer


def _load_tiny(family: str, dtype: torch.dtype, attn: str) -> tuple[Any, Any, str]:
    if family not in TINY:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    tokenizer = _test_tokenizer(TINY[family])
    torch.manual_seed(0)  # the same tiny model every time
    config = TINY[family].tiny_config({"vocab_size": len(tokenizer), **TINY_FIELDS})
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model, tokenizer, f"random-init-seed0-{family}"


def _load_random(config_name: str, dtype: torch.dtype, attn: str, device: str) -> tuple[Any, Any, str]:
    """A randomly initialised model with a real model's exact shape (``data/model_configs/<name>.json``)."""
    path = data.data_dir() / "model_configs" / f"{config_name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.json"))
        raise ValueError(f"no model config {config_name!r}; available: {', '.join(known)}")
    fields = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    config = AutoConfig.for_model(**fields)
    check_fits(config, dtype, torch.device(device), name=f"random:{config_name}")
    architecture = (getattr(config, "architectures", None) or ["?"])[0]
    if architecture not in FAMILIES:
        raise ValueError(f"model config {config_name!r}: architecture {architecture} is not supported; supported: "
                         f"{', '.join(sorted(FAMILIES))}")
    tokenizer = _test_tokenizer(FAMILIES[architecture])
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: a 9B model never passes through CPU memory
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model, tokenizer, f"random-init-seed0-{config_name}"


def _supports_system_role(tokenizer: Any) -> bool:
    """Whether the template gives a system message a turn of its own.

    Gemma-2's template raises; Gemma-3's folds the system text into the first user turn (no role of its own).
    """
    system, user = "\u00a7system\u00a7", "\u00a7user\u00a7"
    try:
        with_system = tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": user}], tokenize=False)
    except Exception:
        return False
    folded = tokenizer.apply_chat_template([{"role": "user", "content": f"{system}\n\n{user}"}], tokenize=False)
    return system in with_system and with_system != folded


def architecture_of(hf_model: torch.nn.Module, tokenizer: Any) -> Architecture:
    """Read the architecture facts off a plain transformers model; unsupported classes get one clear error."""
    family = type(hf_model).__name__
    if family not in FAMILIES:
        raise ValueError(f"architecture {family} is not supported; supported: {', '.join(sorted(FAMILIES))}. "
                         f"Add its entry to introspection_utils.models.families.FAMILIES.")
    cfg = hf_model.config.get_text_config()
    return Architecture(
        family=family, n_layers=cfg.num_hidden_layers, d_model=cfg.hidden_size, n_heads=cfg.num_attention_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        vocab_size=cfg.vocab_size, final_logit_softcap=getattr(cfg, "final_logit_softcapping", None),
        supports_system_role=_supports_system_role(tokenizer))


# CPU flags (``/proc/cpuinfo``) of the instructions oneDNN uses for bfloat16 matmuls: AMX tiles (Sapphire Rapids on)
# and AVX-512 BF16 (Cooper Lake, Zen 4). Without them torch computes bfloat16 matmuls by converting to float32 in a
# generic kernel: measured several times *slower* than float32 on an AVX2-only AMD EPYC (Zen 3).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports (the first ``flags`` line of ``path``); empty where there is none
    (macOS, Windows)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def fast_bfloat16(device: str | torch.device, flags: set[str] | None = None) -> bool:
    """Whether bfloat16 is this device's fast path: a CUDA device with native bf16 (Ampere and later), or a CPU
    with AMX / AVX-512 BF16 (``flags``: default :func:`cpu_flags`) and a torch with oneDNN (whose kernels use them)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    has = device.type == "cpu" and bool(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
    return has and torch.backends.mkldnn.is_available()


DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: str | torch.dtype | None = None, device: str | None = None) -> torch.dtype:
    """The dtype ``load_model(dtype=dtype, device=device)`` loads in: ``None``: float32 on CPU, bfloat16 on CUDA;
    ``"auto"``: bfloat16 on a fast path (:func:`fast_bfloat16`), else float32; a name or a ``torch.dtype``: it."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype == "auto":
        return torch.bfloat16 if fast_bfloat16(device) else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(map(repr, DTYPES))}")
        return getattr(torch, dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(map(repr, DTYPES))}")
    return dtype


def load_model(name: str = DEFAULT_MODEL, *, dtype: str | torch.dtype | None = None, device: str | None = None,
               attn: str = "eager", remote: bool | str = False, device_map: str | dict | None = None
               ) -> ModelHandle:
    """Load ``name`` (the embedded default, a ``tiny-*`` test model, a hub id or a local folder) as a handle.

    ``attn="eager"`` is the default because attention weights (and Gemma-2's softcapping) need it.
    ``remote=True`` runs every trace on NDIF (a hub id; ``NDIF_API_KEY`` in the environment); ``remote="local"``
    loads the model here but sends each trace through nnsight's serialization with local modules hidden — a dry
    run proving the experiment's trace code would run remotely.
    ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA; ``"auto"`` picks bfloat16 where the device runs it
    fast (a CUDA GPU with bf16, a CPU with AMX or AVX-512 BF16) and float32 elsewhere. In bfloat16 the readouts are
    still float32 (:func:`introspection_utils.engine.measure.readout_logits`). ``device_map="auto"`` shards a hub or
    local model
    over the visible GPUs (accelerate); without it, a model whose weights cannot fit on ``device`` is refused
    before loading, with the sizes in the message.
    """
    if remote not in (False, True, "local"):
        raise ValueError(f"remote must be False, True (NDIF) or 'local' (a dry run of the remote path), got {remote!r}")
    if remote is True:
        return _load_remote(name)
    name = resolve_name(name)
    if device is not None:
        check_device(device)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    base_model = False
    if name in EMBEDDED or is_gguf_path(name):
        stored = torch.bfloat16 if torch_dtype == torch.bfloat16 else torch.float32  # a bf16 folder: half the disk
        folder = converted_dir(name, stored) if name in EMBEDDED else converted_gguf_dir(name, stored)
        check_fits(AutoConfig.from_pretrained(folder), torch_dtype, torch.device(device), name=name)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, attn_implementation=attn)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        revision = gguf_revision(folder)
        base_model = name in EMBEDDED and EMBEDDED[name].base_model
    elif name.startswith("tiny-"):
        hf_model, tokenizer, revision = _load_tiny(name.removeprefix("tiny-"), torch_dtype, attn)
    elif name.startswith("random:"):
        hf_model, tokenizer, revision = _load_random(name.removeprefix("random:"), torch_dtype, attn, device)
    elif Path(name).is_dir() or "/" in name:
        local = {"local_files_only": True} if hub_offline_check(name) else {}
        try:
            if device_map is None:
                check_fits(AutoConfig.from_pretrained(name, **local), torch_dtype, torch.device(device), name=name)
            hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, attn_implementation=attn,
                                                            device_map=device_map, **local)
            tokenizer = AutoTokenizer.from_pretrained(name, **local)
        except (OSError, ValueError) as err:
            raise ValueError(f"could not load model {name!r}: not a local folder with a model, and not "
                             f"downloadable here ({err.__class__.__name__}: {str(err)[:300]}). Check the id, or "
                             f"download the weights and pass their folder.") from err
        revision = getattr(hf_model.config, "_commit_hash", None) or _folder_revision(Path(name))
    else:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(map(repr, EMBEDDED))} (embedded), "
                         f"{', '.join('tiny-' + f for f in TINY_FAMILIES)}, a Hugging Face hub id "
                         f"(e.g. 'google/gemma-2-9b-it'), a local folder or a local .gguf file")
    arch = architecture_of(hf_model, tokenizer)
    if tokenizer.chat_template is None:
        raise ValueError(f"{name} has no chat template; the experiments need a chat model "
                         f"(set tokenizer.chat_template yourself for a base model)")
    tokenizer.padding_side = "left"  # the last position is every row's real last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device_map is None:
        hf_model.to(device)
    hf_model.eval()
    model = wrap_model(hf_model, tokenizer)
    short = model_name(name).removesuffix(".gguf")
    return ModelHandle(short, model, tokenizer, arch, revision=revision, dtype=torch_dtype, base_model=base_model,
                       remote=remote, source=name)


def _load_remote(name: str) -> ModelHandle:
    """A model hosted on NDIF: weights stay on the server, traces ship there (``NDIF_API_KEY`` from the env).

    Fails fast, with what to do, when the name is not a hub id, the key is missing or NDIF is unreachable.
    """
    if name in EMBEDDED or is_gguf_path(name) or name.startswith(("tiny-", "random:")) or Path(name).is_dir():
        raise ValueError(f"remote=True needs a Hugging Face hub id hosted on NDIF (e.g. "
                         f"'meta-llama/Llama-3.1-70B-Instruct'), not {name!r}; remote='local' dry-runs the remote "
                         f"path on a local model")
    key = os.environ.get("NDIF_API_KEY")
    if not key:
        raise ValueError("remote=True needs an NDIF API key in the environment variable NDIF_API_KEY "
                         "(sign up at https://login.ndif.us)")
    CONFIG.API.APIKEY = key
    host = urlparse(CONFIG.API.HOST)
    try:
        socket.create_connection((host.hostname, host.port or (443 if host.scheme == "https" else 80)),
                                 timeout=5).close()
    except OSError as err:
        raise ConnectionError(f"NDIF at {CONFIG.API.HOST} is unreachable from here ({err}); remote runs need "
                              f"network access to it and to the Hugging Face hub") from err
    model = TransformersModel(name)  # config and tokenizer from the hub; weights stay meta, on the server
    arch = architecture_of(model._module, model.tokenizer)
    model.tokenizer.padding_side = "left"
    if model.tokenizer.pad_token is None:
        model.tokenizer.pad_token = model.tokenizer.eos_token
    revision = getattr(model._module.config, "_commit_hash", None) or "ndif"
    return ModelHandle(model_name(name), model, model.tokenizer, arch, revision=revision,
                       dtype=torch.bfloat16, remote=True, source=name)


def _folder_revision(folder: Path) -> str:
    """A revision for a local folder without git metadata: hash of its config and weight file sizes."""
    digest = hashlib.sha256()
    for p in sorted(folder.glob("*")):
        if p.is_file() and p.suffix in {".json", ".safetensors", ".bin"}:
            digest.update(f"{p.name}:{p.stat().st_size}".encode())
    return "local-" + digest.hexdigest()[:16]


def package_version() -> str:
    try:
        return importlib.metadata.version("introspection-utils")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
