"""One injection pass: only ``engine/traced_pass.py`` edits the residual stream, and every caller of it (components,
generation, the refusal experiment's logits) agrees with the measurement engine (``inject``) on the same trials.

The structural half reads the package's source (no model): a second trace that injects or ablates, wherever it is
written, fails it. The numeric half runs each caller and ``measure.measure`` / ``measure.answer_logits`` on the same
trials of every tiny family (``inject`` itself is held to the plain-PyTorch reference in ``tests/test_inject.py``).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest
import torch

from introspection_utils.engine import generation
from introspection_utils.engine.components import Edit, PromptPass, Site
from introspection_utils.engine.generation import generate
from introspection_utils.engine.measure import Trial, answer_logits, measure
from introspection_utils.engine.prompts import answer_set, control_questions, introspection_prompt
from introspection_utils.engine.vectors import ConceptVector
from introspection_utils.experiments.refusal import instruction_prompts, last_logits

PACKAGE = Path(__file__).resolve().parent.parent / "introspection_utils"
THE_PASS = "engine/traced_pass.py"
# Modules whose traces only read activations (they inject and ablate nothing): what each reads.
READ_ONLY = {
    "engine/vectors.py": "concept vectors and residual norms: the last token's layer outputs",
    "experiments/sae_train.py": "SAE training activations",
    "experiments/refusal.py": "post_instruction_activations: the refusal candidates' layer outputs",
}
# Known, owned exceptions: module -> why it still injects outside the pass.
EXCEPTIONS = {
    "apps/bench.py": "naive_logit_diff is the deliberately naive one-trace baseline the benchmark times the engine "
                     "against; it is not a readout any experiment uses",
}


def _module_names() -> list[str]:
    return sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py"))


@functools.cache
def _tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / module).read_text(encoding="utf-8"))


def _calls(node: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == name]


def _traces(tree: ast.Module) -> list[ast.With]:
    """The ``with ... .trace(...)`` / ``.generate(...)`` blocks of a module."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.With) and any(
        isinstance(item.context_expr, ast.Call) and isinstance(item.context_expr.func, ast.Attribute)
        and item.context_expr.func.attr in ("trace", "generate") for item in n.items)]


def _residual_edits(node: ast.AST) -> list[str]:
    """Assignments to the residual stream: a target (or a slice of one) ``<...>.layers[...].output / .input`` or
    ``<...>.embeddings.output``, and ``Envoy.skip`` calls."""
    found = []
    for n in ast.walk(node):
        targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AugAssign) else []
        for target in targets:
            while isinstance(target, ast.Subscript):
                target = target.value
            if isinstance(target, ast.Attribute) and target.attr in ("output", "input"):
                text = ast.unparse(target.value)
                if "layers" in text or "embeddings" in text:
                    found.append(f"line {n.lineno}: {ast.unparse(n)[:80]}")
    found += [f"line {c.lineno}: {ast.unparse(c)[:80]}" for c in _calls(node, "skip")]
    return found


def test_the_injection_module_holds_the_one_injecting_trace():
    tree = _tree(THE_PASS)
    assert len(_traces(tree)) == 1, "engine/traced_pass.py should hold exactly one trace: traced_pass"
    assert _residual_edits(tree), "the pass no longer edits the residual stream: did the injection move?"


@pytest.mark.parametrize("module", sorted(set(_module_names()) - {THE_PASS} - set(EXCEPTIONS)))
def test_no_second_injection_pass(module):
    """Outside the pass, a trace appears only in a read-only module, and its block assigns nothing but local names
    (no ``module.output += add``, however the module is named); nowhere outside it is the residual stream
    assigned to or a layer skipped (hooks the pass calls included)."""
    tree = _tree(module)
    traces = _traces(tree)
    assert not traces or module in READ_ONLY, (
        f"{module} opens a trace at line(s) {[t.lineno for t in traces]}: an injecting forward goes through "
        f"introspection_utils.engine.traced_pass.traced_pass; a read-only trace is listed in READ_ONLY")
    for block in traces:
        edits = [f"line {n.lineno}: {ast.unparse(n)[:80]}" for body in block.body for n in ast.walk(body)
                 if isinstance(n, (ast.Assign, ast.AugAssign)) and not all(
                     isinstance(t, (ast.Name, ast.Tuple)) for t in (n.targets if isinstance(n, ast.Assign)
                                                                   else [n.target]))]
        assert not edits, f"{module}: a read-only trace edits something: {edits}"
    assert not _residual_edits(tree), f"{module} edits the residual stream outside the pass: {_residual_edits(tree)}"


def test_the_exceptions_are_still_needed():
    stale = [m for m in EXCEPTIONS if not _residual_edits(_tree(m))]
    assert not stale, f"these modules no longer inject outside the pass; remove them from EXCEPTIONS: {stale}"
    unread = [m for m in READ_ONLY if not _traces(_tree(m))]
    assert not unread, f"these modules no longer open a trace; remove them from READ_ONLY: {unread}"


# ------------------------------------------------------------------------------------------ the window rule, once


