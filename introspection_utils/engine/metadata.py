"""How a result was made: the metadata every saved table carries (model, revision, dtype, the prompts' hash, the
experiment's parameters, the answer set, versions, time), and :func:`save_table`, which saves any table with it
through the results store (:mod:`introspection_utils.core.results`).
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nnsight
import pandas as pd
import torch
import transformers

from introspection_utils.core.paths import content_hash
from introspection_utils.core.results import SweepResult
from introspection_utils.engine.prompts import answer_set, introspection_prompt, question_prompts
from introspection_utils.models.handle import package_version

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle


def metadata(handle: ModelHandle, spec: Mapping[str, Any], prompt_hashes: Sequence[str]) -> dict:
    """Everything needed to say how a result was made: model, revision, dtype, the prompts' hash, the experiment's
    ``spec`` (any experiment's parameters as a plain mapping, e.g. ``asdict(SweepSpec)``; its ``seed`` and its
    content hash recorded beside it), the ``answer_format`` (``spec["answer_format"]``, default "open") and the
    ``answer_set`` read (the yes and no tokens and ids of :func:`prompts.answer_set` for ``spec["answers"]``),
    package and library versions, time."""
    return {
        "model": handle.name, "revision": handle.revision, "dtype": str(handle.dtype).removeprefix("torch."),
        "family": handle.arch.family, "prompt_hash": hashlib.sha256("".join(prompt_hashes).encode()).hexdigest()[:16],
        "seed": spec.get("seed"), "spec": dict(spec), "spec_hash": content_hash(dict(spec)),
        "answer_format": spec.get("answer_format", "open"),
        "answer_set": answer_set(handle, spec.get("answers")).record(),
        "package_version": package_version(), "torch": torch.__version__, "nnsight": nnsight.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save_table(handle: ModelHandle, df: pd.DataFrame, folder: str | Path, name: str, **spec: Any) -> Path:
    """Any result table (a top-heads table, refusal scores, SAE features, ...) saved the way sweeps are:
    ``folder/name.csv`` beside ``name.meta.json`` (:func:`metadata`: model, revision, dtype, seed, versions and
    ``spec``, the parameters that made it). The prompt hash covers the question prompts the experiments share: the
    introspection prompt and the first ``spec["n_controls"]`` control questions (the introspection prompt alone
    when there is no ``n_controls``). Returns the CSV path."""
    n_controls, answer_format = spec.get("n_controls"), spec.get("answer_format", "open")
    prompts = (question_prompts(handle, n_controls, answer_format=answer_format) if n_controls
               else [introspection_prompt(handle, answer_format=answer_format)])
    return SweepResult(df, metadata(handle, spec, [p.hash for p in prompts])).save(Path(folder) / name)
