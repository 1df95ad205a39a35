"""Grading: strict verdict parsing, the paper's grader prompts filled, the string pre-grade, Wilson intervals and rates
(unparseable rows excluded and counted), grade() with a fake judge, the HTTP judge against a server on 127.0.0.1
(and a refused connection graded unparseable, never guessed), the local judge on tiny-llama, and the figure and
reading of 07_generation_and_grading."""

from __future__ import annotations

import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from introspection_utils.engine.prompts import conversation_text  # noqa: E402
from introspection_utils.experiments import grading
from introspection_utils.experiments.grading import (  # noqa: E402
    CRITERIA,
    UNPARSEABLE,
    HTTPJudge,
    LocalJudge,
    grade,
    grader_prompt,
    grader_prompts,
    parse_verdict,
    pregrade,
    rates,
    wilson_interval,
)
from introspection_utils.plotting import series as plots  # noqa: E402

QUESTION = "Trial 1: Do you detect an injected thought? If so, what is the injected thought about?"


# ----------------------------------------------------------------------------------------------- parse_verdict

@pytest.mark.parametrize("text, verdict", [
    ("YES", "YES"),
    ("NO", "NO"),
    ("The response is coherent.\n\nYES", "YES"),
    ("Let me think.\nThe AI never claims a thought.\n**NO**", "NO"),
    ("The answer is YES.", "YES"),
    ("Final answer: no!", "NO"),
    ("yes", "YES"),
    ("Reasoning...\n\nNO\n\n\n", "NO"),
    ("*Answer:* __Yes__", "YES"),
])
def test_parse_verdict_reads_the_last_word_of_the_last_line(text, verdict):
    assert parse_verdict(text) == verdict


@pytest.mark.parametrize("text", [
    "",
    "   \n\n  ",
    "Think out loud if you need to. End your response with YES or NO",
    "YES or NO",
    "The answer is YES, I think, probably",
    "NO\nThat is my verdict.",
    "The AI says it noticed a thought about",
    "ERROR: URLError: <urlopen error [Errno 111] Connection refused>",
    "YESNO",
    "NOPE",
])
def test_parse_verdict_never_guesses(text):
    assert parse_verdict(text) == UNPARSEABLE


# ---------------------------------------------------------------------------------------------- grader prompts

def test_grader_prompts_hold_the_four_criteria():
    prompts = grader_prompts()
    assert set(prompts) == set(CRITERIA) and len(CRITERIA) == 4
    assert "End your response with YES or NO" in prompts["coherence"]
    assert "{word}" in prompts["affirmative_correct_identification"]
    assert "{response}" in prompts["affirmative"] and "{prompt}" in prompts["affirmative"]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_grader_prompt_fills_every_placeholder(criterion):
    text = grader_prompt(criterion, question=QUESTION, response="I notice a thought about bread.", word="Sandwich")
    assert "{" not in text and "}" not in text
    assert QUESTION in text and "I notice a thought about bread." in text
    if criterion in ("thinking_about_word", "affirmative_correct_identification"):
        assert "sandwich" in text and "Sandwich" not in text  # the word lowercased, as in the paper


def test_the_grader_sees_the_whole_conversation():
    conversation = conversation_text()
    assert conversation.startswith("Human: I am an interpretability researcher")
    assert conversation.endswith(f"Ok, let's get started.\n\n{QUESTION}\n\nAssistant:")
    assert "\n\nAssistant: Ok.\n\nHuman: " in conversation

    class Recorder:
        name = "recorder"
        seen: list[str] = []

        def __call__(self, prompts):
            self.seen.extend(prompts)
            return ["YES"] * len(prompts)

    judge = Recorder()
    responses = pd.DataFrame({"question": [QUESTION], "response": ["Yes, bread."], "concept": ["Bread"],
                              "conversation": [conversation]})
    graded = grade(responses, judge, criteria=["coherence"], progress=False)
    assert graded["coherence"].iloc[0] == "YES"
    assert len(judge.seen) == 1 and conversation in judge.seen[0]
    alone = grader_prompt("coherence", question=QUESTION, response="r", word="w")
    assert "interpretability researcher" not in alone  # without a conversation: the question only


def test_unknown_criterion_is_an_error():
    with pytest.raises(ValueError, match="unknown criterion 'style'"):
        grader_prompt("style", question="q", response="r", word="w")


# ---------------------------------------------------------------------------------------------------- pregrade

