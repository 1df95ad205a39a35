"""Word lists, prompts and chat templates from the repository's ``data/`` folder, loaded and validated.

Every file there starts with ``# Source: ...`` lines; the words and prompts are verbatim from that source.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# Duplicates that are the source's own, kept verbatim (documented in the files' headers).
KNOWN_DUPLICATES = {"baseline_words": {"Butterflies"}}
WORD_LISTS = ("concept_words", "baseline_words", "control_questions", "control_questions_extra", "writeup_concepts",
              "sentences",
              "godet_localization_sentences", "godet_localization_contrastive_pairs", "refusal_harmful",
              "refusal_harmless")


def data_dir() -> Path:
    """The ``data/`` folder beside the package (``$INTROSPECTION_DATA`` overrides)."""
    path = Path(os.environ.get("INTROSPECTION_DATA") or Path(__file__).resolve().parent.parent / "data")
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {path} not found; install the package from its repository "
                                f"(pip install -e .) or set INTROSPECTION_DATA")
    return path


@dataclass(frozen=True)
class WordList:
    """Lines of one data file, in the source's order, with the source line(s) from its header."""

    name: str
    items: tuple[str, ...]
    source: str

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@functools.cache
def load_list(name: str) -> WordList:
    """Load ``data/<name>.txt``: ``#`` header lines are the source, every other line is one item.

    Raises ``ValueError`` on an empty line, surrounding whitespace, a missing source, or a duplicate that the
    source itself doesn't have (see ``KNOWN_DUPLICATES``).
    """
    if name not in WORD_LISTS:
        raise ValueError(f"unknown word list {name!r}; available: {', '.join(WORD_LISTS)}")
    path = data_dir() / f"{name}.txt"
    header, items = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith("#"):
            header.append(line.lstrip("# ").rstrip())
            continue
        if not line.strip() or line != line.strip():
            raise ValueError(f"{path}:{number}: empty line or surrounding whitespace: {line!r}")
        items.append(line)
    if not header or not header[0].startswith("Source:"):
        raise ValueError(f"{path} must start with a '# Source: ...' line")
    seen: set[str] = set()
    for item in items:
        if item in seen and item not in KNOWN_DUPLICATES.get(name, set()):
            raise ValueError(f"{path}: duplicate item {item!r} not in the source's own duplicates")
        seen.add(item)
    return WordList(name, tuple(items), " ".join(header))


@functools.cache
def load_prompts() -> dict[str, Any]:
    """``data/prompts.toml`` as a dict of sections, each with a ``source``."""
    prompts = tomllib.loads((data_dir() / "prompts.toml").read_text(encoding="utf-8"))
    for section, fields in prompts.items():
        if not fields.get("source"):
            raise ValueError(f"data/prompts.toml: section [{section}] has no source")
        empty = [k for k, v in fields.items() if isinstance(v, str) and not v.strip() and k != "separator"]
        if empty:
            raise ValueError(f"data/prompts.toml: [{section}] has empty fields {empty}")
    return prompts


QUESTION_TOPICS = ("self", "world")  # what a control question is about: the model itself, or facts


@dataclass(frozen=True)
class Question:
    """One question of the designed set: ``kind`` "introspection" or "control"; ``about`` "self" or "world"
    (introspection wordings are about the self); ``id`` names an introspection wording; ``source`` where it is from."""

    text: str
    kind: str
    about: str
    source: str
    id: str = ""


@functools.cache
def load_questions() -> tuple[tuple[Question, ...], tuple[Question, ...]]:
    """``data/questions.toml``: ``(introspection wordings, control questions)``, each in file order.

    Validated: every wording has an id, a text and a source (ids unique); every control set names a word list whose
    length matches its ``about`` tags, each tag one of :data:`QUESTION_TOPICS`; no question appears twice.
    """
    path = data_dir() / "questions.toml"
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    wordings = []
    for entry in raw.get("introspection", []):
        if not all(entry.get(k, "").strip() for k in ("id", "text", "source")):
            raise ValueError(f"{path}: an [[introspection]] entry lacks id, text or source: {entry}")
        wordings.append(Question(entry["text"], "introspection", "self", entry["source"], entry["id"]))
    if not wordings or len({w.id for w in wordings}) != len(wordings):
        raise ValueError(f"{path}: needs at least one introspection wording, with unique ids")
    controls = []
    for entry in raw.get("control_set", []):
        questions, about = load_list(entry["list"]), entry.get("about", [])
        if len(about) != len(questions) or not set(about) <= set(QUESTION_TOPICS) or not entry.get("source"):
            raise ValueError(f"{path}: control set {entry['list']!r} needs a source and one 'about' tag per question "
                             f"({len(questions)}), each one of {QUESTION_TOPICS}")
        controls += [Question(q, "control", a, entry["source"]) for q, a in zip(questions, about, strict=True)]
    texts = [q.text for q in (*wordings, *controls)]
    if len(set(texts)) != len(texts):
        raise ValueError(f"{path}: a question appears twice")
    return tuple(wordings), tuple(controls)


def chat_template(name: str) -> str:
    """A Jinja chat template from ``data/chat_templates/<name>.jinja`` (for models whose files carry none)."""
    path = data_dir() / "chat_templates" / f"{name}.jinja"
    if not path.is_file():
        raise ValueError(f"no chat template {name!r} in {path.parent}")
    return path.read_text(encoding="utf-8")
