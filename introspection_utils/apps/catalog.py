"""The series in the experiment registry: one :class:`~introspection_utils.core.registry.Experiment` per notebook,
holding the modules that compute it and the functions that read it. The runner's list and notebook guide, the
findings and the tests read :data:`EXPERIMENTS`; adding an experiment is its module and one entry here."""

from __future__ import annotations

from introspection_utils.core.registry import Experiment, Registry
from introspection_utils.engine import measure, vectors
from introspection_utils.experiments import (
    atlas,
    attention,
    grading,
    localization,
    logit_lens,
    mechanisms,
    patching,
    refusal,
    sae,
    sae_train,
    sweeps,
    )
from introspection_utils.experiments.organisms import evaluation as organisms_evaluation
from introspection_utils.experiments.organisms import training as organisms_training
from introspection_utils.experiments.tasks import congruence, forced_choice, strength
from introspection_utils.readings import saved, sentences
from introspection_utils.stats import verdicts

EXPERIMENTS = Registry((
    Experiment(
        "00_quickstart", "Quickstart",
        question=("One injected trial and its control, in numbers; the same trial as one raw nnsight trace "
                  "(inject, then read), checked equal to `measure`; then the explorer (concept, layer, scale, "
                  "question, concept-vs-random vector)"),
        modules=(measure,),
        figures=("00_explorer_initial",),
        tables=(),
        readings=(sentences.describe_readout,),
        guide_figure="00_explorer_initial", alt="explorer initial state: scale sweep with the current trial starred"),
    Experiment(
        "01_concept_vectors", "Concept vectors",
        question=("What do we inject? Concept-vector norms by layer (a scale multiplies these raw vectors), cosine "
                  "similarity between concepts, the disk cache (second call timed)"),
        modules=(vectors,),
        figures=("01_vector_norms", "01_cosine_matrix"),
        tables=(),
        readings=(sentences.describe_vectors,),
        guide_figure="01_vector_norms", alt="concept-vector norms by layer"),
    Experiment(
        "02_scale_sweep", "Scale sweep",
        question=('As the injection grows, does the introspection answer move towards "yes" before and more than '
                  "the control questions? Sandwich (the write-up's clean case) and water (muddy)"),
        modules=(sweeps,),
        figures=("02_scale_sweep",),
        tables=("scale_sweep",),
        readings=(sentences.describe_scale_sweep,),
        findings=saved.scale_sweep_sentences,
        guide_figure="02_scale_sweep", alt="scale sweeps for sandwich and water"),
    Experiment(
        "03_layer_sweep", "Layer sweep",
        question=("At a fixed scale, which injection layers move the introspection answer, and do the same layers "
                  "move the controls?"),
        modules=(sweeps,),
        figures=("03_layer_sweep",),
        tables=("layer_sweep",),
        readings=(sentences.describe_layer_sweep,),
        findings=saved.layer_sweep_sentences,
        guide_figure="03_layer_sweep", alt="layer sweeps for sandwich and water"),
    Experiment(
        "04_logit_lens", "Logit lens",
        question=("At the peak scale (where the introspection residual I is largest, as the atlas's test picks "
                  "it), how does yes − no build up layer by layer — introspection vs control, concept vs random? "
                  "Flips and answer mass stated"),
        modules=(logit_lens, sweeps),
        figures=("04_logit_lens",),
        tables=("scale_sweep", "logit_lens"),
        readings=(sentences.describe_lens,),
        findings=saved.logit_lens_sentences,
        guide_figure="04_logit_lens", alt="logit lens per layer"),
    Experiment(
        "05_attention_heads", "Attention heads",
        question=('With "Yes" prefilled, which heads attend from the answer token to the injected positions — '
                  "control-yes vs introspection-yes under injection vs introspection-yes without; difference maps; "
                  "a top-heads table; then do those heads matter causally — zero and mean ablation of them (or of "
                  "`ablate_heads`, e.g. the write-up's L34H10 and L39H5 on Gemma-2-9B) and how much of the "
                  "introspection-specific shift survives"),
        modules=(attention, mechanisms, patching, sweeps),
        figures=("05_attention_heads",),
        tables=("scale_sweep_05", "attention_top_heads", "attention_head_ablation"),
        readings=(sentences.describe_attention, mechanisms.describe_head_ablation),
        findings=saved.attention_sentences,
        guide_figure="05_attention_heads", alt="layer by head attention maps"),
    Experiment(
        "06_semantic_interference", "Semantic interference",
        question=('The write-up\'s readings checked with numbers: is "bomb" below baseline (layer and scale '
                  'sweeps)? Do introspection and control move together for "confusion" (correlation of the '
                  "curves)?"),
        modules=(sweeps,),
        figures=("06_bomb_layer_sweep", "06_scale_sweeps"),
        tables=("interference_scale_sweep", "interference_layer_sweep"),
        readings=(sentences.describe_below_baseline, sentences.describe_comovement),
        findings=saved.interference_sentences,
        guide_figure="06_scale_sweeps", alt="scale sweeps for bomb and confusion"),
    Experiment(
        "07_generation_and_grading", "Generation and self-grading",
        question=("Free-text answers under injection (continuing on generated tokens) at the paper's strengths and "
                  "without injection, graded with the paper's criteria by a pluggable judge (local model or any "
                  "OpenAI-compatible endpoint), beside a deterministic pre-grade; detection and false-positive "
                  "rates with Wilson CIs. The embedded model is a weak judge: its verdicts prove the pipeline only "
                  "(unparseable ones are counted, never guessed)"),
        modules=(grading,),
        figures=("07_detection_rates",),
        tables=("graded_responses",),
        readings=(grading.describe_grading,),
        findings=saved.grading_sentences,
        guide_figure="07_detection_rates", alt="detection and false-positive rates with intervals"),
    Experiment(
        "08_refusal_ablation", "Refusal direction and its ablation",
        question=("A refusal direction by the book (Arditi et al. 2024: difference-of-means candidates at each "
                  "post-instruction position × layer, chosen by causal bypass / induce / KL scores on held-out "
                  "AdvBench and Alpaca instructions) projected out at every layer and position while injecting: "
                  'scale sweeps with and without ablation ("bomb" included), and the logit lens where the '
                  'introspection answer switches back to "no" at high scale'),
        modules=(logit_lens, refusal, sweeps),
        figures=("08_refusal_direction", "08_ablation_scale_sweeps", "08_ablation_points", "08_ablation_logit_lens"),
        tables=("refusal_sweep", "refusal_sweep_ablated", "refusal_direction_scores", "refusal_ablation_points"),
        readings=(refusal.describe_direction, sentences.describe_refusal_ablation, refusal.describe_ablation_points,
                  sentences.describe_lens_ablation),
        findings=saved.refusal_ablation_sentences,
        guide_figure="08_ablation_scale_sweeps", alt="scale sweeps with and without refusal ablation"),
    Experiment(
        "09_sae_features", "SAE features",
        question=('Does an SAE at the injection layer see the concept, and do "yes"-like features rise later? '
                  "Gemma Scope for Gemma-2 (by release and id); for the embedded model a small SAE trained here "
                  "with sae-lens on its own generations (cached), with a plain statement of what it can and cannot "
                  "show"),
        modules=(sae, sae_train),
        figures=("09_sae_features_{concept}",),
        tables=("sae_features", "sae_quality", "sae_yes_features"),
        readings=(sae.describe_sae, sae.describe_sae_features),
        findings=saved.sae_sentences,
        guide_figure="09_sae_features_sandwich", alt="top SAE features gained under injection"),
    Experiment(
        "10_localization", "Localization",
        question=('Godet\'s localization test: with a concept injected on one of N sentences and "It is located in '
                  'SENTENCE " prefilled, is the argmax over the digits 1..N the injected sentence, above chance — '
                  'and above the confounds ("most abstract"/"most concrete" questions, random vectors, shuffled '
                  "order)?"),
        modules=(localization,),
        figures=("10_localization",),
        tables=("localization",),
        readings=(localization.reading,),
        findings=saved.localization_sentences,
        guide_figure="10_localization", alt="localization accuracy vs layer and scale against chance"),
    Experiment(
        "11_atlas", "Atlas",
        question=("For every concept, a calibrated verdict: the introspection score I (what the wordings do beyond "
                  "what random vectors with the same effect on the controls predict, signed by polarity) ranked "
                  "among the random vectors' own, beyond random vectors and beyond the controls, Benjamini–Hochberg "
                  "over concepts, with the atlas's MDE; classes introspection-specific / injection detector / shared "
                  "yes-shift / shared suppression / compression / opposite / one-sided / no effect, each with p, q, "
                  "intervals and answer mass"),
        modules=(atlas,),
        figures=("11_atlas{_format}",),
        tables=("atlas{_format}", "atlas{_format}_sweep"),
        readings=(atlas.summary, verdicts.describe_verdict),
        guide_figure="11_atlas", alt="ranked separation scores with intervals and classes"),
    Experiment(
        "12_mechanisms", "Mechanisms",
        question=('Where is the introspection-specific "yes" made? Direct logit attribution of yes − no at the '
                  "answer position (final-norm scale frozen from the run; pre-softcap on Gemma-2) for "
                  "introspection/control × injected/uninjected, reduced to the difference-in-differences per layer "
                  "and per head; activation patching (injected → uninjected: sufficiency; uninjected → injected: "
                  "necessity) and attribution patching with their agreement; ablation of the top heads (zero and "
                  "mean) — a concept whose shift separates from the controls vs one closest to a shared shift"),
        modules=(mechanisms, patching),
        figures=("12_mechanisms",),
        tables=("mechanisms_{table}_{concept}", "mechanisms_agreement"),
        readings=(mechanisms.describe, mechanisms.contrast, mechanisms.describe_head_ablation),
        findings=saved.mechanism_sentences,
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
        modules=(localization, forced_choice, congruence, strength),
        figures=("13_forced_choice", "13_congruence", "13_strength_comparison", "13_localization"),
        tables=("forced_choice", "congruence", "strength_comparison", "localization_13"),
        readings=(forced_choice.describe_forced_choice, congruence.describe_congruence, strength.describe_strength,
                  localization.reading),
        findings=saved.task_sentences,
        guide_figure="13_forced_choice", alt="forced-choice confusion matrix and accuracy vs scale against the nulls"),
    Experiment(
        "14_model_organisms", "Model organisms",
        question=("Do the verdicts tell apart truths known by construction? Three organisms trained with LoRA "
                  "(peft) on concept vectors injected by the window rule, on their own split of concepts, wordings "
                  "and controls: a concept introspector (introspection-specific), an anomaly detector (any "
                  "injection: beyond the controls, not beyond random vectors) and a yes-sayer (shared yes-shift), "
                  "each merged into a model folder and put blind through the atlas, detection and false-positive "
                  "rates, the seen-vs-unseen gap, forced choice and pre-graded free text; truth against verdict"),
        modules=(organisms_evaluation, organisms_training),
        figures=("14_model_organisms{_evaluation}",),
        tables=("organisms{_evaluation}", "organisms{_evaluation}_training"),
        readings=(organisms_evaluation.describe_organisms,),
        findings=saved.organism_sentences,
        guide_figure="14_model_organisms",
        alt="truth-by-construction vs verdict counts per organism, detection and false-positive rates"),
))
