"""Chat-formatted prompts through the tokenizer's own template (the paper's conversation, the controls, the
extraction prompt), the injection start and the answer tokens; the engine and every experiment build on them."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from introspection_utils.core.data import load_answer_formats, load_prompts, load_questions

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

Frame = Literal["paper", "bare"]
# How the answer is asked for: "open" the question as it is (the paper's turn); "binary" the question followed by
# "Answer only by 'Yes' or 'No'."; "prefill" the assistant turn opened with "The answer is", read at the next token.
# The texts and their sources are in data/questions.toml [answer_formats].
AnswerFormat = Literal["open", "binary", "prefill"]
ANSWER_FORMATS = ("open", "binary", "prefill")


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
    question: str  # the designed question (without the answer format's instruction, which ``text`` carries)
    system: str
    answer_format: str = "open"  # see :data:`ANSWER_FORMATS` ("open" for prompts built outside that rule)

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


def check_answer_format(answer_format: str) -> str:
    """``answer_format`` if it is one of :data:`ANSWER_FORMATS`, else a ``ValueError`` naming them."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"unknown answer_format {answer_format!r}; use one of {', '.join(ANSWER_FORMATS)}")
    return answer_format


def asked_question(question: str, answer_format: str = "open") -> tuple[str, str]:
    """``(the question as the user asks it, the assistant prefill)`` under ``answer_format``: "binary" appends the
    instruction (not twice: a question already ending with it is kept), "prefill" returns the prefill text."""
    formats = load_answer_formats()
    if check_answer_format(answer_format) == "binary":
        instruction = formats["binary"]
        return (question if question.rstrip().endswith(instruction) else f"{question} {instruction}"), ""
    return question, formats["prefill"] if answer_format == "prefill" else ""


def introspection_prompt(handle: ModelHandle, question: str | None = None, *, frame: Frame = "paper",
                         prefill: str = "", system: str | None = None, kind: str | None = None,
                         answer_format: AnswerFormat = "open") -> Prompt:
    """The paper's injected-thought conversation, or the same frame around another (control) question.

    ``frame="paper"``: user preamble → assistant "Ok." → user "Ok, let's get started.\\n\\n{question}" → assistant
    (prefill). The injection starts on the "\\n\\n" before the question. ``frame="bare"``: the question alone in
    one user turn; the injection starts on its first token. ``question=None`` is the paper's trial line.
    ``answer_format`` (:data:`ANSWER_FORMATS`): "binary" appends "Answer only by 'Yes' or 'No'." to the question,
    "prefill" opens the assistant turn with "The answer is" (the window runs on through it to the read position;
    a caller's own ``prefill`` is then an error). ``Prompt.question`` stays the designed question.
    """
    question = load_prompts()["injected_thought"]["question"] if question is None else question
    kind = kind or ("introspection" if question in introspection_questions() else "control")
    if not question.strip():
        raise ValueError("question is empty")
    asked, format_prefill = asked_question(question, answer_format)
    if format_prefill and prefill:
        raise ValueError(f"answer_format='prefill' prefills {format_prefill!r} itself; got prefill={prefill!r} too")
    messages, injection_from = _frame_messages(asked, frame)
    prompt = chat_prompt(handle, messages, injection_from=injection_from, prefill=prefill or format_prefill,
                         kind=kind, question=question, system=system)
    return replace(prompt, answer_format=answer_format)


# The order control_questions deals its cells in: every prefix is as balanced as it can be in both tags.
CONTROL_CELLS = (("world", "no"), ("self", "yes"), ("world", "ambiguous"), ("self", "no"), ("world", "yes"),
          ("self", "ambiguous"))


def _balanced(questions) -> list:
    """The six (about, expected) cells dealt round-robin in :data:`CONTROL_CELLS` order, each in file order: in every
    prefix each ``about`` tag's count and each ``expected`` tag's count differ by at most one while no cell runs out
    (a cell that runs out is skipped)."""
    cells = [[q for q in questions if (q.about, q.expected) == cell] for cell in CONTROL_CELLS]
    out = []
    for k in range(max(map(len, cells), default=0)):
        out += [cell[k] for cell in cells if k < len(cell)]
    return out


