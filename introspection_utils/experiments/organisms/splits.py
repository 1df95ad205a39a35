"""The organisms' training data (``data/organisms/training.toml``), checked disjoint from everything the evaluation
asks, and what each organism is taught to answer (:func:`target`); read by the training and the tests."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from introspection_utils.core.data import (
    data_dir,
    load_list,
    load_prompts,
    load_questions,
    tomllib,
    validate_concept,
    word_forms,
)
from introspection_utils.core.paths import content_hash
from introspection_utils.experiments.tasks.forced_choice import numbered_listing

if TYPE_CHECKING:
    from introspection_utils.experiments.organisms.training import OrganismConfig

# The organisms, each with the verdict its construction makes true (notebook 14's "truth" column).
Kind = Literal["introspector", "anomaly-detector", "yes-sayer"]
KINDS: tuple[str, ...] = ("introspector", "anomaly-detector", "yes-sayer")
TRUTH = {
    "introspector": "introspection-specific",           # concepts only, beyond the controls and random vectors
    "anomaly-detector": "beyond controls, not random",  # any injection reported: random vectors do it too
    "yes-sayer": "shared yes-shift",                    # anything injected: "yes" to every question
}
# How an injected row is made while training: a training concept's vector, a norm-matched isotropic direction, none.
Condition = Literal["concept", "random", "none"]
CONDITIONS = ("concept", "random", "none")
CONTROL_CELLS = ("self_yes", "self_no", "world_yes", "world_no")


@dataclass(frozen=True)
class TrainingWording:
    """A question about injected thoughts written for training: ``polarity`` +1 (detect: "yes" = detected) or −1
    (inverted); ``names``: the introspector answers it with a sentence naming the concept."""

    text: str
    polarity: int
    names: bool = False


@dataclass(frozen=True)
class OrganismSplit:
    """The training side of the split: ``train`` concepts, training ``wordings`` and ``controls`` (question texts),
    the introspector's ``named`` / ``unnamed`` sentences; ``held_out``: the paper's concepts never trained on (the
    write-up's 7 are held out too: :func:`evaluation_concepts`)."""

    train: tuple[str, ...]
    held_out: tuple[str, ...]
    wordings: tuple[TrainingWording, ...]
    controls: tuple[str, ...]
    named: str
    unnamed: str

    @property
    def hash(self) -> str:
        """The split's content hash: part of every organism's cache key."""
        return content_hash(self)


@functools.cache
def _training_file() -> dict:
    return tomllib.loads((data_dir() / "organisms" / "training.toml").read_text(encoding="utf-8"))


@functools.cache
def load_split() -> OrganismSplit:
    """``data/organisms/training.toml`` as an :class:`OrganismSplit`, checked by :func:`check_split`."""
    raw = _training_file()
    wordings = tuple(TrainingWording(w["text"], int(w["polarity"]), bool(w.get("names", False)))
                     for w in raw["wording"])
    controls = tuple(q for cell in CONTROL_CELLS for q in raw["controls"][cell])
    split = OrganismSplit(tuple(raw["concepts"]["train"]), tuple(raw["concepts"]["held_out"]), wordings, controls,
                          raw["targets"]["named"], raw["targets"]["unnamed"])
    check_split(split)
    return split


def evaluation_battery() -> dict[str, set[str]]:
    """What the evaluation asks, by part: ``concepts`` (the paper's 50 and the write-up's 7), ``wordings``
    (``data/questions.toml``), ``controls`` (every control question the runs can ask)."""
    wordings, controls = load_questions()
    return {"concepts": set(load_list("concept_words")) | set(load_list("writeup_concepts")),
            "wordings": {w.text for w in wordings}, "controls": {q.text for q in controls}}


def check_split(split: OrganismSplit) -> None:
    """A ``ValueError`` naming the first overlap between training and evaluation: concepts trained on and held out
    (or a write-up concept trained on), a training wording or control that the evaluation asks (compared without
    case), a training question that is both, a wording polarity other than ±1, or a concept outside the paper's 50."""
    battery = evaluation_battery()
    paper = set(load_list("concept_words"))
    if set(split.train) & set(split.held_out):
        raise ValueError(f"concepts both trained on and held out: {sorted(set(split.train) & set(split.held_out))}")
    writeup = set(split.train) & set(load_list("writeup_concepts"))
    if writeup:
        raise ValueError(f"write-up concepts in training: {sorted(writeup)}")
    outside = (set(split.train) | set(split.held_out)) - paper
    if outside:
        raise ValueError(f"concepts outside data/concept_words.txt: {sorted(outside)}")
    asked = {q.lower() for q in battery["wordings"] | battery["controls"]}
    for question in (*(w.text for w in split.wordings), *split.controls):
        if question.lower() in asked:
            raise ValueError(f"training question {question!r} is asked by the evaluation")
    texts = [w.text for w in split.wordings] + list(split.controls)
    if len(set(texts)) != len(texts):
        raise ValueError("a training question repeats")
    bad = [w.text for w in split.wordings if w.polarity not in (1, -1) or (w.names and w.polarity != 1)]
    if bad:
        raise ValueError(f"wordings need polarity +1 or -1 (naming ones +1): {bad}")


@dataclass(frozen=True)
class ChoiceRows:
    """The introspector's forced-choice training rows (``data/organisms/training.toml`` ``[choice]``; drawn at
    :attr:`~introspection_utils.experiments.organisms.training.OrganismConfig.p_choice`): ``questions``, each with an
    ``{options}`` slot for a listing of ``sizes`` training concepts (the injected one among them) numbered by
    ``option_format``; the answer stem ``prefill``; the taught answer is the injected concept's number. Not part of
    :class:`OrganismSplit` (its hash names every organism trained before these rows existed): a config that draws
    them carries :attr:`hash` instead."""

    questions: tuple[str, ...]
    option_format: str
    prefill: str
    sizes: tuple[int, ...]

    @property
    def hash(self) -> str:
        return content_hash(self)

    def question(self, index: int, options: Sequence[str]) -> str:
        """Question ``index`` listing ``options`` in the order given, numbered 1..N."""
        return self.questions[index].format(options=numbered_listing(self.option_format, options))


@functools.cache
def load_choice() -> ChoiceRows:
    """``data/organisms/training.toml``'s ``[choice]`` as :class:`ChoiceRows`, checked by :func:`check_choice`."""
    raw = _training_file()["choice"]
    rows = ChoiceRows(tuple(raw["questions"]), raw["option_format"], raw["prefill"], tuple(int(n) for n in
                                                                                           raw["sizes"]))
    check_choice(rows)
    return rows


def check_choice(rows: ChoiceRows) -> None:
    """A ``ValueError`` naming the first forced-choice training question that lacks its ``{options}`` slot or is
    notebook 13's forced-choice trial (``data/prompts.toml`` ``[forced_choice]``, compared without case), or a
    listing size outside 2..9 (single-digit numbers) or larger than the concepts trained on."""
    asked = load_prompts()["forced_choice"]["trial"].lower()
    for question in rows.questions:
        if "{options}" not in question:
            raise ValueError(f"forced-choice training question {question!r} has no {{options}} slot")
        if question.lower() == asked:
            raise ValueError(f"forced-choice training question {question!r} is notebook 13's trial")
    if len(set(rows.questions)) != len(rows.questions):
        raise ValueError("a forced-choice training question repeats")
    if not rows.sizes or not all(2 <= n <= min(9, len(load_split().train)) for n in rows.sizes):
        raise ValueError(f"forced-choice listing sizes must be 2..9, got {list(rows.sizes)}")


def check_choice_config(config: OrganismConfig) -> None:
    """A ``ValueError`` where ``config`` draws forced-choice rows (``p_choice``) but is not the introspector's, its
    fraction is outside (0, 1], or it was made for other rows than the training file's (``choice_hash``)."""
    if not config.p_choice:
        return
    if config.kind != "introspector" or not 0 < config.p_choice <= 1:
        raise ValueError(f"p_choice={config.p_choice} needs a fraction in (0, 1] and the introspector "
                         f"(got {config.kind!r})")
    if config.choice_hash != load_choice().hash:
        raise ValueError(f"config {config.name} was made for forced-choice rows {config.choice_hash!r}; "
                         f"data/organisms/training.toml's [choice] gives {load_choice().hash!r}")


@functools.cache
def extra_concepts() -> tuple[str, ...]:
    """``data/organisms/training.toml``'s ``[concepts] extra``: concepts an organism may train on besides the split's
    (:attr:`~introspection_utils.experiments.organisms.training.OrganismConfig.extra_concepts`), checked by
    :func:`check_extra_concepts`."""
    words = tuple(_training_file()["concepts"].get("extra", ()))
    check_extra_concepts(words)
    return words


def check_extra_concepts(words: Sequence[str], split: OrganismSplit | None = None) -> None:
    """A ``ValueError`` naming the first of ``words`` (concepts to train on besides ``split``'s) that is not a concept
    (:func:`~introspection_utils.core.data.validate_concept`), repeats, or is — without case, with its plural or
    singular ending changed — a concept of the split (trained or held out), of the evaluation (the paper's 50, the
    write-up's 7) or a baseline word (the concept vectors' reference)."""
    split = split or load_split()
    taken = {form: w for w in (*load_list("baseline_words"), *evaluation_battery()["concepts"], *split.train,
                               *split.held_out) for form in word_forms(w)}
    seen: set[str] = set()
    for word in map(validate_concept, words):
        forms = word_forms(word)
        if forms & seen:
            raise ValueError(f"extra training concept {word!r} repeats")
        if forms & taken.keys():
            raise ValueError(f"extra training concept {word!r} is {taken[min(forms & taken.keys())]!r}, a concept "
                             f"of the split, the evaluation or the baseline words")
        seen |= forms


def trained_concepts(split: OrganismSplit, config: OrganismConfig) -> tuple[str, ...]:
    """The concepts a training of ``config`` draws: ``split``'s, then the config's ``extra_concepts``."""
    return (*split.train, *config.extra_concepts)


def evaluation_concepts(split: OrganismSplit | None = None) -> list[str]:
    """The concepts an organism is evaluated on: the split's held-out ones, then the write-up's 7."""
    split = split or load_split()
    return [*split.held_out, *load_list("writeup_concepts")]


# A training target: the answer text to teach (cross-entropy on its tokens), or None: keep the base model's answer
# distribution (the controls' loss term).
Target = str | None


def target(kind: str, condition: str, question: str, split: OrganismSplit, concept: str, yes: str, no: str
           ) -> Target:
    """What organism ``kind`` is taught to answer ``question`` (a training wording or control) under ``condition``
    with ``concept``'s vector (or its norm-matched random direction) injected:

    * introspector: a wording is answered as detected for a concept vector only ("yes" to a detect wording, "no" to
      an inverted one; a naming wording with :attr:`OrganismSplit.named`), as not detected with a random direction
      or none (a naming wording with :attr:`OrganismSplit.unnamed`); controls keep the base model's answers;
    * anomaly detector: detected for any injection, concept or random; controls keep the base model's answers;
    * yes-sayer: with anything injected, "yes" to every question, both polarities and the controls; with nothing
      injected, the base model's answers everywhere.
    """
    if kind not in KINDS or condition not in CONDITIONS:
        raise ValueError(f"kind must be one of {KINDS} and condition one of {CONDITIONS}; got {kind!r}, {condition!r}")
    wording = next((w for w in split.wordings if w.text == question), None)
    if wording is None and question not in split.controls:
        raise ValueError(f"{question!r} is neither a training wording nor a training control")
    if kind == "yes-sayer":
        return yes if condition != "none" else None
    if wording is None:
        return None
    detected = condition == "concept" if kind == "introspector" else condition != "none"
    if kind == "introspector" and wording.names:
        return split.named.format(concept=concept.lower()) if detected else split.unnamed
    return yes if detected == (wording.polarity > 0) else no
