"""Tasks a yes-bias cannot score: forced choice among concepts, named-concept congruence, strength comparison.

A uniform push of the logits towards "yes" moves every yes/no question alike. These tasks ask for *content* or
*magnitude*, so a push that ignores the injected concept scores exactly chance:

* **forced choice** (acsresearch/latent-introspection-code, arXiv 2602.20031): one of N concepts is injected; the
  model picks its number from a list of the N, listed in a shuffled order per trial (seeded) and mapped back to the
  concept. The readout is the N label tokens' logits at the answer position (a prefilled stem); the outputs an N×N
  confusion matrix, accuracy against chance 1/N (Wilson interval) and the mutual information between injected and
  chosen concept in bits, with a permutation null. The same with no injection and with norm-matched null vectors.
* **congruence** (the mismatch test of agastyasridharan/introspection): "Do you detect an injected thought about X?"
  with X the injected concept (congruent) or the concept of the bank whose vector is most anti-aligned with it
  (incongruent), at the same scales. A yes-bias lifts both; the congruence gap (congruent Δ − incongruent Δ) per
  concept is tested across concepts by an exact (or seeded Monte-Carlo) sign-flip permutation test and Wilcoxon's.
* **strength comparison** (Hahami et al., arXiv 2512.12411): the same vector injected into two sentences of one
  prompt at two strengths; "which sentence has the stronger injected thought?" read from the logits of "1" and "2".
  Both orders are measured (counterbalanced), so a preference for either answer scores exactly 50%.

Every injection goes through :mod:`introspection_utils.engine.inject` (the prefix-cached engine; weighted spans for the
two strengths). Every table carries ``effective_strength`` = s·‖v‖ and ``relative_strength`` = s·‖v‖/‖h‖
(:func:`vectors.residual_norms` of the task's own prompt at the layer).

The tasks live one module each (``task_forced_choice``, ``task_congruence``, ``task_strength``, with what they share in
``task_common``); every name is importable from here, as notebook 13 and the findings use them.
"""

from __future__ import annotations

from introspection_utils.experiments.task_common import DEFAULT_CONCEPTS, TASK_ALPHA, label_token_ids
from introspection_utils.experiments.task_congruence import (
    MAX_EXACT_FLIPS,
    N_FLIPS,
    congruence_found,
    congruence_gaps,
    congruence_prompt,
    congruence_summary,
    describe_congruence,
    incongruent_partners,
    run_congruence,
    sign_flip_test,
)
from introspection_utils.experiments.task_forced_choice import (
    N_PERMUTATIONS,
    choices_from_logits,
    confusion_matrix,
    describe_forced_choice,
    forced_choice_found,
    forced_choice_prompt,
    forced_choice_summary,
    mi_permutation_test,
    mutual_information,
    run_forced_choice,
    shuffled_orders,
)
from introspection_utils.experiments.task_strength import (
    TwoSentencePrompt,
    describe_strength,
    run_strength_comparison,
    strength_found,
    strength_prompt,
    strength_summary,
    strength_trial,
)

__all__ = [
    "DEFAULT_CONCEPTS", "MAX_EXACT_FLIPS", "N_FLIPS", "N_PERMUTATIONS", "TASK_ALPHA", "TwoSentencePrompt",
    "choices_from_logits", "confusion_matrix", "congruence_found", "congruence_gaps", "congruence_prompt",
    "congruence_summary", "describe_congruence", "describe_forced_choice", "describe_strength",
    "forced_choice_found", "forced_choice_prompt", "forced_choice_summary", "incongruent_partners",
    "label_token_ids", "mi_permutation_test", "mutual_information", "run_congruence", "run_forced_choice",
    "run_strength_comparison", "shuffled_orders", "sign_flip_test", "strength_found", "strength_prompt",
    "strength_summary", "strength_trial",
]
