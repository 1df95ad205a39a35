"""Model names: which model a name means, checked without loading anything (:func:`resolve_name`), the names
:func:`introspection_utils.models.handle.load_model` knows, and the checks made before a load (the device is
present; a hub id is cached or the hub can be reached)."""

from __future__ import annotations

import difflib
import os
import socket
from pathlib import Path

import torch

from introspection_utils.models.embedded import DEFAULT_MODEL, EMBEDDED, is_gguf_path
from introspection_utils.models.families import TINY_FAMILIES

# The embedded models answer to the hub ids of the models they are quantised from (their GGUF conversions, so
# numbers differ slightly from the hub's full-precision weights; pass a local folder of those to use them instead).
HUB_ALIASES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": DEFAULT_MODEL,
    "Qwen/Qwen2.5-Coder-1.5B-Instruct": "qwen2.5-coder-1.5b-instruct",
    "google/gemma-3-270m": "gemma3-270m",
}


def known_names() -> list[str]:
    """The model names ``load_model`` knows without a path or a hub id: embedded, their hub ids, tiny test models."""
    return [*EMBEDDED, *(f"tiny-{f}" for f in TINY_FAMILIES), *sorted(HUB_ALIASES)]


def resolve_name(name: str) -> str:
    """``name`` as :func:`load_model` loads it, checked without loading anything: an embedded model (also by its hub
    id, case-insensitive), a ``tiny-*`` or ``random:*`` test model, a local ``.gguf`` file or folder (which must
    exist), or a hub id ``org/name``. Anything else is one ``ValueError`` with the closest known names."""
    if not isinstance(name, str) or not name.strip():
        raise TypeError(f"model name must be a non-empty string, got {name!r}")
    if name in EMBEDDED or name.startswith(("random:", "tiny-")):  # tiny-<family>, random:<config>: checked by loading
        return name
    aliases = {k.lower(): v for k, v in HUB_ALIASES.items()}
    if name.lower() in aliases:
        return aliases[name.lower()]
    if name.lower() in EMBEDDED:
        return name.lower()
    if is_gguf_path(name):
        if not Path(name).expanduser().is_file():
            raise ValueError(f"no GGUF file at {Path(name).expanduser().resolve()} (model {name!r})")
        return name
    if Path(name).expanduser().is_dir():
        return name
    if name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/")):
        return name  # a hub id: whether it can be had is checked when it loads (fast when offline)
    if "/" in name or name.startswith((".", "~")):
        raise ValueError(f"model folder {name!r} does not exist")
    by_lower = {k.lower(): k for k in known_names()}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.4)
    close += [k for k in by_lower if name.lower() in k and k not in close][:3 - len(close)]
    close = [by_lower[k] for k in close]
    hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
    raise ValueError(f"unknown model {name!r}: {hint}Use one of {', '.join(map(repr, EMBEDDED))} (embedded), "
                     f"{', '.join('tiny-' + f for f in TINY_FAMILIES)}, a Hugging Face hub id "
                     f"(e.g. 'google/gemma-2-9b-it'), a local folder or a local .gguf file")


def is_hub_id(name: str) -> bool:
    """Whether a :func:`resolve_name` result is a hub id (``org/name``) rather than an embedded, test or local model."""
    return (name not in EMBEDDED and not name.startswith(("random:", "tiny-")) and not is_gguf_path(name)
            and not Path(name).expanduser().is_dir() and name.count("/") == 1)


def layer_count(name: str) -> int | None:
    """How many decoder layers model ``name`` has, read from its config alone (no weights): a tiny or ``random:``
    model, an embedded model once converted, a local folder, a hub id in the local cache. ``None`` where only
    loading would tell (a GGUF not yet converted, a hub id not cached): the check then happens at load."""
    import json

    from introspection_utils.core.data import data_dir
    from introspection_utils.models.embedded import cache_dir
    from introspection_utils.models.families import TINY_FIELDS

    name = resolve_name(name)
    if name.startswith("tiny-"):
        return TINY_FIELDS["num_hidden_layers"]
    path: Path | None = None
    if name.startswith("random:"):
        path = data_dir() / "model_configs" / f"{name.removeprefix('random:')}.json"
    elif name in EMBEDDED:
        folders = sorted((cache_dir() / "models").glob(f"{name}-*/config.json"))
        path = folders[0] if folders else None
    elif Path(name).expanduser().is_dir():
        path = Path(name).expanduser() / "config.json"
    elif not is_gguf_path(name):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    layers = config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers")
    return int(layers) if layers else None


def hub_offline_check(name: str) -> bool:
    """For a hub id: ``True`` when it must load from the local cache only (offline), after checking it is there;
    raises one ``ValueError`` at once when it is neither cached nor reachable (instead of waiting out the hub
    client's retries)."""
    if Path(name).expanduser().is_dir():
        return False
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    if not offline:
        try:
            socket.create_connection(("huggingface.co", 443), timeout=3).close()
        except OSError:
            offline = True
    if offline and not cached:
        raise ValueError(f"model {name!r} is not in the local Hugging Face cache and the hub cannot be reached "
                         f"(offline or HF_HUB_OFFLINE set). Download it where there is network "
                         f"(`hf download {name}`, the CLI of huggingface_hub) and pass its folder, or use an "
                         f"embedded model: {', '.join(map(repr, EMBEDDED))}")
    return offline


def check_device(device: str) -> None:
    kind = str(device).split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}, "
                         f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}); use "
                         f"device='cpu' or leave device=None to pick what is present")
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r}: Apple MPS is not available here; use device='cpu' or None")
    if kind not in {"cpu", "cuda", "mps", "meta", "xpu"}:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or None (what is present)")