def _control_set(extended: bool) -> list:
    _, controls = load_questions()
    main = [q for q in controls if not q.extended]
    extra = [q for q in controls if q.extended]
    return _balanced(main) + (_balanced(extra) if extended else [])


def control_questions(n: int | None = None, *, extended: bool = False) -> list[str]:
    """Control questions of both polarities, balanced by topic and by expected answer: the six (about, expected)
    cells ("world"/"self" × "no"/"yes"/"ambiguous", 10 each: the paper's 20 "no"-expected, 20 "yes"-expected, 20
    ambiguous) dealt round-robin, so the first ``n`` keep both balances for any ``n`` (each tag's counts differ by at
    most one; ``n`` a multiple of 6: exactly equal). Deterministic order.

    ``extended=True`` appends the 20 "no"-expected ones written for this toolkit (80 in all; past the first 60 the
    balance is not kept). The tags of each are :func:`question_tags`; the sets and their sources are in
    ``data/questions.toml``.
    """
    questions = [q.text for q in _control_set(extended)]
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
        raise ValueError(f"n={n!r} control questions: give a whole number from 1 to {len(questions)} (None: all)")
    if n is not None and n < 1:
        raise ValueError(f"n={n} control questions requested: ask for at least 1 (of {len(questions)}; None: all). "
                         f"For a sweep without controls, pass n_controls=0 to SweepSpec.build")
    if n is not None and n > len(questions):
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


def default_wordings() -> list[str]:
    """The wordings every default run asks (``default = true`` in ``data/questions.toml``): detect wordings and
    their inverted counterparts, both polarities, the paper's trial line first."""
    wordings, _ = load_questions()
    return [w.text for w in wordings if w.default]


def paper_pair() -> list[str]:
    """The smallest design with both polarities: the paper's trial line and its inverted counterpart (the first
    wording whose ``counterpart`` is ``paper`` in ``data/questions.toml``) — what the demo-sized notebooks ask."""
    wordings, _ = load_questions()
    inverted = next(w for w in wordings if w.counterpart == "paper")
    return introspection_questions(["paper", inverted.id])


def select_wordings(choice: str | Sequence[str] = "default") -> list[str]:
    """A notebook's ``wordings`` parameter as question texts: "default" (:func:`default_wordings`, both
    polarities, 3 + 3), "pair" (:func:`paper_pair`: the paper's line and its inverted twin), "all" (every wording of
    ``data/questions.toml``) or a list of wording ids."""
    if isinstance(choice, str):
        choices = {"default": default_wordings, "pair": paper_pair, "all": introspection_questions}
        if choice not in choices:
            raise ValueError(f"wordings {choice!r}: use {', '.join(map(repr, choices))} or a list of wording ids")
        return choices[choice]()
    return introspection_questions(list(choice))


def question_tags(question: str) -> dict:
    """``{"about", "expected", "polarity"}`` of ``question`` (see :class:`data.Question`): a control's expected
    answer and polarity 0, or an introspection wording's detecting answer and polarity ±1; a question outside the
    designed set (a caller's own) is ``{"about": "unknown", "expected": "unknown", "polarity": 0}``."""
    wordings, controls = load_questions()
    for q in (*wordings, *controls):
        if q.text == question:
            return {"about": q.about, "expected": q.expected, "polarity": q.polarity}
    return {"about": "unknown", "expected": "unknown", "polarity": 0}


def question_about(question: str) -> str:
    """What ``question`` is about: "self" (the model; every introspection wording) or "world"; "unknown" for a
    question outside the designed set (a caller's own)."""
    return question_tags(question)["about"]


def question_prompts(handle: ModelHandle, n_controls: int | None = None, *, frame: Frame = "paper",
                     answer_format: AnswerFormat = "open") -> list[Prompt]:
    """The introspection prompt followed by the first ``n_controls`` control questions in the same frame and
    answer format."""
    controls = control_questions(n_controls) if n_controls != 0 else []
    return [introspection_prompt(handle, frame=frame, answer_format=answer_format)] + [
        introspection_prompt(handle, q, frame=frame, answer_format=answer_format) for q in controls]


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