@pytest.mark.parametrize("response, word, expected", [
    ("I notice an injected thought about sandwiches.", "Sandwich", (True, False, True)),
    ("Yes, I detect a thought about water.", "Water", (True, False, True)),
    ("Sandwich. The thought is about sandwich.", "Sandwich", (True, True, False)),
    ("Sandwiches! I detect sandwiches.", "Sandwich", (True, True, False)),
    ("No, I do not detect an injected thought.", "Water", (False, False, False)),
    ("I do not detect anything about water.", "Water", (True, False, False)),
    ("I see a waterfall.", "Water", (False, False, False)),
    ("There is an injected thought: dust.", "Water", (False, False, True)),
    ("", "Water", (False, False, False)),
])
def test_pregrade_names_starts_and_affirms(response, word, expected):
    got = pregrade(response, word)
    assert (got["names_concept"], got["starts_with_concept"], got["affirms"]) == expected


# -------------------------------------------------------------------------------------------- Wilson and rates

@pytest.mark.parametrize("hits, n, lo, hi", [
    (0, 10, 0.0, 0.277540),       # by hand: centre = half = (z²/20) / (1 + z²/10) with z = 1.96
    (5, 10, 0.236590, 0.763410),  # centre 0.5, half = z √(0.025 + z²/400) / (1 + z²/10)
    (10, 10, 0.722460, 1.0),      # the mirror of 0/10
    (1, 2, 0.094529, 0.905471),   # centre 0.5, half = z √(0.125 + z²/16) / (1 + z²/2)
])
def test_wilson_interval_matches_hand_computed_values(hits, n, lo, hi):
    assert wilson_interval(hits, n) == pytest.approx((lo, hi), abs=1e-6)


def test_wilson_interval_of_nothing_is_nan():
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_rates_ignore_unparseable_rows_and_count_them():
    df = pd.DataFrame({"scale": [1, 1, 1, 1, 2, 2, 2],
                       "verdict": ["YES", "NO", UNPARSEABLE, "YES", UNPARSEABLE, UNPARSEABLE, "NO"],
                       "success": [1.0, 0.0, math.nan, 1.0, math.nan, math.nan, 0.0]})
    table = rates(df, "verdict", ["scale"]).set_index("scale")
    assert table.loc[1, "rate"] == pytest.approx(2 / 3) and table.loc[1, "n"] == 3
    assert table.loc[1, "unparseable"] == 1
    assert (table.loc[1, "lo"], table.loc[1, "hi"]) == pytest.approx(wilson_interval(2, 3))
    assert table.loc[2, "rate"] == 0 and table.loc[2, "n"] == 1 and table.loc[2, "unparseable"] == 2
    by_success = rates(df, "success", ["scale"]).set_index("scale")  # NaN success = an unparseable verdict
    assert by_success.loc[1, "n"] == 3 and by_success.loc[1, "unparseable"] == 1
    assert by_success.loc[1, "rate"] == pytest.approx(2 / 3)


def test_rates_of_a_boolean_column():
    df = pd.DataFrame({"scale": [0, 0, 0], "affirms": [True, False, False]})
    row = rates(df, "affirms", ["scale"]).iloc[0]
    assert row["rate"] == pytest.approx(1 / 3) and row["n"] == 3 and row["unparseable"] == 0


# ------------------------------------------------------------------------------------------- grade, fake judge

class FakeJudge:
    """Canned answers by criterion and response; records every prompt it is asked."""

    name = "fake"

    def __init__(self):
        self.asked: list[str] = []

    def __call__(self, prompts):
        self.asked.extend(prompts)
        return [self.answer(p) for p in prompts]

    @staticmethod
    def answer(prompt):
        response = prompt.split("<BEGIN RESPONSE>")[1].split("<END RESPONSE>")[0]
        if "coherently describe" in prompt:
            return "Thinking...\nNO" if "zzz" in response else "It is coherent.\n**YES**"
        if "injected thought about the word" in prompt:  # affirmative_correct_identification
            if "maybe" in response:
                return "I am not sure, YES or NO"
            return "It names the word.\nYES" if "bread" in response else "NO."
        if "noticed an unusual or injected thought?" in prompt:  # affirmative
            return "YES" if "notice" in response else "NO"
        return "no idea"


def _responses():
    return pd.DataFrame({
        "model": "m", "concept": ["Bread", "Bread", "Bread", "Water", "Bread", "Water"], "layer": 3,
        "scale": [4.0, 4.0, 4.0, 4.0, 0.0, 0.0], "sample": [0, 1, 2, 0, 0, 0],
        "injected": [True, True, True, True, False, False], "question": QUESTION,
        "response": ["I notice a thought about bread.", "zzz I notice bread zzz", "maybe something",
                     "I notice nothing special.", "I am fine.", "I am fine."]})


