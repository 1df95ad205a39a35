"""The experiment registry: one entry per notebook of the series (``notebooks/NN_<name>.ipynb``) saying what it
computes, how it reads, what it draws and saves, and how the findings read it back.

The runner's list (``python -m introspection_utils.run --list``), the notebook table of ``docs/notebooks.md``
(``run --write-guide``), the findings' notebook-by-notebook readings (``apps/findings.py``) and the tests (every
notebook has one entry and each entry matches what its notebook calls and saves; every module of ``experiments/``
serves an entry) all read :data:`EXPERIMENTS`. Adding an experiment is its module in ``experiments/`` and one entry
here (``docs/design.md`` has the checklist).

Names of package code are written ``"folder.module"`` (``modules``) or ``"folder.module.function"`` (``readings``,
``findings``) so that reading the registry imports nothing; :func:`resolve` imports one. A figure or table name with
a part the run fills in writes it in braces: ``"09_sae_features_{concept}"``, ``"atlas{_format}_sweep"``
(:func:`pattern` turns it into a glob).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import import_module
from typing import Any

_NOTEBOOK = re.compile(r"^\d\d_[a-z0-9_]+$")
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")


@dataclass(frozen=True)
class Experiment:
    """One notebook of the series.

    ``notebook``: the file's stem (``"02_scale_sweep"``); ``title``: its short name; ``question``: what it answers
    (the notebook guide's column); ``modules``: the package modules whose calls compute it (``"experiments.sweeps"``;
    the engine itself for 00 and 01); ``figures``: the names it saves figures under (``save_figure``);
    ``tables``: the tables it saves into ``results_dir``; ``readings``: the functions whose sentences it prints;
    ``findings``: the function that recomputes those sentences from its saved tables for ``findings.md``
    (``folder(results) -> list[str]``), or ``None`` when the findings have no section of its own (00 and 01 save no
    table; 11's atlas is the findings' claims table); ``guide_figure``/``alt``: the figure the notebook guide shows
    and its alt text.
    """

    notebook: str
    title: str
    question: str
    modules: tuple[str, ...]
    figures: tuple[str, ...]
    tables: tuple[str, ...]
    readings: tuple[str, ...]
    guide_figure: str
    alt: str
    findings: str | None = None

    def __post_init__(self) -> None:
        if not _NOTEBOOK.match(self.notebook):
            raise ValueError(f"notebook {self.notebook!r}: write the file's stem, e.g. '02_scale_sweep'")
        if not any(_matches(self.guide_figure, f) for f in self.figures):
            raise ValueError(f"{self.notebook}: guide_figure {self.guide_figure!r} is none of its figures "
                             f"{list(self.figures)}")
        for name in (*self.modules, *self.readings, *([self.findings] if self.findings else [])):
            if name.count(".") < 1:
                raise ValueError(f"{self.notebook}: {name!r} must be written 'folder.module[.function]'")

    @property
    def number(self) -> str:
        """The two-digit prefix (``"02"``): how the runner selects it and how its findings table is named."""
        return self.notebook[:2]

    @property
    def findings_table(self) -> str:
        """The name of its parameter table in a findings file (``["02"]`` in ``data/findings/<model>.toml``)."""
        return self.number


def pattern(name: str) -> str:
    """A figure or table name as a glob: each ``{part}`` the run fills in becomes ``*``."""
    return _PLACEHOLDER.sub("*", name)


def _matches(name: str, template: str) -> bool:
    from fnmatch import fnmatchcase

    return fnmatchcase(name, pattern(template))


def resolve(name: str) -> Any:
    """The module (``"experiments.sweeps"``) or function (``"readings.saved.scale_sweep"``) a registry name
    denotes, imported."""
    try:
        return import_module(f"introspection_utils.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"introspection_utils.{name}":  # the module exists but something it imports does not
            raise
    module, _, attribute = name.rpartition(".")
    return getattr(import_module(f"introspection_utils.{module}"), attribute)


def by_number(number: str) -> Experiment:
    """The entry of notebook ``number`` (``"02"``); a ``KeyError`` naming the numbers there are otherwise."""
    for entry in EXPERIMENTS:
        if entry.number == number:
            return entry
    raise KeyError(f"no experiment {number!r} in the registry; it has {[e.number for e in EXPERIMENTS]}")


EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment(
        "00_quickstart", "Quickstart",
        question=("One injected trial and its control, in numbers; the same trial as one raw nnsight trace "
                  "(inject, then read), checked equal to `measure`; then the explorer (concept, layer, scale, "
                  "question, concept-vs-random vector)"),
        modules=("engine.measure",),
        figures=("00_explorer_initial",),
        tables=(),
        readings=("readings.sentences.describe_readout",),
        guide_figure="00_explorer_initial", alt="explorer initial state: scale sweep with the current trial starred"),
    Experiment(
        "01_concept_vectors", "Concept vectors",
        question=("What do we inject? Concept-vector norms by layer (a scale multiplies these raw vectors), cosine "
                  "similarity between concepts, the disk cache (second call timed)"),
        modules=("engine.vectors",),
        figures=("01_vector_norms", "01_cosine_matrix"),
        tables=(),
        readings=("readings.sentences.describe_vectors",),
        guide_figure="01_vector_norms", alt="concept-vector norms by layer"),
    Experiment(
        "02_scale_sweep", "Scale sweep",
        question=('As the injection grows, does the introspection answer move towards "yes" before and more than '
                  "the control questions? Sandwich (the write-up's clean case) and water (muddy)"),
        modules=("experiments.sweeps",),
        figures=("02_scale_sweep",),
        tables=("scale_sweep",),
        readings=("readings.sentences.describe_scale_sweep",),
        findings="readings.saved.scale_sweep",
        guide_figure="02_scale_sweep", alt="scale sweeps for sandwich and water"),
    Experiment(
        "03_layer_sweep", "Layer sweep",
        question=("At a fixed scale, which injection layers move the introspection answer, and do the same layers "
                  "move the controls?"),
        modules=("experiments.sweeps",),
        figures=("03_layer_sweep",),
        tables=("layer_sweep",),
        readings=("readings.sentences.describe_layer_sweep",),
        findings="readings.saved.layer_sweep",
        guide_figure="03_layer_sweep", alt="layer sweeps for sandwich and water"),
    Experiment(
        "04_logit_lens", "Logit lens",
        question=("At the peak scale (where the introspection residual I is largest, as the atlas's test picks "
                  "it), how does yes − no build up layer by layer — introspection vs control, concept vs random? "
                  "Flips and answer mass stated"),
        modules=("experiments.logit_lens", "experiments.sweeps"),
        figures=("04_logit_lens",),
        tables=("scale_sweep", "logit_lens"),
        readings=("readings.sentences.describe_lens",),
        findings="readings.saved.logit_lens",
        guide_figure="04_logit_lens", alt="logit lens per layer"),
    Experiment(
        "05_attention_heads", "Attention heads",
        question=('With "Yes" prefilled, which heads attend from the answer token to the injected positions — '
                  "control-yes vs introspection-yes under injection vs introspection-yes without; difference maps; "
                  "a top-heads table; then do those heads matter causally — zero and mean ablation of them (or of "
                  "`ablate_heads`, e.g. the write-up's L34H10 and L39H5 on Gemma-2-9B) and how much of the "
                  "introspection-specific shift survives"),
        modules=("experiments.attention", "experiments.mechanisms", "experiments.patching", "experiments.sweeps"),
        figures=("05_attention_heads",),
        tables=("scale_sweep_05", "attention_top_heads", "attention_head_ablation"),
        readings=("readings.sentences.describe_attention", "experiments.mechanisms.describe_ablation"),
        findings="readings.saved.attention",
        guide_figure="05_attention_heads", alt="layer by head attention maps"),
    Experiment(
        "06_semantic_interference", "Semantic interference",
        question=('The write-up\'s readings checked with numbers: is "bomb" below baseline (layer and scale '
                  'sweeps)? Do introspection and control move together for "confusion" (correlation of the '
                  "curves)?"),
        modules=("experiments.sweeps",),
        figures=("06_bomb_layer_sweep", "06_scale_sweeps"),
        tables=("interference_scale_sweep", "interference_layer_sweep"),
        readings=("readings.sentences.describe_below_baseline", "readings.sentences.describe_comovement"),
        findings="readings.saved.interference",
        guide_figure="06_scale_sweeps", alt="scale sweeps for bomb and confusion"),
    Experiment(
        "07_generation_and_grading", "Generation and self-grading",
        question=("Free-text answers under injection (continuing on generated tokens) at the paper's strengths and "
                  "without injection, graded with the paper's criteria by a pluggable judge (local model or any "
                  "OpenAI-compatible endpoint), beside a deterministic pre-grade; detection and false-positive "
                  "rates with Wilson CIs. The embedded model is a weak judge: its verdicts prove the pipeline only "
                  "(unparseable ones are counted, never guessed)"),
        modules=("experiments.grading",),
        figures=("07_detection_rates",),
        tables=("graded_responses",),
        readings=("experiments.grading.describe_grading",),
        findings="readings.saved.grading_rates",
        guide_figure="07_detection_rates", alt="detection and false-positive rates with intervals"),
    Experiment(
        "08_refusal_ablation", "Refusal direction and its ablation",
        question=("A refusal direction by the book (Arditi et al. 2024: difference-of-means candidates at each "
                  "post-instruction position × layer, chosen by causal bypass / induce / KL scores on held-out "
                  "AdvBench and Alpaca instructions) projected out at every layer and position while injecting: "
                  'scale sweeps with and without ablation ("bomb" included), and the logit lens where the '
                  'introspection answer switches back to "no" at high scale'),
        modules=("experiments.logit_lens", "experiments.refusal", "experiments.sweeps"),
        figures=("08_refusal_direction", "08_ablation_scale_sweeps", "08_ablation_points", "08_ablation_logit_lens"),
        tables=("refusal_sweep", "refusal_sweep_ablated", "refusal_direction_scores", "refusal_ablation_points"),
        readings=("experiments.refusal.describe_direction", "readings.sentences.describe_ablation",
                  "experiments.refusal.describe_ablation_points", "readings.sentences.describe_lens_ablation"),
        findings="readings.saved.refusal_ablation",
        guide_figure="08_ablation_scale_sweeps", alt="scale sweeps with and without refusal ablation"),
    Experiment(
        "09_sae_features", "SAE features",
        question=('Does an SAE at the injection layer see the concept, and do "yes"-like features rise later? '
                  "Gemma Scope for Gemma-2 (by release and id); for the embedded model a small SAE trained here "
                  "with sae-lens on its own generations (cached), with a plain statement of what it can and cannot "
                  "show"),
        modules=("experiments.sae", "experiments.sae_train"),
        figures=("09_sae_features_{concept}",),
        tables=("sae_features", "sae_quality", "sae_yes_features"),
        readings=("experiments.sae.describe_sae", "experiments.sae.describe_sae_features"),
        findings="readings.saved.sae_features",
        guide_figure="09_sae_features_sandwich", alt="top SAE features gained under injection"),
    Experiment(
        "10_localization", "Localization",
        question=('Godet\'s localization test: with a concept injected on one of N sentences and "It is located in '
                  'SENTENCE " prefilled, is the argmax over the digits 1..N the injected sentence, above chance — '
                  'and above the confounds ("most abstract"/"most concrete" questions, random vectors, shuffled '
                  "order)?"),
        modules=("experiments.localization",),
        figures=("10_localization",),
        tables=("localization",),
        readings=("experiments.localization.reading",),
        findings="readings.saved.localization_accuracy",
        guide_figure="10_localization", alt="localization accuracy vs layer and scale against chance"),
    Experiment(
        "11_atlas", "Atlas",
        question=("For every concept, a calibrated verdict: the largest introspection residual I over scales (the "
                  "wordings' Δ beyond the controls' line b + c·baseline, signed by polarity) tested against "
                  "question relabelling and norm-matched random vectors, Benjamini–Hochberg over concepts; classes "
                  "introspection-specific / shared yes-shift / shared suppression / compression / opposite / "
                  "one-sided / no effect, each with p, q, intervals and answer mass"),
        modules=("experiments.atlas",),
        figures=("11_atlas{_format}",),
        tables=("atlas{_format}", "atlas{_format}_sweep"),
        readings=("experiments.atlas.summary", "stats.verdicts.describe_verdict"),
        guide_figure="11_atlas", alt="ranked separation scores with intervals and classes"),
    Experiment(
        "12_mechanisms", "Mechanisms",
        question=('Where is the introspection-specific "yes" made? Direct logit attribution of yes − no at the '
                  "answer position (final-norm scale frozen from the run; pre-softcap on Gemma-2) for "
                  "introspection/control × injected/uninjected, reduced to the difference-in-differences per layer "
                  "and per head; activation patching (injected → uninjected: sufficiency; uninjected → injected: "
                  "necessity) and attribution patching with their agreement; ablation of the top heads (zero and "
                  "mean) — a concept whose shift separates from the controls vs one closest to a shared shift"),
        modules=("experiments.mechanisms", "experiments.patching"),
        figures=("12_mechanisms",),
        tables=("mechanisms_{table}_{concept}", "mechanisms_agreement"),
        readings=("experiments.mechanisms.describe", "experiments.mechanisms.contrast",
                  "experiments.mechanisms.describe_ablation"),
        findings="readings.saved.mechanism_maps",
        guide_figure="12_mechanisms",
        alt="attribution and patching maps, difference-in-differences per layer and head, for two concepts"),
    Experiment(
        "13_yes_bias_free_tasks", "Tasks a yes-bias cannot score",
        question=("Tasks a yes-bias cannot score: forced choice among N concepts in a shuffled listing (confusion "
                  "matrix, accuracy vs 1/N with a Wilson interval, mutual information in bits with a permutation "
                  'null), "did you detect a thought about X?" naming the injected vs its most anti-aligned concept '
                  '(congruence gap, sign-flip and Wilcoxon tests across concepts), "which of two injections is '
                  'stronger?" (both orders, vs 50%, by layer) and localization — each against no injection and '
                  "four kinds of norm-matched null vectors (isotropic, shuffled, covariance, other-word). Strength "
                  "conventions: [docs/strength.md](strength.md)"),
        modules=("experiments.localization", "experiments.tasks.forced_choice", "experiments.tasks.congruence",
                 "experiments.tasks.strength"),
        figures=("13_forced_choice", "13_congruence", "13_strength_comparison", "13_localization"),
        tables=("forced_choice", "congruence", "strength_comparison", "localization_13"),
        readings=("experiments.tasks.forced_choice.describe_forced_choice",
                  "experiments.tasks.congruence.describe_congruence",
                  "experiments.tasks.strength.describe_strength", "experiments.localization.reading"),
        findings="readings.saved.task_readings",
        guide_figure="13_forced_choice", alt="forced-choice confusion matrix and accuracy vs scale against the nulls"),
)
