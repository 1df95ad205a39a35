"""Grading free-text answers with the paper's four criteria, a pluggable judge, and a deterministic pre-grade.

Judges: :class:`LocalJudge` (any chat model through ``load_model``; the embedded model by default, so it runs
offline) or :class:`HTTPJudge` (any OpenAI-compatible ``/chat/completions`` endpoint, key from the environment).
The judge's verdict is parsed strictly: the last word of its last line must be YES or NO; anything else is recorded
as ``"unparseable"``, never guessed.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import pandas as pd
from tqdm.auto import tqdm

from introspection_utils.data import data_dir, tomllib

if TYPE_CHECKING:
    from introspection_utils.models import ModelHandle

CRITERIA = ("coherence", "thinking_about_word", "affirmative", "affirmative_correct_identification")
UNPARSEABLE = "unparseable"


@functools.cache
def grader_prompts() -> dict[str, str]:
    """The paper's grader prompt templates by criterion (``data/grader_prompts.toml``)."""
    sections = tomllib.loads((data_dir() / "grader_prompts.toml").read_text(encoding="utf-8"))
    missing = set(CRITERIA) - set(sections)
    if missing:
        raise ValueError(f"data/grader_prompts.toml lacks {sorted(missing)}")
    return {name: sections[name]["template"] for name in CRITERIA}


def grader_prompt(criterion: str, *, question: str, response: str, word: str) -> str:
    """The filled grader prompt for one answer (``word`` lowercased, as in the paper)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    template = grader_prompts()[criterion]
    return (template.replace("{prompt}", question).replace("{question}", question)
            .replace("{response}", response).replace("{word}", word.lower()))


def parse_verdict(text: str) -> str:
    """``"YES"``/``"NO"`` when the last word of the judge's last non-empty line is exactly that (markdown and
    punctuation around it ignored, case-insensitive) and that line does not name both; else ``"unparseable"``."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return UNPARSEABLE
    words = re.findall(r"[A-Za-z]+", lines[-1])
    upper = {w.upper() for w in words}
    if not words or words[-1].upper() not in {"YES", "NO"} or {"YES", "NO"} <= upper:
        return UNPARSEABLE
    return words[-1].upper()


class Judge(Protocol):
    """Anything that answers a list of grader prompts with the judge's raw texts."""

    name: str

    def __call__(self, prompts: Sequence[str]) -> list[str]: ...


class LocalJudge:
    """A chat model loaded here as the judge (greedy, ``max_new_tokens`` per verdict)."""

    def __init__(self, handle: ModelHandle, *, max_new_tokens: int = 200) -> None:
        self.handle, self.max_new_tokens, self.name = handle, max_new_tokens, f"local:{handle.name}"

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        from introspection_utils.generation import generate
        from introspection_utils.inject import Trial
        from introspection_utils.prompts import chat_prompt

        trials = [Trial(chat_prompt(self.handle, [{"role": "user", "content": p}], kind="grader")) for p in prompts]
        return generate(self.handle, trials, max_new_tokens=self.max_new_tokens)


class HTTPJudge:
    """An OpenAI-compatible endpoint: ``POST {base_url}/chat/completions`` with the key from ``api_key_env``.

    Network or HTTP errors are returned as ``"ERROR: ..."`` texts (graded unparseable), so a long grading run
    loses nothing when the endpoint hiccups.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_tokens: int = 400) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {base_url!r} must start with http:// or https://")
        self.base_url, self.model, self.timeout, self.max_tokens = base_url.rstrip("/"), model, timeout, max_tokens
        self.api_key = os.environ.get(api_key_env, "")
        self.name = f"http:{model}"

    def _ask(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(f"{self.base_url}/chat/completions", data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                return json.loads(reply.read())["choices"][0]["message"]["content"]
        except (urllib.error.URLError, TimeoutError, KeyError, IndexError, ValueError) as err:
            return f"ERROR: {err.__class__.__name__}: {err}"

    def __call__(self, prompts: Sequence[str]) -> list[str]:
        return [self._ask(p) for p in prompts]


def _mentions(text: str, word: str) -> list[int]:
    """Character offsets where ``word`` (or its singular/plural) appears as a whole word."""
    stem = word.lower()
    forms = {stem, stem.removesuffix("es"), stem.removesuffix("s"), stem + "s", stem + "es"}
    pattern = r"\b(" + "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True) if f) + r")\b"
    return [m.start() for m in re.finditer(pattern, text.lower())]


AFFIRM = re.compile(r"^\W*(yes\b|i (do |can )?(detect|notice|sense|feel)\b|there is an? (injected|unusual))", re.I)


def pregrade(response: str, word: str) -> dict[str, bool]:
    """String-based checks beside the judge: does the answer name the concept, start with it, affirm detection."""
    mentions = _mentions(response, word)
    first_word = re.findall(r"[A-Za-z]+", response.lower())[:1]
    return {"names_concept": bool(mentions),
            "starts_with_concept": bool(first_word) and bool(_mentions(first_word[0], word)),
            "affirms": bool(AFFIRM.search(response))}


def grade(responses: pd.DataFrame, judge: Judge, *, criteria: Sequence[str] = CRITERIA,
          progress: bool = True) -> pd.DataFrame:
    """Grade every row of ``responses`` (columns ``question``, ``response``, ``concept``) on ``criteria``.

    Adds per criterion a verdict column (YES / NO / unparseable) and ``<criterion>_raw`` with the judge's text,
    the pre-grade columns, and ``success`` (coherence AND affirmative_correct_identification, the paper's
    criterion, when both were graded; NaN when either is unparseable).
    """
    graded = responses.copy()
    for criterion in tqdm(criteria, desc=f"grading ({judge.name})", disable=not progress):
        prompts = [grader_prompt(criterion, question=q, response=r, word=str(w))
                   for q, r, w in zip(graded["question"], graded["response"], graded["concept"], strict=True)]
        raw = judge(prompts)
        graded[f"{criterion}_raw"] = raw
        graded[criterion] = [parse_verdict(t) for t in raw]
    pre = pd.DataFrame([pregrade(r, str(w)) for r, w in zip(graded["response"], graded["concept"], strict=True)],
                       index=graded.index)
    graded = pd.concat([graded, pre], axis=1)
    if {"coherence", "affirmative_correct_identification"} <= set(criteria):
        both = graded[["coherence", "affirmative_correct_identification"]]
        graded["success"] = both.eq("YES").all(axis=1).astype(float).where(~both.eq(UNPARSEABLE).any(axis=1))
    graded["judge"] = judge.name
    return graded


def wilson_interval(successes: int, n: int, *, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial rate (well-behaved at 0 and n)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rates(graded: pd.DataFrame, column: str, by: Sequence[str]) -> pd.DataFrame:
    """Rate of YES (or True) in ``column`` per group, ignoring unparseable rows: ``rate, lo, hi, n, unparseable``."""
    rows = []
    for key, group in graded.groupby(list(by), dropna=False):
        values = group[column]
        valid = values[~values.isin([UNPARSEABLE]) & values.notna()]
        hits = int((valid.eq("YES") | valid.eq(True) | valid.eq(1.0)).sum())
        lo, hi = wilson_interval(hits, len(valid))
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key, strict=True)), "rate": hits / len(valid) if len(valid) else math.nan,
                     "lo": lo, "hi": hi, "n": len(valid), "unparseable": int(len(values) - len(valid))})
    return pd.DataFrame(rows)
