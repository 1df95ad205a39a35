"""The first hour of a new user, replayed (issue 23): every mistake gets one error in the user's words before any
compute, a parameter override never touches a committed file, and Ctrl-C on the runner says in one line what was
kept and how to resume — and the resume works.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from introspection_utils.apps.runner import cli as run
from introspection_utils.engine.measure import Trial, measure
from introspection_utils.engine.prompts import introspection_prompt
from introspection_utils.engine.vectors import ConceptVector, concept_vectors
from introspection_utils.models.handle import load_model, resolve_name

ROOT = Path(__file__).resolve().parent.parent
# notebook 02 on tiny-llama, as small as it goes
TINY_02 = ["--model", "tiny-llama", "--notebooks", "02", "-p", "scales", "[0, 2, 4]", "-p", "concepts",
           "['Sandwich']", "-p", "n_controls", "2", "-p", "wordings", "['paper']"]


def _git_status() -> str | None:
    proc = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


# ------------------------------------------------------------------ errors in the user's words


def test_a_fractional_layer_is_refused_by_name(tiny_llama, forbid_compute):
    forbid_compute(tiny_llama)
    with pytest.raises(ValueError, match=r"layer 2\.5 is not a layer index: tiny-llama has decoder layers 0\.\.1"):
        tiny_llama.check_layer(2.5)
    assert tiny_llama.check_layer(1) == 1


def test_a_fractional_layer_on_a_vector_bank_is_refused(tiny_llama, isolated_cache):
    bank = concept_vectors(tiny_llama, ["Sandwich"], baseline_words=["Apple", "River"])
    with pytest.raises(ValueError, match=r"layer 2\.5 is not a layer index: tiny-llama has decoder layers 0\.\.1"):
        bank.get("Sandwich", 2.5)  # the same words as the handle's check: one message for one mistake


def test_trial_takes_a_users_own_tensor_with_a_layer_and_measures_it_like_a_concept_vector(tiny_llama, isolated_cache):
    bank = concept_vectors(tiny_llama, ["Sandwich"], baseline_words=["Apple", "River"])
    vector = bank.get("Sandwich", 1)
    question = introspection_prompt(tiny_llama)
    mine = Trial(question, vector.vector.clone(), 4.0, layer=1)
    assert isinstance(mine.vector, ConceptVector) and mine.vector.kind == "user" and mine.injection_layer == 1
    ours, theirs = measure(tiny_llama, [mine, Trial(question, vector, 4.0)]).logit_diff
    assert torch.equal(ours, theirs)


def test_trial_with_a_raw_tensor_and_no_layer_says_how_to_give_one():
    with pytest.raises(TypeError, match=r"without a layer: pass layer=L"):
        Trial(None, torch.zeros(8), 1.0)
    with pytest.raises(TypeError, match=r"vector must be a ConceptVector .* got list"):
        Trial(None, [0.0] * 8, 1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_cuda_without_cuda_is_one_value_error_before_loading():
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"device 'cuda': CUDA is not available here"):
        load_model("tiny-llama", device="cuda")
    with pytest.raises(ValueError, match=r"unknown device 'gpu'"):
        load_model("tiny-llama", device="gpu")
    assert time.perf_counter() - start < 5


def test_a_hub_id_offline_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"'someone/not-a-model' is not in the local Hugging Face cache") as err:
        load_model("someone/not-a-model")
    assert time.perf_counter() - start < 5, "no retries"
    assert "`hf download someone/not-a-model`" in str(err.value)  # the CLI the venv has (not huggingface-cli)


def test_embedded_models_answer_to_their_hub_ids_and_unknown_names_get_a_suggestion():
    assert resolve_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert resolve_name("Qwen/Qwen2.5-Coder-1.5B-Instruct") == "qwen2.5-coder-1.5b-instruct"
    assert resolve_name("huggingfacetb/smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert resolve_name("google/gemma-2-9b-it") == "google/gemma-2-9b-it"  # a hub id: checked when it loads
    with pytest.raises(ValueError, match=r"unknown model 'smollm2': did you mean 'smollm2-135m-instruct'"):
        resolve_name("smollm2")
    with pytest.raises(ValueError, match=r"did you mean 'tiny-llama'"):
        resolve_name("tiny_llama")
    with pytest.raises(ValueError, match=r"no GGUF file at .*nowhere\.gguf"):
        resolve_name("nowhere.gguf")


def test_a_phrase_is_a_concept(tiny_llama, isolated_cache):
    bank = concept_vectors(tiny_llama, ["ice cream"], baseline_words=["Apple", "River"])
    assert bank.words == ("ice cream",) and torch.isfinite(bank.get("ice cream", 1).vector).all()


# ------------------------------------------------------------------ the runner checks first, and never clobbers


@pytest.mark.parametrize(("argv", "message"), [
    (["--notebooks", "02", "-p", "scales", "[0,2,"], r"parameter 'scales': '\[0,2,' is not a Python/JSON literal"),
    (["--notebooks", "02", "-p", "scales", "4"], r"parameter 'scales' takes a list such as \[0, 2, 4\]"),
    (["--notebooks", "02", "-p", "model", "smollm2"], r"unknown model 'smollm2': did you mean"),
    (["--notebooks", "2x"], r"notebook '2x' matches 0 notebooks; choose from 00, 01"),
    (["--notebooks", "02", "-p", "colour", "1"], r"02_scale_sweep.ipynb was not started: unknown parameter"),
    (["--notebooks", "02", "--tag", "a b"], r"--tag 'a b': use letters"),
    (["--notebooks", "02", "-p", "concepts", "Volcano"], r"parameter 'concepts' takes a list of words such as "
     r"\['Sandwich', 'Water'\]; got the single word 'Volcano': write it as a list, -p concepts \"\['Volcano'\]\""),
    (["--notebooks", "02", "-p", "concepts", "['Dust', 'a sentence of far too many words']"],
     r"parameter 'concepts': concept 'a sentence of far too many words': a concept is a word or a phrase"),
    (["--notebooks", "02", "--model", "tiny-llama", "-p", "layer", "99"],
     r"parameter 'layer': layer 99 is out of range for tiny-llama \(0\.\.1\)"),
    (["--notebooks", "03", "--model", "tiny-llama", "-p", "layers", "[0, 2.5]"],
     r"parameter 'layers': layer 2\.5 is not a layer index: tiny-llama has decoder layers 0\.\.1"),
])
def test_the_runner_refuses_before_any_kernel_starts_and_creates_nothing(argv, message, tmp_path, capsys):
    assert run.main([*argv, "--output", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_the_runner_and_the_explorer_refuse_a_hub_id_they_cannot_have_before_any_kernel(monkeypatch, tmp_path, capsys):
    from introspection_utils.apps import explore

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    argv = ["--notebooks", "02", "--model", "someone/not-a-model", "--output", str(tmp_path / "runs")]
    assert run.main(argv) == 1
    err = capsys.readouterr().err
    assert "'someone/not-a-model' is not in the local Hugging Face cache" in err and "hf download" in err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match="is not in the local Hugging Face cache"):
        explore.check_served_parameters({"model": "someone/not-a-model"})
    with pytest.raises(ValueError, match=r"parameter 'layer': layer 5 is out of range for tiny-llama"):
        explore.check_served_parameters({"model": "tiny-llama", "layer": 5})  # the runner's check, word for word
    with pytest.raises(ValueError, match=r"parameter 'concepts' takes a list of words"):
        explore.check_served_parameters({"model": "tiny-llama", "concepts": "Volcano"})


def test_help_answers_without_importing_torch():
    code = "import sys, introspection_utils.apps.runner.cli as r\n" \
           "try:\n    r.main(['--help'])\nexcept SystemExit:\n    pass\n" \
           "assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "--cell-timeout" in proc.stdout, proc.stderr


def test_a_run_with_parameters_goes_to_its_own_folder():
    place = run.placement("smollm2-135m-instruct", {"scales": [0, 2]}, output=Path("runs"),
                          default_model="smollm2-135m-instruct")
    assert not place.reference and place.folder.parent.name == "smollm2-135m-instruct"
    assert place.folder.name.startswith("p-") and place.parameters["figures_dir"].startswith(str(place.folder))
    tagged = run.placement("smollm2-135m-instruct", {}, tag="try1", default_model="smollm2-135m-instruct")
    assert tagged.folder.name == "try1" and not tagged.reference
    demo = run.placement("smollm2-135m-instruct", {}, default_model="smollm2-135m-instruct")
    assert demo.reference and demo.parameters == {"figures_dir": str(run.FIGURES_DIR / "smollm2-135m-instruct")}


def test_threads_default_to_the_free_cpus(monkeypatch):
    from introspection_utils.apps.runner import checks as run_checks

    assert 1 <= run.default_threads() <= (os.cpu_count() or 1)
    if os.path.exists("/proc/stat"):  # sampled now, not the lagging load average
        assert 0.0 <= run_checks._busy_cpus(0.2) <= (os.cpu_count() or 1) + 1e-9
    monkeypatch.setattr(run_checks, "_busy_cpus", lambda: float(os.cpu_count() or 1))  # every CPU busy: still 1
    assert run.default_threads() == 1
    monkeypatch.setattr(run_checks, "_busy_cpus", lambda: 0.0)  # all idle: all of them
    assert run.default_threads() == min(os.cpu_count() or 1, len(os.sched_getaffinity(0)))


# notebook 02 on tiny-llama with a sweep long enough to interrupt: 13 questions, one checkpoint each (~0.1 s apiece
# here), then two figure cells (seconds)
SLOW_02 = ["--model", "tiny-llama", "--notebooks", "02", "-p", "scales", str(list(range(16))), "-p", "concepts",
           "['Sandwich']", "-p", "n_controls", "12", "-p", "wordings", "['paper']"]


def _default_sigint() -> None:
    # A process started with SIGINT ignored (a non-interactive shell's background job, as in CI) keeps it ignored:
    # Python installs its KeyboardInterrupt handler only where SIGINT is at its default. A user's Ctrl-C reaches a
    # foreground process, so the test gives the runner what a terminal gives it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_an_interrupted_run_says_how_to_resume_and_the_resume_finishes(tmp_path):
    """Ctrl-C once notebook 02's sweep has checkpointed its first question: one line, the command, nothing tracked
    changed, the checkpoints kept; the command then runs to the end. The signal is sent on the sweep's own checkpoint
    (a file), not on a printed line or a clock, so the machine's speed cannot move it past the end."""
    before = _git_status()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [*SLOW_02, "--output", str(tmp_path / "runs")]
    proc = subprocess.Popen([sys.executable, "-m", "introspection_utils.run", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    chunks = tmp_path / "runs" / "tiny-llama"
    deadline = time.monotonic() + 900  # a bound for a loaded 2-core machine, not a measurement
    while not list(chunks.glob("*/results/.chunks/*/*.csv")):
        assert proc.poll() is None, "the run ended before the sweep wrote a checkpoint: " + "".join(proc.communicate())
        assert time.monotonic() < deadline, "no sweep checkpoint under runs/tiny-llama/*/results/.chunks/ in 900 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, f"rc {proc.returncode}\n{out}\n{err}"
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "Traceback" not in err, err
    kept = sorted(p.name for p in chunks.glob("*/results/.chunks/*/*.csv"))
    assert kept, "the checkpoints written before Ctrl-C were lost"
    command = lines[0].split("Resume: ", 1)[1]
    assert "--notebooks 02" in command and "--output" in command
    resumed = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    folder, = (tmp_path / "runs" / "tiny-llama").glob("p-*")
    assert (folder / "02_scale_sweep.ipynb").is_file() and (folder / "figures" / "02_scale_sweep.png").is_file()
    assert (folder / "timings.csv").read_text().count("02_scale_sweep.ipynb") == 1
    table = folder / "results" / "scale_sweep.csv"
    assert table.is_file() and table.read_text().count("\n") > 13 * 16  # every question at every scale
    assert _git_status() == before


def test_full_size_parameters_are_declared_and_differ_from_the_demo_defaults():
    full = run.read_full_size()
    assert set(full) == {"00", "02", "03", "04", "05", "06", "07", "08", "09", "10", "11", "13", "14"}
    plans = {p.name[:2]: params for p, params in run.plan_runs(run.notebooks(list(full)), {}, full)}
    for prefix, params in full.items():
        defaults = run.declared_parameters(run.notebooks([prefix])[0])
        assert any(str(v) != defaults[k]["default"].split("#")[0].strip() for k, v in params.items())
        assert plans[prefix] == params
