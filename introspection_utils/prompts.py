"""Chat-formatted prompts built with the tokenizer's own chat template, and the answer tokens.

A :class:`Prompt` is the token ids of one conversation plus ``injection_start``: the index of the first token that
the paper's protocol injects into (the double newline before "Trial 1" or before a control question), located by
character offsets so it is right whether the tokenizer merges newlines with neighbouring text or not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from introspection_utils.data import load_prompts, load_questions

if TYPE_CHECKING:
    from introspection_utils.models import ModelHandle

Frame = Literal["paper", "bare"]


@dataclass(frozen=True)
class Prompt:
    """One tokenised conversation.

    ``input_ids``: the token ids (no padding), length T. ``injection_start``: index in ``0..T-1`` of the first token
    of the injection window. ``system``: how the system turn was decided (recorded for the results' metadata).
    """

    text: str
    input_ids: tuple[int, ...] = field(repr=False)
    injection_start: int
    kind: str  # "introspection", "control", "extraction" or a caller's label
    question: str
    system: str

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def hash(self) -> str:
        """Short sha256 of the token ids and injection start: names this exact prompt in caches and metadata."""
        return hashlib.sha256(f"{self.input_ids}|{self.injection_start}".encode()).hexdigest()[:16]


def _system_messages(handle: ModelHandle, system: str | None) -> tuple[list[dict], str]:
    """The system turn to send, and a record of the choice.

    ``None`` means "what the model's template does with no system message": nothing for Gemma (no system role),
    the template's own default for SmolLM2 and Qwen (they insert one).
    """
    if system is None:
        note = "template default" if _template_inserts_system(handle.tokenizer) else "none"
        return [], note
    if not handle.arch.supports_system_role:
        raise ValueError(f"{handle.name}'s chat template has no system role; pass system=None "
                         f"(or put the text in the first user turn yourself)")
    return [{"role": "system", "content": system}], f"given: {system}"


def _template_inserts_system(tokenizer) -> bool:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "\u00a7"}], tokenize=False)
    return "system" in text[: text.index("\u00a7")].lower()


def chat_prompt(handle: ModelHandle, messages: list[dict], *, injection_from: int | None = None,
                prefill: str = "", kind: str = "custom", question: str = "", system: str | None = None) -> Prompt:
    """Render ``messages`` with the chat template (plus the generation prompt and an optional assistant prefill).

    ``injection_from`` is a character offset into the LAST message's content: the injection window starts at the
    token containing that character. ``None`` starts it at the last token (the position that is read out).
    """
    system_turn, system_note = _system_messages(handle, system)
    messages = system_turn + messages
    text = handle.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    start_char = None
    if injection_from is not None:
        # Locate the last message's content in the rendered text (templates such as Gemma's trim it).
        content = messages[-1]["content"]
        lead = len(content) - len(content.lstrip())
        start_char = text.rindex(content.strip()) + max(injection_from - lead, 0)
    text += prefill
    encoded = handle.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if start_char is None:
        start = len(ids) - 1
    else:
        start = next(i for i, (a, b) in enumerate(offsets) if b > start_char)
    return Prompt(text, tuple(ids), start, kind, question, system_note)


def _frame_messages(question: str, frame: Frame) -> tuple[list[dict], int]:
    """The conversation of ``frame`` around ``question`` and the character offset in its last message where the
    injection starts."""
    p = load_prompts()["injected_thought"]
    if frame == "paper":
        last = p["trial_lead"] + p["separator"] + question
        messages = [{"role": "user", "content": p["preamble"]}, {"role": "assistant", "content": p["assistant_ack"]},
                    {"role": "user", "content": last}]
        return messages, len(p["trial_lead"])
    if frame == "bare":
        return [{"role": "user", "content": question}], 0
    raise ValueError(f"unknown frame {frame!r}; use 'paper' or 'bare'")


def conversation_text(question: str | None = None, *, frame: Frame = "paper") -> str:
    """The conversation the model sees, as plain "Human: … / Assistant: …" turns ending with "Assistant:" (the
    paper's own format, independent of any chat template): what a grader is shown as ``{prompt}``."""
    question = load_prompts()["injected_thought"]["question"] if question is None else question
    messages, _ = _frame_messages(question, frame)
    names = {"user": "Human", "assistant": "Assistant"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"


def introspection_prompt(handle: ModelHandle, question: str | None = None, *, frame: Frame = "paper",
                         prefill: str = "", system: str | None = None, kind: str | None = None) -> Prompt:
    """The paper's injected-thought conversation, or the same frame around another (control) question.

    ``frame="paper"``: user preamble → assistant "Ok." → user "Ok, let's get started.\\n\\n{question}" → assistant
    (prefill). The injection starts on the "\\n\\n" before the question. ``frame="bare"``: the question alone in
    one user turn; the injection starts on its first token. ``question=None`` is the paper's trial line.
    """
    question = load_prompts()["injected_thought"]["question"] if question is None else question
    kind = kind or ("introspection" if question in introspection_questions() else "control")
    if not question.strip():
        raise ValueError("question is empty")
    messages, injection_from = _frame_messages(question, frame)
    return chat_prompt(handle, messages, injection_from=injection_from, prefill=prefill, kind=kind,
                       question=question, system=system)


def _alternate(questions) -> list:
    """World, self, world, self, …: every prefix holds both kinds, half each when its length is even."""
    world = [q for q in questions if q.about == "world"]
    self_ = [q for q in questions if q.about == "self"]
    out = []
    for pair in zip(world, self_, strict=False):
        out += pair
    longer = world if len(world) > len(self_) else self_
    return out + longer[len(out) // 2:]


def _control_set(extended: bool) -> list:
    _, controls = load_questions()
    paper = [q for q in controls if q.source.startswith("Lindsey")]
    extra = [q for q in controls if not q.source.startswith("Lindsey")]
    return _alternate(paper) + (_alternate(extra) if extended else [])


def control_questions(n: int | None = None, *, extended: bool = False) -> list[str]:
    """Control questions (true answer always "no"), balanced by topic: the paper's 20, alternating a question about
    the world with one about the model ("self"), so the first ``n`` keep the balance for any ``n``.

    ``extended=True`` appends the 20 written for this toolkit (same rule, also alternating): 40 in all. The topic of
    each is :func:`question_about`; the sets and their sources are in ``data/questions.toml``.
    """
    questions = [q.text for q in _control_set(extended)]
    if n is not None and not 1 <= n <= len(questions):
        raise ValueError(f"n={n} control questions requested; there are {len(questions)}")
    return questions[:n]


def introspection_questions(ids: Sequence[str] | None = None) -> list[str]:
    """The introspection wordings of ``data/questions.toml`` (all of them, or those named by ``ids``), the paper's
    trial line first. Several wordings let a statistic ask whether the introspection question is special."""
    wordings, _ = load_questions()
    by_id = {w.id: w.text for w in wordings}
    if ids is None:
        return list(by_id.values())
    unknown = [i for i in ids if i not in by_id]
    if unknown or not ids:
        raise ValueError(f"unknown introspection wording(s) {unknown}; available: {', '.join(by_id)}")
    return [by_id[i] for i in ids]


def question_about(question: str) -> str:
    """What ``question`` is about: "self" (the model; every introspection wording) or "world"; "unknown" for a
    question outside the designed set (a caller's own)."""
    wordings, controls = load_questions()
    topics = {q.text: q.about for q in (*wordings, *controls)}
    return topics.get(question, "unknown")


def question_prompts(handle: ModelHandle, n_controls: int | None = None, *, frame: Frame = "paper") -> list[Prompt]:
    """The introspection prompt followed by the first ``n_controls`` control questions in the same frame."""
    controls = control_questions(n_controls) if n_controls != 0 else []
    return [introspection_prompt(handle, frame=frame)] + [introspection_prompt(handle, q, frame=frame)
                                                          for q in controls]


def extraction_prompt(handle: ModelHandle, word: str, *, system: str | None = None) -> Prompt:
    """"Tell me about {word}" (word lowercased, as in the paper), read at the last token before the answer."""
    user = load_prompts()["concept_extraction"]["user"].format(word=word.lower())
    return chat_prompt(handle, [{"role": "user", "content": user}], kind="extraction", question=user, system=system)


def answer_token_id(handle: ModelHandle, word: str, *, allow_first_token: bool = False) -> int:
    """The token id the model would emit for ``word`` as the first token of its answer.

    Tokenised in place, right after the generation prompt, so a leading space (``" Yes"``) or its absence is
    respected per tokenizer. A word that is several tokens is an error unless ``allow_first_token``.
    """
    context = handle.tokenizer.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False,
                                                   add_generation_prompt=True)
    tok = handle.tokenizer
    base = tok(context, add_special_tokens=False)["input_ids"]
    full = tok(context + word, add_special_tokens=False)["input_ids"]
    if not word or full[: len(base)] != base or len(full) == len(base):
        raise ValueError(f"answer word {word!r} cannot be tokenised as a continuation of the assistant turn")
    pieces = full[len(base):]
    if len(pieces) > 1 and not allow_first_token:
        raise ValueError(f"answer word {word!r} is {len(pieces)} tokens for {handle.name} "
                         f"({[tok.decode([i]) for i in pieces]}); pick a single-token word or pass "
                         f"allow_first_token=True to score its first token")
    return pieces[0]


def yes_no_ids(handle: ModelHandle, yes: str | None = None, no: str | None = None) -> tuple[int, int]:
    """Token ids of the yes and no answers (default: the paper's "Yes"/"No", from ``data/prompts.toml``)."""
    answers = load_prompts()["answers"]
    return answer_token_id(handle, yes or answers["yes"]), answer_token_id(handle, no or answers["no"])