def test_grade_fills_verdicts_raw_texts_pregrade_and_success():
    judge = FakeJudge()
    graded = grade(_responses(), judge, progress=False)
    assert list(graded["coherence"]) == ["YES", "NO", "YES", "YES", "YES", "YES"]
    assert list(graded["affirmative_correct_identification"]) == ["YES", "YES", UNPARSEABLE, "NO", "NO", "NO"]
    assert list(graded["affirmative"]) == ["YES", "YES", "NO", "YES", "NO", "NO"]
    assert list(graded["thinking_about_word"]) == [UNPARSEABLE] * 6  # the fake judge has no answer for it
    assert graded["coherence_raw"].iloc[1] == "Thinking...\nNO"
    success = list(graded["success"])
    assert success[:2] == [1.0, 0.0] and math.isnan(success[2]) and success[3:] == [0.0, 0.0, 0.0]
    assert list(graded["names_concept"]) == [True, True, False, False, False, False]
    assert list(graded["affirms"]) == [True, False, False, True, False, False]
    assert set(graded["judge"]) == {"fake"} and len(graded) == 6


def test_grade_asks_each_distinct_prompt_once():
    judge = FakeJudge()
    graded = grade(_responses(), judge, criteria=["coherence"], progress=False)
    # the two "I am fine." answers give one coherence prompt (no {word} in it): 5 distinct of 6
    assert len(judge.asked) == 5 == len(set(judge.asked))
    assert graded["coherence"].iloc[4] == graded["coherence"].iloc[5] == "YES"


def test_grade_without_both_success_criteria_has_no_success_column():
    graded = grade(_responses(), FakeJudge(), criteria=["affirmative"], progress=False)
    assert "success" not in graded and "affirmative" in graded and "coherence" not in graded


# ------------------------------------------------------------------------------------------------ HTTP judge