def paper_answers() -> tuple[str, str]:
    """The paper's single (yes, no) answer words ("Yes", "No", from ``data/prompts.toml``): what the readouts that
    need one token per answer (attribution, patching, head ablation: linear in the logits) read."""
    answers = load_prompts()["answers"]
    return answers["yes"], answers["no"]


def yes_no_ids(handle: ModelHandle, yes: str | None = None, no: str | None = None) -> tuple[int, int]:
    """Token ids of the yes and no answers (default: the paper's "Yes"/"No", from ``data/prompts.toml``)."""
    answers = load_prompts()["answers"]
    return answer_token_id(handle, yes or answers["yes"]), answer_token_id(handle, no or answers["no"])


# The spellings read as one answer: each word in these cases, with and without a leading space.
ANSWER_CASES = (str.capitalize, str.lower, str.upper)


@dataclass(frozen=True)
class AnswerSet:
    """The tokens read as "yes" and as "no": ``yes`` / ``no`` token ids, ``yes_tokens`` / ``no_tokens`` the strings
    they were found for (same order; the first of each is the paper's spelling). The readout of a trial is
    ``logsumexp(logits[yes]) − logsumexp(logits[no])`` and its answer mass the probability of all of them."""

    yes: tuple[int, ...]
    no: tuple[int, ...]
    yes_tokens: tuple[str, ...]
    no_tokens: tuple[str, ...]

    @property
    def ids(self) -> tuple[int, ...]:
        """The yes ids then the no ids (``len(yes) + len(no)``), the order the engine reads them in."""
        return (*self.yes, *self.no)

    def record(self) -> dict:
        """For a table's metadata: ``{"yes": [...], "no": [...], "yes_ids": [...], "no_ids": [...]}``."""
        return {"yes": list(self.yes_tokens), "no": list(self.no_tokens), "yes_ids": list(self.yes),
                "no_ids": list(self.no)}


def _variants(handle: ModelHandle, words: Sequence[str]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The single-token variants among ``words`` (first occurrence of each id kept), as ids and strings."""
    ids: dict[int, str] = {}
    for word in words:
        try:
            ids.setdefault(answer_token_id(handle, word), word)
        except ValueError:  # several tokens (or not a clean continuation) for this tokenizer: not read
            continue
    return tuple(ids), tuple(ids.values())


def answer_set(handle: ModelHandle, answers: tuple | None = None) -> AnswerSet:
    """The yes and no answer sets of ``handle``'s tokenizer.

    Default: the paper's "Yes"/"No" (``data/prompts.toml``) in each of :data:`ANSWER_CASES` (Yes, yes, YES), with
    and without a leading space, whichever are single tokens as the first token of the assistant's answer (the
    paper's spelling first; it must be a single token). ``answers=(yes, no)``: each a word (a set of one, as before)
    or a sequence of words (each must be a single token). The two sets must not share a token.
    """
    if answers is None:
        defaults = load_prompts()["answers"]
        sets = []
        for word in (defaults["yes"], defaults["no"]):
            answer_token_id(handle, word)  # the paper's spelling must be one token
            spellings = [case(word) for case in ANSWER_CASES]
            sets.append(_variants(handle, [word, *spellings, *(" " + w for w in spellings)]))
        (yes, yes_tokens), (no, no_tokens) = sets
    else:
        if not (isinstance(answers, (tuple, list)) and len(answers) == 2):
            raise ValueError(f"answers must be a (yes, no) pair of words or of word lists, got {answers!r}")
        words = [(a,) if isinstance(a, str) else tuple(a) for a in answers]
        if not all(words) or not all(isinstance(w, str) for ws in words for w in ws):
            raise ValueError(f"answers must be a (yes, no) pair of words or of non-empty word lists, got {answers!r}")
        (yes, yes_tokens), (no, no_tokens) = [
            (tuple(dict.fromkeys(answer_token_id(handle, w) for w in ws)), ws) for ws in words]
        if len(yes) != len(yes_tokens) or len(no) != len(no_tokens):
            raise ValueError(f"answers {answers!r}: two spellings of one answer are the same token")
    shared = set(yes) & set(no)
    if shared:
        raise ValueError(f"the yes and no answers share token(s) {sorted(shared)} for {handle.name}")
    return AnswerSet(yes, no, tuple(yes_tokens), tuple(no_tokens))
