"""One injected trial and its control on the embedded model, printed: ``python -m introspection_utils.demo``."""

from __future__ import annotations

from introspection_utils.engine.measure import Trial, measure
from introspection_utils.engine.prompts import control_questions, introspection_prompt
from introspection_utils.engine.vectors import concept_vectors
from introspection_utils.models.handle import load_model


def main(concept: str = "Sandwich", scale: float = 4.0) -> None:
    handle = load_model()
    layer = handle.arch.n_layers // 2
    vector = concept_vectors(handle, [concept]).get(concept, layer)
    question = introspection_prompt(handle)
    control = introspection_prompt(handle, control_questions(1)[0])
    readout = measure(handle, [Trial(question, vector, scale), Trial(control, vector, scale)])
    print(f"{handle!r}\n{vector!r} injected at layer {layer}, scale {scale}")
    for name, prompt, diff, base in zip(("introspection", "control"), (question, control), readout.logit_diff,
                                        readout.baseline, strict=True):
        print(f"  {name:13s} yes−no logit difference {diff:+.3f} (no injection {base:+.3f}, delta {diff - base:+.3f})"
              f"  [{prompt.question}]")


if __name__ == "__main__":
    main()