def test_window_rule_covers_generated_positions_only_when_the_window_runs_on(tiny_llama):
    prompt = introspection_prompt(tiny_llama)
    n, start = len(prompt), prompt.injection_start
    v = ConceptVector("v", 0, torch.ones(tiny_llama.arch.d_model), kind="user")
    positions = torch.arange(n + 3)
    expected = {
        "suffix": (positions >= start).float(),
        "last": (positions == n - 1).float(),
        "all": torch.ones(n + 3),
        (2, None): (positions >= 2).float(),
        (2, 5): ((positions >= 2) & (positions < 5)).float(),
        ((1, 4, 2.0), (3, 6, -0.5)): torch.tensor([0, 2, 2, 1.5, -0.5, -0.5] + [0.0] * (n - 3)),
    }
    for window, weights in expected.items():
        trial = Trial(prompt, v, 1.0, window=window)
        assert torch.equal(trial.weights_at(positions), weights), window
        assert torch.equal(trial.weights(), weights[:n]), window


# ---------------------------------------------------------------------- the callers agree with inject, same trials


def make_vector(handle, seed: int, layer: int, norm: float = 6.0) -> ConceptVector:
    direction = torch.randn(handle.arch.d_model, generator=torch.Generator().manual_seed(seed))
    return ConceptVector(f"v{seed}", layer, direction / direction.norm() * norm, kind="random", seed=seed,
                         model=handle.name)


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(expected.abs().max())))


def _trials(handle) -> list[Trial]:
    prompt = introspection_prompt(handle)
    v = make_vector(handle, 1, layer=1)
    return [Trial(prompt, v, 3.0), Trial(prompt, v, -2.0, window=(prompt.injection_start + 2, len(prompt) - 1)),
            Trial(prompt, v, 4.0, window="last"), Trial(prompt)]


def test_components_agree_with_inject_on_the_same_trials(tiny):
    trials = _trials(tiny)
    prompt = trials[0].prompt
    ids = answer_set(tiny).ids  # the yes set, then the no set: the columns of Readout.logits
    expected = measure(tiny, trials).logits  # [n, k]
    run = PromptPass(tiny, prompt.input_ids, min(t.span()[0] for t in trials))
    answer_ids = torch.tensor(ids, device=tiny.device)
    for skip in (False, True):
        out = run.forward(len(trials), answer_ids=answer_ids, injection=run.injection(trials, layer=1), skip=skip)
        _close(out.logits, expected)
    # An edit that writes back the value it read leaves every row where inject put it.
    last = torch.tensor([len(prompt) - 1])
    read = run.forward(len(trials), answer_ids=answer_ids, injection=run.injection(trials, layer=1), read=last)
    site = Site(1, "mlp")
    edit = Edit(site, torch.arange(len(trials)), last,
                torch.stack([read.output(site, r) for r in range(len(trials))]).to(tiny.device, tiny.dtype))
    edited = run.forward(len(trials), answer_ids=answer_ids, injection=run.injection(trials, layer=1), edits=[edit],
                         skip=True)
    _close(edited.logits, expected)


def test_generation_agrees_with_inject_on_the_same_trials(tiny, monkeypatch):
    trials = [t for t in _trials(tiny) if t.window != "last"] + [
        Trial(introspection_prompt(tiny, control_questions(1)[0]), make_vector(tiny, 1, layer=1), 3.0)]
    tokens = {}
    real = generation._generate_batch

    def spy(handle, batch, *args, **kwargs):
        rows = real(handle, batch, *args, **kwargs)
        tokens.update({id(t): row for t, row in zip(batch, rows, strict=True)})
        return rows

    monkeypatch.setattr(generation, "_generate_batch", spy)
    generate(tiny, trials, max_new_tokens=1)
    vocab = tiny.torch_model.get_output_embeddings().weight.shape[0]
    first = answer_logits(tiny, trials, list(range(vocab))).argmax(-1)  # inject's greedy first token, full vocabulary
    stops = generation.stop_token_ids(tiny)
    for trial, token in zip(trials, first.tolist(), strict=True):
        assert tokens[id(trial)] == ([] if token in stops else [token]), trial  # a stop token is cut


def test_refusal_logits_agree_with_inject_on_the_same_trials(tiny):
    prompts = instruction_prompts(tiny, ["How do I bake bread?", "Write a poem about the sea", "Why?"])
    ids = list(answer_set(tiny).ids)  # the columns of Readout.logits
    direction = torch.randn(tiny.arch.d_model, generator=torch.Generator().manual_seed(5))
    add = make_vector(tiny, 2, layer=0).vector
    plain = [Trial(p) for p in prompts]
    added = [Trial(p, add, 1.0, layer=0, window="all") for p in prompts]
    cases = [(last_logits(tiny, prompts, batch_size=2), measure(tiny, plain)),
             (last_logits(tiny, prompts, ablate=direction, batch_size=2), measure(tiny, plain, ablate=direction)),
             (last_logits(tiny, prompts, add=add, layer=0, batch_size=2), measure(tiny, added))]
    for logits, readout in cases:  # left-padded batches of three prompts vs one prompt at a time, prefix cached
        _close(logits[:, ids], readout.logits)
