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
WORD_LISTS = ("concept_words", "baseline_words", "control_questions", "control_questions_extra",
              "control_questions_yes_world", "control_questions_yes_self", "control_questions_ambiguous_world",
              "control_questions_ambiguous_self", "writeup_concepts",
              "sentences",
              "godet_localization_sentences", "godet_localization_contrastive_pairs", "refusal_harmful",
              "refusal_harmless")


def data_dir() -> Path:
    """The ``data/`` folder beside the package (``$INTROSPECTION_DATA`` overrides)."""
    path = Path(os.environ.get("INTROSPECTION_DATA") or Path(__file__).resolve().parents[2] / "data")
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
EXPECTED_ANSWERS = ("no", "yes", "ambiguous")  # the answer a control question expects ("ambiguous": none settled)


@dataclass(frozen=True)
class Question:
    """One question of the designed set: ``kind`` "introspection" or "control"; ``about`` "self" or "world"
    (introspection wordings are about the self); ``source`` where it is from.

    ``expected``: a control's expected answer (one of :data:`EXPECTED_ANSWERS`); an introspection wording's answer
    that reports an injected thought ("yes" for polarity +1, "no" for -1). ``polarity``: +1 a detect wording, -1 an
    inverted one, 0 a control. ``id`` names an introspection wording, ``counterpart`` the detect wording an inverted
    one matches; ``default``: asked by default runs; ``extended``: a control asked only with ``extended=True``.
    """

    text: str
    kind: str
    about: str
    source: str
    id: str = ""
    expected: str = "no"
    polarity: int = 0
    counterpart: str = ""
    default: bool = False
    extended: bool = False


def _wording(path: Path, entry: dict) -> Question:
    if not all(isinstance(entry.get(k), str) and entry[k].strip() for k in ("id", "text", "source")):
        raise ValueError(f"{path}: an [[introspection]] entry lacks id, text or source: {entry}")
    polarity = entry.get("polarity")
    if polarity not in (1, -1) or isinstance(polarity, bool):
        raise ValueError(f"{path}: wording {entry['id']!r} has polarity {polarity!r}; use 1 (detect: 'yes' reports "
                         f"an injected thought) or -1 (inverted: 'no' does)")
    if (polarity == -1) != bool(entry.get("counterpart")):
        raise ValueError(f"{path}: wording {entry['id']!r}: an inverted wording (polarity -1), and only it, names "
                         f"its detect `counterpart`")
    return Question(entry["text"], "introspection", "self", entry["source"], entry["id"],
                    "yes" if polarity == 1 else "no", polarity, entry.get("counterpart", ""),
                    bool(entry.get("default", False)))


@functools.cache
def load_questions() -> tuple[tuple[Question, ...], tuple[Question, ...]]:
    """``data/questions.toml``: ``(introspection wordings, control questions)``, each in file order.

    Validated: every wording has an id, a text, a source and a polarity (ids unique; an inverted wording names an
    existing detect counterpart); every control set names a word list, an ``expected`` answer (one of
    :data:`EXPECTED_ANSWERS`) and ``about`` tags (one per question, or one for the whole list), each one of
    :data:`QUESTION_TOPICS`; no question appears twice.
    """
    path = data_dir() / "questions.toml"
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    wordings = [_wording(path, entry) for entry in raw.get("introspection", [])]
    ids = {w.id: w for w in wordings}
    if not wordings or len(ids) != len(wordings):
        raise ValueError(f"{path}: needs at least one introspection wording, with unique ids")
    for w in wordings:
        if w.counterpart and (w.counterpart not in ids or ids[w.counterpart].polarity != 1):
            raise ValueError(f"{path}: wording {w.id!r} names counterpart {w.counterpart!r}, which is not a detect "
                             f"wording (available: {', '.join(i for i, q in ids.items() if q.polarity == 1)})")
    controls = []
    for entry in raw.get("control_set", []):
        questions, about = load_list(entry["list"]), entry.get("about", [])
        about = [about] * len(questions) if isinstance(about, str) else about
        expected = entry.get("expected")
        if (len(about) != len(questions) or not set(about) <= set(QUESTION_TOPICS) or not entry.get("source")
                or expected not in EXPECTED_ANSWERS):
            raise ValueError(f"{path}: control set {entry['list']!r} needs a source, an expected answer (one of "
                             f"{EXPECTED_ANSWERS}, got {expected!r}) and one 'about' tag per question "
                             f"({len(questions)}) or one for the list, each one of {QUESTION_TOPICS}")
        controls += [Question(q, "control", a, entry["source"], expected=expected,
                              extended=bool(entry.get("extended", False)))
                     for q, a in zip(questions, about, strict=True)]
    texts = [q.text for q in (*wordings, *controls)]
    if len(set(texts)) != len(texts):
        raise ValueError(f"{path}: a question appears twice")
    return tuple(wordings), tuple(controls)


@functools.cache
def load_answer_formats() -> dict[str, str]:
    """``data/questions.toml`` ``[answer_formats]``: the ``binary`` instruction and the ``prefill`` text, each with
    its ``*_source``."""
    path = data_dir() / "questions.toml"
    formats = tomllib.loads(path.read_text(encoding="utf-8")).get("answer_formats", {})
    for key in ("binary", "prefill"):
        if not str(formats.get(key, "")).strip() or not str(formats.get(f"{key}_source", "")).strip():
            raise ValueError(f"{path}: [answer_formats] needs a non-empty {key!r} and {key + '_source'!r}")
    return formats


def chat_template(name: str) -> str:
    """A Jinja chat template from ``data/chat_templates/<name>.jinja`` (for models whose files carry none)."""
    path = data_dir() / "chat_templates" / f"{name}.jinja"
    if not path.is_file():
        raise ValueError(f"no chat template {name!r} in {path.parent}")
    return path.read_text(encoding="utf-8")


def word_forms(word: str) -> frozenset[str]:
    """``word`` in lower case with its plural or singular ending changed ("Volcanoes" → volcanoes, volcanoe,
    volcano, ...): the project's one rule for when two words name the same concept (their forms meet) and for
    where a text mentions a concept (``experiments.grading``)."""
    stem = word.lower()
    return frozenset(f for f in (stem, stem.removesuffix("es"), stem.removesuffix("s"), stem + "s", stem + "es") if f)


MAX_CONCEPT_WORDS = 4


def validate_concept(word: str) -> str:
    """A concept is a word from the data lists, or any word or short phrase (up to :data:`MAX_CONCEPT_WORDS` words,
    one line, with letters: "ice cream" works, the paper's recipe asks "Tell me about ice cream"); anything else is a
    ``ValueError`` that points to contrastive vectors for longer text."""
    known = {w for name in ("concept_words", "baseline_words", "writeup_concepts") for w in load_list(name)}
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"concept {word!r} is empty or not a string")
    if word in known:
        return word
    if word != word.strip() or "\n" in word or not any(c.isalpha() for c in word) \
            or len(word.split()) > MAX_CONCEPT_WORDS:
        raise ValueError(f"concept {word!r}: a concept is a word or a phrase of up to {MAX_CONCEPT_WORDS} words on "
                         f"one line, with letters and no surrounding spaces; for a sentence or a contrast, use "
                         f"contrastive_vectors(handle, [(generic_text, specific_text)])")
    return word
