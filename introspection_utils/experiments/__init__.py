"""Experiments: one module per experiment of the notebook series — sweeps, the logit lens and attention, grading,
refusal, SAEs, localization, the atlas, tasks without a yes-bias, and the mechanisms (attribution, patching)."""
