"""Where things go and what they are called (the repository root, a model's figures and results folders, its short
name), one atomic write, one content hash and the README's generated blocks; every folder above uses it."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any


def project_root() -> Path:
    """The repository folder holding ``figures/`` and ``data/`` (beside the package)."""
    return Path(__file__).resolve().parents[2]


def model_name(model: Any) -> str:
    """The short id of a handle or a model name, as ``load_model`` names it: ``"google/gemma-2-9b-it"`` →
    ``"gemma-2-9b-it"`` (the folder name under ``figures/``, ``data/results/`` and ``runs/``)."""
    return model.name if hasattr(model, "name") else str(model).rstrip("/").split("/")[-1].lower()


def figures_dir(model: Any, folder: str | Path | None = None) -> Path:
    """Where figures of ``model`` (a handle or a name) go: ``folder`` if given, else ``$INTROSPECTION_FIGURES``
    or ``<repo>/figures``, plus ``<model>/``. A given ``folder`` is used as is (no model sub-folder added)."""
    if folder is not None:
        return Path(folder)
    root = Path(os.environ.get("INTROSPECTION_FIGURES") or project_root() / "figures")
    return root / model_name(model)


def results_dir(model: Any, folder: str | Path | None = None) -> Path:
    """Where sweep tables of ``model`` go: ``folder`` if given, else ``<repo>/data/results/<model>/``; created if
    missing (a notebook run first, on a model never seen, writes its tables there)."""
    path = Path(folder) if folder is not None else project_root() / "data" / "results" / model_name(model)
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_hash(value: Any) -> str:
    """A short (16 hex digits) sha256 of ``value`` as sorted JSON (a dataclass by its fields): the name of a spec
    or a cache key, equal exactly when the content is."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def atomic_write(path: str | Path, content: str | bytes | Callable[[Path], Any]) -> Path:
    """Write ``path`` all at once or not at all: ``content`` (text, bytes, or a function that writes the file
    whose path it is given) goes to a temporary file in the same folder, which is then renamed over ``path``.
    A reader never sees half a file, and an interrupted write leaves no temporary file behind. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # created by the write: the umask's mode
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def replace_block(path: str | Path, name: str, text: str) -> Path:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path`` (e.g. the README) by
    ``text``, atomically: how measured numbers reach the README without being copied by hand."""
    path = Path(path)
    content = path.read_text(encoding="utf-8")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if content.count(start) != 1 or content.count(end) != 1 or content.index(start) > content.index(end):
        raise ValueError(f"{path} must hold exactly one {start} … {end} block")
    head, rest = content.split(start)
    _, tail = rest.split(end)
    return atomic_write(path, f"{head}{start}\n{text.strip()}\n{end}{tail}")


def read_block(path: str | Path, name: str) -> str:
    """The text of a :func:`replace_block` block."""
    content = Path(path).read_text(encoding="utf-8")
    return content.split(f"<!-- {name}:start -->")[1].split(f"<!-- {name}:end -->")[0].strip()


def checkpoint(folder: str | Path | None, name: str, key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()``, kept across interruptions: with ``folder``, the value is pickled to
    ``<folder>/.chunks/<name>-<content_hash(key)>.pkl`` (atomically) and read back by the next call with the same
    ``key`` — the sweeps' resume chunks, for any slow step (a generation pass, one judge criterion, one sentence set).
    ``key`` must name everything the value depends on (model, revision, the step's parameters); ``folder=None``
    just computes. Only files this function wrote are read (a local cache, not an exchange format)."""
    if folder is None:
        return compute()
    import pickle

    path = Path(folder) / ".chunks" / f"{name}-{content_hash(key)}.pkl"
    if path.is_file():
        with open(path, "rb") as f:
            return pickle.load(f)
    value = compute()
    atomic_write(path, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    return value