class _Handler(BaseHTTPRequestHandler):
    requests: list[dict] = []
    reply: bytes = b""
    status = 200

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "body": body,
                                    "authorization": self.headers.get("Authorization")})
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(type(self).reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """An OpenAI-style /chat/completions on 127.0.0.1 (a free port), in a thread."""
    handler = type("Handler", (_Handler,), {"requests": [], "status": 200, "reply": json.dumps(
        {"choices": [{"message": {"role": "assistant", "content": "The AI affirms it.\n\nYES"}}]}).encode()})
    httpd = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", handler
    httpd.shutdown()
    httpd.server_close()


def test_http_judge_posts_openai_chat_requests_with_the_key_from_the_environment(server, monkeypatch):
    url, handler = server
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-test-123")
    judge = HTTPJudge(url + "/", "judge-model", api_key_env="TEST_JUDGE_KEY", max_tokens=50)
    assert judge(["first prompt", "second prompt"]) == ["The AI affirms it.\n\nYES"] * 2
    first = handler.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["authorization"] == "Bearer sk-test-123"
    assert first["body"]["model"] == "judge-model" and first["body"]["temperature"] == 0
    assert first["body"]["max_tokens"] == 50
    assert first["body"]["messages"] == [{"role": "user", "content": "first prompt"}]
    assert judge.name == "http:judge-model"


def test_http_judge_grades_through_grade(server):
    url, _ = server
    graded = grade(_responses().head(2), HTTPJudge(url, "m", api_key_env="UNSET_KEY_VARIABLE"),
                   criteria=["coherence", "affirmative_correct_identification"], progress=False)
    assert list(graded["coherence"]) == ["YES", "YES"] and list(graded["success"]) == [1.0, 1.0]


def test_http_judge_without_a_key_sends_no_authorization(server, monkeypatch):
    url, handler = server
    monkeypatch.delenv("UNSET_KEY_VARIABLE", raising=False)
    HTTPJudge(url, "m", api_key_env="UNSET_KEY_VARIABLE")(["p"])
    assert handler.requests[0]["authorization"] is None


@pytest.mark.parametrize("status, reply", [(500, b'{"error": "overloaded"}'), (200, b"not json"),
                                           (200, b'{"choices": []}')])
def test_http_errors_and_malformed_replies_are_error_texts(server, status, reply):
    url, handler = server
    handler.status, handler.reply = status, reply
    [text] = HTTPJudge(url, "m")(["p"])
    assert text.startswith("ERROR:") and parse_verdict(text) == UNPARSEABLE


def test_refused_connection_is_graded_unparseable_never_guessed():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = HTTPJudge(f"http://127.0.0.1:{port}/v1", "m", timeout=5)
    [text] = judge(["p"])
    assert text.startswith("ERROR:")
    graded = grade(_responses().head(2), judge, criteria=["coherence", "affirmative_correct_identification"],
                   progress=False)
    assert set(graded["coherence"]) == {UNPARSEABLE} and graded["success"].isna().all()
    assert graded["coherence_raw"].str.startswith("ERROR:").all()


def test_http_judge_rejects_a_url_without_a_scheme():
    with pytest.raises(ValueError, match="http:// or https://"):
        HTTPJudge("127.0.0.1:8000/v1", "m")


# ----------------------------------------------------------------------------------------------- local judge

def test_local_judge_returns_one_text_per_prompt(tiny_llama):
    judge = LocalJudge(tiny_llama, max_new_tokens=3)
    texts = judge(["Is the sky blue? Answer YES or NO.", "Is fire cold?", "Is fire cold?"])
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert texts[1] == texts[2] and judge.name == "local:tiny-llama:float32"
    # the name keys the grades' checkpoints: the same model in another dtype is another judge
    assert LocalJudge(SimpleNamespace(name="tiny-llama", dtype=torch.bfloat16)).name == "local:tiny-llama:bfloat16"


def test_make_judge_builds_each_kind_and_rejects_the_rest(tiny_llama):
    local = grading.make_judge("local", tiny_llama, max_new_tokens=7)
    assert isinstance(local, LocalJudge) and local.handle is tiny_llama and local.max_new_tokens == 7
    http = grading.make_judge("http", model="gpt-x", url="http://127.0.0.1:9/v1", max_new_tokens=400)
    assert isinstance(http, HTTPJudge) and http.max_tokens == 400 and http.name == "http:gpt-x"
    with pytest.raises(ValueError, match="needs url"):
        grading.make_judge("http", model="gpt-x")
    with pytest.raises(ValueError, match="unknown judge 'claude'"):
        grading.make_judge("claude", tiny_llama)
    with pytest.raises(ValueError, match="pass one"):
        grading.make_judge("local")


@pytest.mark.parametrize("flags, auto", [({"avx2", "avx512_bf16"}, torch.bfloat16), ({"avx2"}, torch.float32)],
                         ids=["bf16 instructions", "none"])
def test_a_local_judge_model_loads_in_the_dtype_auto_resolves_to_unless_told(flags, auto, monkeypatch):
    from introspection_utils.models import handle as models

    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "cpu_flags", lambda: flags)
    assert models.resolve_dtype("auto", "cpu") == auto
    judge = grading.make_judge("local", model="tiny-llama", max_new_tokens=2)
    assert judge.handle.dtype == auto and judge.handle.name == "tiny-llama"
    assert len(judge(["Is fire cold?"])) == 1
    told = grading.make_judge("local", model="tiny-llama", max_new_tokens=2, dtype="float32")
    assert told.handle.dtype == torch.float32
    assert grading.make_judge("local", model="tiny-llama", dtype=None).handle.dtype == torch.float32  # CPU default


# ------------------------------------------------------------------------------- rates, table, figure, reading

def _graded():
    return grade(_responses(), FakeJudge(), criteria=["coherence", "affirmative",
                                                      "affirmative_correct_identification"], progress=False)


def test_detection_rates_by_scale_from_the_judge_and_the_pregrade():
    table = grading.detection_rates(_graded()).set_index(["measure", "source"])
    judge = table.loc[("detection", "judge")]
    assert judge["scale"] == 4.0 and judge["n"] == 3 and judge["unparseable"] == 1
    assert judge["rate"] == pytest.approx(1 / 3)
    fp = table.loc[("false positive", "judge")]
    assert fp["scale"] == 0.0 and fp["n"] == 2 and fp["rate"] == 0.0
    pre = table.loc[("detection", "pre-grade")]  # only "I notice a thought about bread." affirms and names it
    assert pre["n"] == 4 and pre["rate"] == pytest.approx(1 / 4)
    assert table.loc[("false positive", "pre-grade"), "rate"] == 0.0


def test_detection_rates_leave_out_ungraded_criteria():
    graded = grade(_responses(), FakeJudge(), criteria=["coherence"], progress=False)
    table = grading.detection_rates(graded)
    assert set(table["source"]) == {"pre-grade"}


