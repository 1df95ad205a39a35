"""Shapes are visible at the call site: every tensor in the engine's public signatures carries its shape."""

from __future__ import annotations

import typing

import pytest
import torch

from introspection_utils.engine import measure, prompts, vectors
from introspection_utils.models import handle as models

NAMES = {"ModelHandle": models.ModelHandle, "Prompt": prompts.Prompt, "ConceptVector": vectors.ConceptVector}
PUBLIC = [measure.measure, measure.answer_logits, measure.yes_no_logit_diff, measure.logit_lens,
          measure.attention_to_injection, measure.residuals, measure.Readout, vectors.ConceptVector, vectors.VectorBank,
          vectors.last_token_activations, vectors.word_activations, vectors.cosine_similarity_matrix]


def _bare_tensors(hint) -> list:
    """The tensors in an annotation that carry no shape (``Annotated`` metadata)."""
    if typing.get_origin(hint) is typing.Annotated:
        return [] if str(hint.__metadata__[0]).startswith("[") else [hint]
    if hint is torch.Tensor:
        return [hint]
    return [t for arg in typing.get_args(hint) for t in _bare_tensors(arg)]


@pytest.mark.parametrize("obj", PUBLIC, ids=lambda o: o.__qualname__)
def test_every_tensor_in_a_public_signature_has_a_shape(obj):
    hints = typing.get_type_hints(obj, globalns={**vars(measure), **vars(vectors), **NAMES}, include_extras=True)
    bare = {name: hint for name, hint in hints.items() if _bare_tensors(hint)}
    assert not bare, f"{obj.__qualname__}: tensors without a shape: {bare}"


def test_the_shape_reads_like_the_docstrings():
    hints = typing.get_type_hints(measure.attention_to_injection, globalns={**vars(measure), **NAMES},
                                  include_extras=True)
    assert str(hints["return"]).count("[n_trials, n_layers, n_heads]") == 2
