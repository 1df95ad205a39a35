"""Frozen rendered prompts (``data/rendered_prompts/<model>.json``), so that a template change shows as a diff:
``python -m introspection_utils.frozen_prompts`` writes them, ``--check`` compares."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from introspection_utils.core.data import load_questions
from introspection_utils.core.paths import atomic_write, model_name, project_root
from introspection_utils.engine.prompts import (
    Prompt,
    answer_set,
    extraction_prompt,
    introspection_prompt,
    question_prompts,
    yes_no_ids,
)
from introspection_utils.models.handle import ModelHandle, load_model

# the embedded models; others are added with this tool
FROZEN_MODELS = ("smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-1.5b-instruct")
EXTRACTION_WORD = "Sandwich"


def frozen_path(model: Any, folder: Path | None = None) -> Path:
    """``data/rendered_prompts/<model>.json`` (``model``: a handle or a name)."""
    return (folder or project_root() / "data" / "rendered_prompts") / f"{model_name(model)}.json"


def _entry(handle: ModelHandle, name: str, prompt: Prompt) -> dict[str, Any]:
    return {"name": name, "kind": prompt.kind, "text": prompt.text, "n_tokens": len(prompt),
            "injection_start": prompt.injection_start,
            "injected_text": handle.tokenizer.decode(list(prompt.input_ids[prompt.injection_start:])),
            "system": prompt.system, "hash": prompt.hash}


def render(handle: ModelHandle) -> dict[str, Any]:
    """The frozen record of ``handle``'s prompts: the paper frame's introspection prompt (every wording of
    ``data/questions.toml``) and every control question (in their balanced order), the introspection prompt and
    the first control in the "binary" and "prefill" answer formats, the bare frame's introspection prompt, the
    concept-extraction prompt, the yes/no answer token ids and the answer sets."""
    paper = question_prompts(handle)
    prompts = [_entry(handle, "introspection", paper[0])]
    prompts += [_entry(handle, f"control {k + 1:02d}", p) for k, p in enumerate(paper[1:])]
    wordings, _ = load_questions()
    prompts += [_entry(handle, f"introspection: {w.id}", introspection_prompt(handle, w.text))
                for w in wordings if w.id != "paper"]
    prompts += [_entry(handle, f"{name}, {fmt} format", introspection_prompt(handle, question, answer_format=fmt))
                for fmt in ("binary", "prefill") for name, question in (("introspection", None),
                                                                         ("control 01", paper[1].question))]
    prompts.append(_entry(handle, "introspection, bare frame", introspection_prompt(handle, frame="bare")))
    prompts.append(_entry(handle, f"extraction ({EXTRACTION_WORD})", extraction_prompt(handle, EXTRACTION_WORD)))
    yes, no = yes_no_ids(handle)
    return {"model": handle.name, "revision": handle.revision,
            "source": "rendered from data/prompts.toml and data/questions.toml by the model's chat template",
            "regenerate": f"python -m introspection_utils.frozen_prompts {handle.name}",
            "answer_token_ids": {"yes": yes, "no": no}, "answer_set": answer_set(handle).record(), "prompts": prompts}


def differences(frozen: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What changed between two records, one line per field (empty: identical)."""
    lines = [f"{key}: {frozen.get(key)!r} -> {current.get(key)!r}"
             for key in ("model", "revision", "source", "answer_token_ids", "answer_set")
             if frozen.get(key) != current.get(key)]
    old = {p["name"]: p for p in frozen.get("prompts", [])}
    new = {p["name"]: p for p in current.get("prompts", [])}
    lines += [f"{name}: {'removed' if name in old else 'added'}" for name in sorted(set(old) ^ set(new))]
    for name in [n for n in new if n in old]:
        lines += [f"{name}: {field} {old[name].get(field)!r} -> {value!r}"
                  for field, value in new[name].items() if old[name].get(field) != value]
    return lines


def write(handle: ModelHandle, folder: Path | None = None) -> Path:
    """Render ``handle``'s prompts into :func:`frozen_path` (atomically); returns the path."""
    text = json.dumps(render(handle), indent=1, ensure_ascii=False) + "\n"
    return atomic_write(frozen_path(handle, folder), text)


def check(handle: ModelHandle, folder: Path | None = None) -> list[str]:
    """:func:`differences` between the committed file and ``handle``'s prompts now (a missing file is one line)."""
    path = frozen_path(handle, folder)
    if not path.is_file():
        return [f"{path} does not exist: write it with `python -m introspection_utils.frozen_prompts {handle.name}`"]
    return differences(json.loads(path.read_text(encoding="utf-8")), render(handle))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=list(FROZEN_MODELS), help="model names (default: the embedded)")
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = parser.parse_args(argv)
    changed = False
    for name in args.models:
        handle = load_model(name)
        if args.check:
            lines = check(handle)
            changed |= bool(lines)
            print(f"{handle.name}: " + ("unchanged" if not lines else "CHANGED\n  " + "\n  ".join(lines)))
        else:
            print(write(handle))
    return 1 if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