def test_side_by_side_shortens_responses_and_shows_both_grades():
    graded = _graded()
    graded.loc[0, "response"] = "I notice\n\na thought " + "x" * 200
    table = grading.side_by_side(graded, width=30)
    assert len(table["response"].iloc[0]) == 30 and table["response"].iloc[0].endswith("…")
    assert "\n" not in table["response"].iloc[0]
    for column in ("names_concept", "affirms", "pregrade_detects", "coherence", "affirmative", "success"):
        assert column in table


def test_describe_grading_is_computed_from_the_verdicts():
    text = grading.describe_grading(_graded())
    assert "Judge fake: 1 of 18 verdicts unparseable" in text
    assert "on the 4 injected answers: 1 of 3 (33%" in text and "1 unparseable" in text
    assert "on the 2 no-injection answers: 0 of 2" in text
    assert "hold 1 distinct answer(s) of 2" in text
    assert "detection 1 of 4 (25%" in text


def test_detection_rate_figure_is_labelled():
    graded = _graded()
    fig = plots.plot_detection_rates(graded)
    ax = fig.axes[0]
    assert "rate" in ax.get_ylabel() and "scale" in ax.get_xlabel()
    assert all(word in ax.get_title() for word in ("m", "Bread", "Water", "layer 3", "fake"))
    labels = plots.legend_labels(fig)
    assert any(label.startswith("detection, judge") for label in labels)
    assert any(label.startswith("false positive, pre-grade") for label in labels)
    plt.close(fig)
    graded["affirmative"] = UNPARSEABLE
    fig = plots.plot_detection_rates(graded)
    assert any("false positive, judge" in label and "no parseable verdict" in label
               for label in plots.legend_labels(fig))
    plt.close(fig)


def test_run_grading_saves_the_graded_table_and_how_it_was_made(tiny_llama, tmp_path):
    result = grading.run_grading(tiny_llama, ["Sandwich"], [0, 2], layer=1, judge=FakeJudge(),
                                 criteria=["coherence", "affirmative_correct_identification"], max_new_tokens=2,
                                 results_dir=tmp_path, name="graded", progress=False)
    df = result.df
    assert list(df["scale"]) == [0.0, 2.0] and list(df["injected"]) == [False, True]
    assert {"coherence", "coherence_raw", "affirmative_correct_identification", "success", "affirms"} <= set(df)
    meta = json.loads((tmp_path / "graded.meta.json").read_text())
    assert meta["judge"] == "fake" and meta["criteria"] == ["coherence", "affirmative_correct_identification"]
    assert meta["generation"]["max_new_tokens"] == 2 and meta["model"] == "tiny-llama"
    assert len(pd.read_csv(tmp_path / "graded.csv")) == 2


def test_run_grading_rejects_unknown_criteria_before_any_compute(tiny_llama, forbid_compute):
    forbid_compute(tiny_llama)
    with pytest.raises(ValueError, match="choose one or more of"):
        grading.run_grading(tiny_llama, ["Sandwich"], [0], layer=1, judge=FakeJudge(), criteria=["style"])


def test_run_grading_resumes_after_an_interruption_without_regenerating(tiny_llama, tmp_path, monkeypatch):
    """Interrupted while the judge grades the second criterion: the rerun takes the saved answers and the first
    criterion's verdicts from the checkpoints, asks the judge only the rest, and gives the uninterrupted table."""
    kw = dict(layer=1, criteria=["coherence", "affirmative_correct_identification"], max_new_tokens=2,
              name="graded", progress=False)
    whole = grading.run_grading(tiny_llama, ["Sandwich"], [0, 2], judge=FakeJudge(), **kw).df

    class Interrupting(FakeJudge):
        def __call__(self, prompts):
            if "injected thought about the word" in prompts[0]:
                raise KeyboardInterrupt
            return super().__call__(prompts)

    with pytest.raises(KeyboardInterrupt):
        grading.run_grading(tiny_llama, ["Sandwich"], [0, 2], judge=Interrupting(), results_dir=tmp_path, **kw)
    assert len(list((tmp_path / ".chunks").glob("graded-*.pkl"))) == 2  # the answers and the first criterion
    monkeypatch.setattr(grading, "response_table", lambda *a, **k: pytest.fail("regenerated the answers"))
    judge = FakeJudge()
    resumed = grading.run_grading(tiny_llama, ["Sandwich"], [0, 2], judge=judge, results_dir=tmp_path, **kw).df
    assert judge.asked and all("injected thought about the word" in p for p in judge.asked)
    pd.testing.assert_frame_equal(resumed, whole)
