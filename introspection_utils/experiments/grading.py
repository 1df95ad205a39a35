"""Free-text answers under injection graded with the paper's four criteria by a pluggable judge, beside a
deterministic pre-grade (notebook 07)."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import pandas as pd
import torch
from tqdm.auto import tqdm

from introspection_utils.core.data import data_dir, tomllib, word_forms
from introspection_utils.core.intervals import wilson_interval
from introspection_utils.core.paths import checkpoint
from introspection_utils.core.results import SweepResult
from introspection_utils.engine.generation import generate, response_table
from introspection_utils.engine.measure import Trial
from introspection_utils.engine.metadata import metadata
from introspection_utils.engine.prompts import chat_prompt, introspection_prompt
from introspection_utils.models.handle import ModelHandle, load_model

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


def grader_prompt(criterion: str, *, question: str, response: str, word: str, conversation: str | None = None
                  ) -> str:
    """The filled grader prompt for one answer (``word`` lowercased, as in the paper). ``{prompt}`` is the whole
    ``conversation`` the model saw (:func:`prompts.conversation_text`; default the question alone), ``{question}``
    the question."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    template = grader_prompts()[criterion]
    return (template.replace("{prompt}", question if conversation is None else conversation)
            .replace("{question}", question)
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
    """A chat model loaded here as the judge (greedy, ``max_new_tokens`` per verdict). Its ``name`` (in the
    grades' checkpoint key and tables) carries the dtype: the same model in bfloat16 and float32 can grade an answer
    differently, so a resumed grading never takes the other dtype's verdicts."""

    def __init__(self, handle: ModelHandle, *, max_new_tokens: int = 200) -> None:
        dtype = str(handle.dtype).removeprefix("torch.")
        self.handle, self.max_new_tokens, self.name = handle, max_new_tokens, f"local:{handle.name}:{dtype}"

    def __call__(self, prompts: Sequence[str]) -> list[str]:
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
    pattern = r"\b(" + "|".join(re.escape(f) for f in sorted(word_forms(word), key=len, reverse=True)) + r")\b"
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
    """Grade every row of ``responses`` (columns ``question``, ``response``, ``concept``, and ``conversation`` — the
    whole conversation, shown to the judge as ``{prompt}`` — when present) on ``criteria``.

    Adds per criterion a verdict column (YES / NO / unparseable) and ``<criterion>_raw`` with the judge's text,
    the pre-grade columns, and ``success`` (coherence AND affirmative_correct_identification, the paper's
    criterion, when both were graded; NaN when either is unparseable). Identical grader prompts are sent to the
    judge once and share its verdict (greedy answers to the same uninjected prompt are identical).
    """
    return _finish_grading(responses, judge, {criterion: judge_criterion(responses, judge, criterion)
                                              for criterion in tqdm(criteria, desc=f"grading ({judge.name})",
                                                                    disable=not progress)})


def judge_criterion(responses: pd.DataFrame, judge: Judge, criterion: str) -> list[str]:
    """The judge's raw answer on ``criterion`` for every row of ``responses`` (identical grader prompts asked once)."""
    conversations = responses["conversation"] if "conversation" in responses else [None] * len(responses)
    prompts = [grader_prompt(criterion, question=q, response=r, word=str(w), conversation=c)
               for q, r, w, c in zip(responses["question"], responses["response"], responses["concept"],
                                     conversations, strict=True)]
    unique = list(dict.fromkeys(prompts))  # identical prompts (e.g. greedy controls) are asked once
    answers = dict(zip(unique, judge(unique), strict=True))
    return [answers[p] for p in prompts]


def _finish_grading(responses: pd.DataFrame, judge: Judge, raw_by_criterion: dict[str, list[str]]) -> pd.DataFrame:
    """The graded table from the judge's raw answers per criterion: verdicts, pre-grade, success, judge."""
    graded = responses.copy()
    for criterion, raw in raw_by_criterion.items():
        graded[f"{criterion}_raw"] = raw
        graded[criterion] = [parse_verdict(t) for t in raw]
    criteria = list(raw_by_criterion)
    pre = pd.DataFrame([pregrade(r, str(w)) for r, w in zip(graded["response"], graded["concept"], strict=True)],
                       index=graded.index)
    graded = pd.concat([graded, pre], axis=1)
    if {"coherence", "affirmative_correct_identification"} <= set(criteria):
        both = graded[["coherence", "affirmative_correct_identification"]]
        graded["success"] = both.eq("YES").all(axis=1).astype(float).where(~both.eq(UNPARSEABLE).any(axis=1))
    graded["judge"] = judge.name
    return graded


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


# ------------------------------------------------------------------ the grading experiment (07_generation_and_grading)

def make_judge(kind: str, handle: ModelHandle | None = None, *, model: str | None = None, url: str | None = None,
               api_key_env: str = "OPENAI_API_KEY", max_new_tokens: int = 200,
               dtype: str | torch.dtype | None = "auto") -> Judge:
    """The judge a notebook names: ``"local"`` — ``model`` loaded with ``load_model`` in ``dtype`` (default
    ``"auto"``: bfloat16 where the device runs it fast, else float32, as
    :func:`~introspection_utils.models.handle.resolve_dtype` reads it; ``None``: float32 on a CPU, bfloat16 on
    CUDA), or ``None``: ``handle``, the model that answered, as it is; ``"http"`` — :class:`HTTPJudge` at ``url``
    (e.g. ``"https://api.openai.com/v1"``) serving ``model``, the key read from the environment variable
    ``api_key_env``. ``max_new_tokens`` bounds the judge's text (a judge that thinks out loud needs a few hundred
    tokens, or its last line is cut and unparseable)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if kind == "local":
        if model is None:
            if handle is None:
                raise ValueError("judge 'local' with model=None judges with the handle given; pass one")
            return LocalJudge(handle, max_new_tokens=max_new_tokens)
        return LocalJudge(load_model(model, dtype=dtype), max_new_tokens=max_new_tokens)
    if kind == "http":
        if not url or not model:
            raise ValueError("judge 'http' needs url (an OpenAI-compatible base URL, e.g. "
                             "'https://api.openai.com/v1') and model (the name the endpoint serves)")
        return HTTPJudge(url, model, api_key_env=api_key_env, max_tokens=max_new_tokens)
    raise ValueError(f"unknown judge {kind!r}; use 'local' or 'http'")


def run_grading(handle: ModelHandle, concepts: Sequence[str], scales: Sequence[float], *, layer: int, judge: Judge,
                criteria: Sequence[str] = CRITERIA, samples: int = 1, max_new_tokens: int = 100,
                temperature: float = 0.0, seed: int = 0, question: str | None = None,
                results_dir: str | os.PathLike | None = None, name: str = "graded_responses", progress: bool = True):
    """Free-text answers under injection (:func:`generation.response_table`: every concept × scale × sample, scale 0
    = no injection) graded by ``judge`` on ``criteria`` (:func:`grade`). Returns a
    :class:`~introspection_utils.core.results.SweepResult`
    (the graded table and how it was made: model, prompt hash, generation settings, judge, criteria, versions);
    with ``results_dir`` saved as ``<results_dir>/<name>.csv`` and ``.meta.json``."""
    unknown = [c for c in criteria if c not in CRITERIA]
    if unknown or not criteria:
        raise ValueError(f"criteria {list(criteria)}: choose one or more of {', '.join(CRITERIA)}")
    spec = {"concepts": list(concepts), "scales": [float(s) for s in scales], "layer": layer, "seed": seed,
            "question": question}
    # Resumable: the generation pass, then each criterion, kept under <results_dir>/.chunks/ until the table is saved.
    key = {"model": handle.name, "revision": handle.revision, "dtype": str(handle.dtype), **spec, "samples": samples,
           "max_new_tokens": max_new_tokens, "temperature": temperature}
    responses = checkpoint(results_dir, f"{name}-responses", key, lambda: response_table(
        handle, concepts, scales, layer=layer, samples=samples, max_new_tokens=max_new_tokens,
        temperature=temperature, seed=seed, question=question, progress=progress))
    raw = {criterion: checkpoint(results_dir, f"{name}-{criterion}", {**key, "judge": judge.name,
                                                                      "criterion": criterion},
                                 lambda criterion=criterion: judge_criterion(responses, judge, criterion))
           for criterion in tqdm(criteria, desc=f"grading ({judge.name})", disable=not progress)}
    graded = _finish_grading(responses, judge, raw)
    meta = metadata(handle, spec, [introspection_prompt(handle, question).hash])
    meta.update(experiment="generation_grading", judge=judge.name, criteria=list(criteria),
                generation={"samples": samples, "max_new_tokens": max_new_tokens, "temperature": temperature})
    result = SweepResult(graded, meta)
    if results_dir is not None:
        result.save(Path(results_dir) / name)
    return result


def _pregrade_detects(graded: pd.DataFrame) -> pd.Series:
    """The pre-grade's analogue of the paper's success: affirms, names the concept, and does not start with it."""
    return graded["affirms"] & graded["names_concept"] & ~graded["starts_with_concept"]


def detection_rates(graded: pd.DataFrame) -> pd.DataFrame:
    """Detection and false-positive rates by scale, from the judge and from the pre-grade, with Wilson 95% CIs.

    * detection, judge: ``success`` (coherence AND affirmative_correct_identification) on injected rows;
    * false positive, judge: ``affirmative`` (claims an injected thought) on the no-injection rows (scale 0);
    * the same two from the pre-grade: affirms AND names the concept AND does not start with it (injected rows);
      affirms (no-injection rows).

    A judge rate whose criteria were not graded is left out. Columns: ``measure, source, scale, rate, lo, hi, n,
    unparseable`` (unparseable rows are excluded from ``n`` and counted).
    """
    pre = graded.assign(pregrade_detects=_pregrade_detects(graded))
    parts = []
    for measure, source, rows, column in (
            ("detection", "judge", graded[graded["injected"]], "success"),
            ("false positive", "judge", graded[~graded["injected"]], "affirmative"),
            ("detection", "pre-grade", pre[pre["injected"]], "pregrade_detects"),
            ("false positive", "pre-grade", pre[~pre["injected"]], "affirms")):
        if column in rows and len(rows):
            parts.append(rates(rows, column, ["scale"]).assign(measure=measure, source=source))
    columns = ["measure", "source", "scale", "rate", "lo", "hi", "n", "unparseable"]
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)[columns]


def side_by_side(graded: pd.DataFrame, *, width: int = 90) -> pd.DataFrame:
    """One row per answer: the (shortened, one-line) response, the pre-grade beside the judge's verdicts."""
    verdicts = [c for c in CRITERIA if c in graded]
    shown = graded["response"].str.replace(r"\s+", " ", regex=True).str.strip()
    shown = shown.where(shown.str.len() <= width, shown.str.slice(0, width - 1) + "…")
    table = graded[["concept", "scale", "sample"]].assign(response=shown)
    table = pd.concat([table, graded[["names_concept", "starts_with_concept", "affirms"]]], axis=1)
    table["pregrade_detects"] = _pregrade_detects(graded)
    table = pd.concat([table, graded[verdicts]], axis=1)
    if "success" in graded:
        table["success"] = graded["success"]
    return table.reset_index(drop=True)


def _count(hits: int, n: int) -> str:
    if n == 0:
        return "none gradable"
    lo, hi = wilson_interval(hits, n)
    return f"{hits} of {n} ({hits / n:.0%}, 95% CI {lo:.0%}–{hi:.0%})"


def describe_grading(graded: pd.DataFrame) -> str:
    """Sentences computed from a graded table: unparseable verdicts, detection and false-positive rates (judge and
    pre-grade), where the two agree, and how many distinct answers the no-injection rows hold."""
    verdicts = [c for c in CRITERIA if c in graded]
    total = len(graded) * len(verdicts)
    bad = {c: int(graded[c].eq(UNPARSEABLE).sum()) for c in verdicts}
    n_bad = sum(bad.values())
    parts = [f"Judge {graded['judge'].iloc[0]}: {n_bad} of {total} verdicts unparseable ({n_bad / max(total, 1):.0%}; "
             + ", ".join(f"{c} {k}" for c, k in bad.items()) + ")."]
    injected, control = graded[graded["injected"]], graded[~graded["injected"]]
    pre = _pregrade_detects(graded)
    if "success" in graded and len(injected):
        valid = injected["success"].dropna()
        by_scale = injected.groupby("scale")["success"].agg(["sum", "count"])
        parts.append(f"Detection (coherent AND affirmative with correct identification) on the {len(injected)} "
                     f"injected answers: {_count(int(valid.sum()), len(valid))}, {len(injected) - len(valid)} "
                     f"unparseable; by scale: " + ", ".join(f"{s:g}: {int(r['sum'])}/{int(r['count'])}"
                                                           for s, r in by_scale.iterrows()) + ".")
    elif len(injected):
        parts.append("Detection by the judge needs both coherence and affirmative_correct_identification graded.")
    if len(control):
        distinct = control["response"].nunique()
        if "affirmative" in graded:
            valid = control["affirmative"][control["affirmative"] != UNPARSEABLE]
            parts.append(f"False positives (the judge says the answer claims an injected thought) on the "
                         f"{len(control)} no-injection answers: {_count(int(valid.eq('YES').sum()), len(valid))}.")
        else:
            parts.append("False positives by the judge need the 'affirmative' criterion graded.")
        parts.append(f"The no-injection rows hold {distinct} distinct answer(s) of {len(control)}"
                     + (" (greedy decoding: the same prompt gives the same answer)." if distinct < len(control)
                        else "."))
    parts.append(f"Pre-grade (affirms, names the concept, does not start with it): detection "
                 f"{_count(int(pre[graded['injected']].sum()), len(injected))}; false positives (affirms) "
                 f"{_count(int(graded.loc[~graded['injected'], 'affirms'].sum()), len(control))}.")
    if "affirmative" in graded:
        both = graded[graded["affirmative"] != UNPARSEABLE]
        agree = int((both["affirmative"].eq("YES") == both["affirms"]).sum())
        parts.append(f"The judge's 'affirmative' verdict and the pre-grade's 'affirms' agree on {agree} of "
                     f"{len(both)} parseable answers.")
    return " ".join(parts)
