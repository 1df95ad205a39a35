"""The introspection score learned from the model's own nulls: how each introspection wording responds to a generic
perturbation is estimated on the random (null) vectors, and a concept's score is what its wordings do beyond that
prediction, signed by polarity.

Why (issue #30): the controls' line b + c·x assumes the wordings respond to an injection as a control at their own
baseline would. On Qwen2.5-Coder-1.5B they do not (their loadings on the controls' slope are not their baselines), so
the line's residual I carries the wordings' own scatter and its tests are nearly blind. Here the prediction is the
model's own, fitted on vectors that are not concepts:

* **prediction** (:func:`fit_prediction`): for wording w at injected scale s,
  Δ_w(v, s) ≈ α_w(s) + Σ_q L_wq·Δ_q(v, s), the sum over the control questions q — loadings L shared by the scales, an
  intercept α per scale, ridge ``ridge`` on L, least squares over every null vector and injected scale. α_w(s) is
  what *any* injection does to the wording beyond what the controls' Δ predict (its **generic response**).
* **residual** r_ws(v) = Δ_w − α_w(s) − L_w·Δ_C: what the wording does beyond a null vector with the same effect on
  the controls. The **controls-only residual** r + α drops the intercept: beyond what the controls predict alone.
* **the score** δ̂(v) = a·r(v) (logits per unit scale): a planted wording effect Δ_w += δ·s·p_w (p_w the polarity)
  gives E δ̂ = δ, because the weights a (:func:`score_weights`) are the least-variance unbiased ones under the nulls'
  residual covariance (shrunk to its diagonal by ``shrinkage``) plus a **heterogeneity** term — the effect's assumed
  spread across wordings (each wording's effect δ + u_w) — constrained so that at every scale they sum to zero over
  the wordings (a push shared by every wording, e.g. a "yes" on self questions, does not enter) and — with
  ``compression_proof`` — are orthogonal to the wordings' baselines (a push proportional to the baseline, i.e.
  linear compression, does not enter).
* **two alternatives** (:data:`HETEROGENEITIES`): one set of weights for an effect the same on every wording, one
  for an effect that differs between them; each gives a z (below), and the test takes the larger — for every null
  as for every concept, so its rank p-value is as exact as either alone.
* **effect matching**: concept vectors push the controls harder than norm-matched random ones, and the further a
  vector's push lies beyond the nulls', the more the prediction's error (fitted on finitely many nulls) enters its
  residual: each score's sd is the residuals' part a'Σa plus that error at the vector's own push
  (:func:`null_prediction.prediction_variance`), and z(v) = max over the alternatives of δ̂ / sd(v) is compared
  with the nulls' z — the nulls matched to the vector's effect on the controls.
* **I** (logits at the largest scale) and its interval come from inverting that test: the planted effect that would
  leave the concept's z at the nulls' median (the estimate) or at their quantiles (the interval)
  (:meth:`ScoreTest.effect_at`).
* **p-values by rank** (no t-tail): ``p_random`` = (1 + #{z_null ≥ z}) / (1 + R) over the R null vectors, each
  null's z computed from a prediction fitted without its own group (its concept's random vectors: leave-one-group-out,
  so the reference is out of sample like the concept); ``p_controls`` = the same rank of the controls-only z
  (beyond the controls, the nulls' generic response included). A concept beyond random vectors is
  introspection-specific; beyond the controls only, an injection detector that is not concept-specific.

Records are frozen dataclasses (:class:`null_prediction.Prediction`, :class:`ScoreTest`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from introspection_utils.stats.null_prediction import (  # the prediction, re-exported: one import for callers
    RIDGE,
    Prediction,
    QuestionDesign,
    fit_prediction,
    prediction_variance,
)
from introspection_utils.stats.score_weights import (
    choose_shrinkage,
    control_push,
    pooled_covariance,
    score_weights,
    shrunk,
)

# The alternatives the score is tested against, each one set of weights: the effect's variance across wordings, in
# units of the residuals' mean variance (at the mean squared scale). 0: the same effect on every wording — the most
# powerful weights for it, which pile onto the wordings the nulls barely move. 4: an effect that differs between
# wordings — without it, an effect on the wordings the model connects most to an injection is missed (issue #30:
# Qwen's trained introspector, whose held-out concepts move some wordings and not others, was called for none of
# them with 0 alone). A vector's z is the larger of the two, ranked among the nulls' larger of the two (so the rank
# p-value stays exact); docs/verdicts.md's plasmode table and the organisms' table show each alone beside it.
HETEROGENEITIES = (0.0, 4.0)
MIN_NULLS = 3  # null vectors a test needs (the ridge carries the loadings; the p-value cannot go below 1 / (R + 1))
POWER = 0.8  # the power an MDE is stated at
GRID = (0.0125, 0.025, 0.0375, 0.05, 0.0625, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5)  # δ, logits per unit scale


@dataclass(frozen=True)
class ScoreTest:
    """The test of every concept of one layer against the nulls (:func:`score_test`), one row per alternative k of
    ``heterogeneities [K]`` (the weights' assumed spread of an effect across wordings): ``delta_hats [K, V]`` (δ̂_k,
    logits per unit scale), ``controls_only_hats [K, V]`` (beyond the controls' part alone: δ̂_k + the generic
    response), ``sds [K, V]`` and ``null_score_sds [K, R]`` (each score's own sd: the residuals' part plus the
    prediction's error at the vector's push, :func:`null_prediction.prediction_variance`), ``null_delta_hats [K, R]``
    (each null out of sample); ``p_random [V]`` (beyond random vectors: :attr:`z` ranked among :attr:`null_z`),
    ``p_controls [V]`` (beyond the controls: :attr:`controls_z` ranked the same way), ``covered [V]`` (the vector's
    ``noise`` lies within the nulls' ``null_noise`` — a diagnostic the readings state, not a gate: an effect whose
    shape across wordings and scales differs from s·p_w also raises it), ``noise [V]`` and ``null_noise [R]``
    (:func:`noise_ratio`), ``generic`` (a·α at the first alternative, logits per unit scale), ``weights [K, S·m]``
    (each alternative's a, from every vector), ``prediction``, ``shrinkage``, ``push [V]`` and ``null_push [R]`` (m),
    ``top_scale``.

    Every effect in logits comes from inverting the one test: :meth:`effect_at` is the planted effect that would
    leave a vector's z at a given value, so the interval is it at the nulls' quantiles and the estimate
    (:attr:`delta_hat`, :attr:`I`) it at their median."""

    heterogeneities: tuple[float, ...]
    delta_hats: np.ndarray
    controls_only_hats: np.ndarray
    sds: np.ndarray
    null_delta_hats: np.ndarray
    null_score_sds: np.ndarray
    covered: np.ndarray
    noise: np.ndarray
    null_noise: np.ndarray
    generic: float
    weights: np.ndarray
    prediction: Prediction
    shrinkage: float
    push: np.ndarray
    null_push: np.ndarray
    top_scale: float

    @property
    def z(self) -> np.ndarray:
        """``[V]``: the largest over the alternatives of δ̂_k in units of its own sd — what ``p_random`` ranks."""
        return (self.delta_hats / self.sds).max(axis=0)

    @property
    def null_z(self) -> np.ndarray:
        """``[R]``: the nulls' out-of-sample :attr:`z` (the same largest) — the reference the concepts are ranked in."""
        return (self.null_delta_hats / self.null_score_sds).max(axis=0)

    @property
    def controls_z(self) -> np.ndarray:
        """``[V]``: :attr:`z` of the controls-only residual — what ``p_controls`` ranks."""
        return (self.controls_only_hats / self.sds).max(axis=0)

    @property
    def p_random(self) -> np.ndarray:
        """``[V]``: beyond random vectors — :attr:`z` ranked among :attr:`null_z` (:func:`rank_p`)."""
        return rank_p(self.z, self.null_z)

    @property
    def p_controls(self) -> np.ndarray:
        """``[V]``: beyond the controls — :attr:`controls_z` ranked among :attr:`null_z`."""
        return rank_p(self.controls_z, self.null_z)

    def shifted_z(self, size: float) -> np.ndarray:
        """``[V]``: :attr:`z` had a wording effect of ``size`` (logits per unit scale) been planted in every concept:
        each δ̂_k moves by exactly ``size`` and no sd moves (:func:`plant`; test-held)."""
        return ((self.delta_hats + float(size)) / self.sds).max(axis=0)

    def effect_at(self, z: float, *, controls_only: bool = False) -> np.ndarray:
        """``[V]``: the wording effect (logits per unit scale) whose removal leaves each concept's z at ``z`` —
        max_k(δ̂_k − z·sd_k), the rank test inverted (``controls_only``: the same for :attr:`controls_z`)."""
        hats = self.controls_only_hats if controls_only else self.delta_hats
        return (hats - float(z) * self.sds).max(axis=0)

    @property
    def median_null_z(self) -> float:
        """The nulls' median :attr:`null_z`: where the estimate puts a concept."""
        return float(np.median(self.null_z))

    @property
    def delta_hat(self) -> np.ndarray:
        """``[V]``: the estimate δ̂ (logits per unit scale): :meth:`effect_at` the nulls' median z — with one
        alternative, that alternative's δ̂ less the median's few hundredths of an sd."""
        return self.effect_at(self.median_null_z)

    @property
    def I(self) -> np.ndarray:  # noqa: E743, N802 — the project's name for the score
        """``[V]``: :attr:`delta_hat` at the largest scale, logits."""
        return self.delta_hat * self.top_scale

    @property
    def controls_only(self) -> np.ndarray:
        """``[V]``: :attr:`delta_hat` beyond the controls' part alone."""
        return self.effect_at(self.median_null_z, controls_only=True)

    @property
    def null_delta_hat(self) -> np.ndarray:
        """``[R]``: each null's estimate, as :attr:`delta_hat` (logits per unit scale)."""
        return (self.null_delta_hats - self.median_null_z * self.null_score_sds).max(axis=0)

    @property
    def null_sd(self) -> float:
        """The spread of the nulls' out-of-sample estimates (logits per unit scale)."""
        return float(np.std(self.null_delta_hat, ddof=1))


def noise_ratio(residuals: np.ndarray, weights: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """``residuals [V, k]`` → ``[V]``: how noisy each vector's residual is relative to ``sigma`` once the scored
    direction is taken out — √((r'Σ⁻¹r − δ̂²/var δ̂) / (k − 1)) with δ̂ = r·``weights``, the least-variance weights
    under ``sigma`` (for them it is the energy off that direction), ≈ 1 for a vector as noisy as the nulls. A vector
    k times noisier than the nulls (e.g. one that pushes everything k times harder, its noise with it) reads ≈ k."""
    est = residuals @ weights
    var = float(weights @ sigma @ weights)
    energy = np.einsum("ij,ij->i", residuals, np.linalg.solve(sigma, residuals.T).T) - est ** 2 / var
    return np.sqrt(np.maximum(energy, 0.0) / (residuals.shape[1] - 1))


def rank_p(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``[V]``: (1 + #{reference ≥ value}) / (1 + R) — the one-sided rank p-value of each value among ``reference``
    (exact under exchangeability, never below 1 / (R + 1))."""
    ref = np.sort(np.asarray(reference, float))
    above = len(ref) - np.searchsorted(ref, np.asarray(values, float), side="left")
    return (1 + above) / (1 + len(ref))


def score_test(concept_delta: np.ndarray, null_delta: np.ndarray, design: QuestionDesign, *,
               groups: Sequence | np.ndarray | None = None, ridge: float = RIDGE, shrinkage: float | None = None,
               compression_proof: bool = False,
               heterogeneity: float | Sequence[float] = HETEROGENEITIES) -> ScoreTest:
    """Test ``concept_delta [V, Q, S]`` against ``null_delta [R, Q, S]`` (``groups [R]``: which nulls belong
    together — a concept's own random vectors — left out together; default, or with fewer than :data:`MIN_NULLS`
    groups, each its own).

    Every vector is scored out of sample: a null's residual comes from a prediction fitted without its group, a
    concept's from the prediction fitted on every null; each vector's weights come from the residual covariance of
    every *other* vector (nulls and concepts, each kind centred on its own mean, shrunk towards its diagonal by
    ``shrinkage``, default chosen by cross-validation on the nulls: :func:`choose_shrinkage`). Pooling the concepts'
    residuals into the covariance matches the weights to the concepts' own noise (they push the controls harder than
    norm-matched random vectors); because each kind is centred, a shift every concept shares (the effect sought) does
    not enter the weights. ``compression_proof``: weights also orthogonal to the wordings' baselines;
    ``heterogeneity``: the effect's assumed spread across wordings (:func:`score_weights`), one value or the
    alternatives the test takes the largest z over (:data:`HETEROGENEITIES`)."""
    if len(null_delta) < MIN_NULLS:
        raise ValueError(f"the null model needs at least {MIN_NULLS} null vectors, got {len(null_delta)}")
    if concept_delta.shape[1:] != null_delta.shape[1:]:
        raise ValueError(f"concepts {concept_delta.shape[1:]} and nulls {null_delta.shape[1:]} must be measured "
                         f"with the same questions at the same scales")
    groups = np.asarray(groups) if groups is not None else np.arange(len(null_delta))
    if len(np.unique(groups)) < MIN_NULLS:  # too few groups to leave one out: each null its own
        groups = np.arange(len(null_delta))
    n_c, n_r = len(concept_delta), len(null_delta)
    prediction = fit_prediction(null_delta, design, ridge=ridge)
    held = np.empty((n_r, len(design.scales), len(design.wordings)))
    for g in np.unique(groups):
        out = groups == g
        held[out] = fit_prediction(null_delta[~out], design, ridge=ridge).residual(null_delta[out], design)
    null_res = held.reshape(n_r, -1)
    concept_res = prediction.residual(concept_delta, design).reshape(n_c, -1)
    concept_controls = prediction.residual(concept_delta, design, controls_only=True).reshape(n_c, -1)
    lam = choose_shrinkage(null_res, groups) if shrinkage is None else float(shrinkage)

    alternatives = tuple(float(h) for h in np.atleast_1d(heterogeneity))
    n_k = len(alternatives)

    def weights(drop_null: np.ndarray, drop_concept: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each alternative's weights ``[K, k]``, the residual covariance, and that covariance's own least-variance
        weights (the direction :func:`noise_ratio` takes out: its formula holds for them)."""
        keep = np.ones(n_c, bool)
        if drop_concept is not None:
            keep[drop_concept] = False
        sigma = shrunk(pooled_covariance([null_res[~drop_null], concept_res[keep]]), lam)
        own = score_weights(sigma, design, compression_proof=compression_proof, heterogeneity=0.0)
        a = np.stack([score_weights(sigma, design, compression_proof=compression_proof, heterogeneity=h)
                      if h else own for h in alternatives])
        return a, sigma, own

    def sd(delta: np.ndarray, train: np.ndarray, a: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        """Each vector's score sd (``a`` and ``sigma`` shared, or one per vector): the residuals' part plus the
        prediction's error at the vector's own push."""
        return np.sqrt(np.einsum("...i,...ij,...j->...", a, sigma, a)
                       + prediction_variance(delta, train, design, a, sigma, ridge=ridge))

    none = np.zeros(n_r, bool)
    null_hat, null_score_sd, null_noise = np.empty((n_k, n_r)), np.empty((n_k, n_r)), np.empty(n_r)
    for g in np.unique(groups):
        out = groups == g
        a, sigma, own = weights(out, None)
        null_hat[:, out] = a @ null_res[out].T
        null_noise[out] = noise_ratio(null_res[out], own, sigma)
        for k in range(n_k):
            null_score_sd[k, out] = sd(null_delta[out], null_delta[~out], a[k], sigma)
    noise = np.empty(n_c)
    concept_weights, concept_sigmas = np.empty((n_k, n_c, concept_res.shape[1])), []
    for i in range(n_c):
        a, sigma, own = weights(none, i)
        concept_weights[:, i] = a
        noise[i] = noise_ratio(concept_res[i:i + 1], own, sigma)[0]
        concept_sigmas.append(sigma)
    est = np.einsum("kvi,vi->kv", concept_weights, concept_res)
    controls_only = np.einsum("kvi,vi->kv", concept_weights, concept_controls)
    sigmas = np.stack(concept_sigmas)
    concept_sd = np.stack([sd(concept_delta, null_delta, concept_weights[k], sigmas) for k in range(n_k)])
    a_all, _, _ = weights(none, None)
    return ScoreTest(heterogeneities=alternatives, delta_hats=est, controls_only_hats=controls_only, sds=concept_sd,
                     null_delta_hats=null_hat, null_score_sds=null_score_sd, covered=noise <= null_noise.max(),
                     noise=noise, null_noise=null_noise,
                     generic=float(prediction.intercept.ravel() @ a_all[0]), weights=a_all, prediction=prediction,
                     shrinkage=lam, push=control_push(concept_delta, design),
                     null_push=control_push(null_delta, design), top_scale=float(design.scales.max()))


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) ``[n]``, in the input order."""
    p = np.asarray(p_values, float)
    n = len(p)
    if n == 0:
        return p
    order = np.argsort(p)
    ranked = p[order] * n / np.arange(1, n + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    out = np.empty(n)
    out[order] = q
    return out


def plant(delta: np.ndarray, design: QuestionDesign, size: float) -> np.ndarray:
    """``delta [V, Q, S]`` with a wording effect of ``size`` logits per unit scale planted (every wording += size·s·p_w,
    towards reporting detection): the effect the score is built to find."""
    out = np.array(delta, float, copy=True)
    out[:, design.wordings, :] += size * design.signal.T[None]
    return out


def atlas_mde(concept_delta: np.ndarray, null_delta: np.ndarray, design: QuestionDesign, *,
              groups: Sequence | np.ndarray | None = None, alpha: float = 0.05, power: float = POWER,
              grid: Sequence[float] = GRID, heterogeneity: float | Sequence[float] = HETEROGENEITIES) -> float:
    """The atlas's minimum detectable effect, on its own noise: the smallest I (logits at the largest scale) that,
    planted into every concept (:func:`plant`), is called (q ≤ ``alpha`` after Benjamini–Hochberg, beyond random
    vectors and the controls) for at least ``power`` of them — linear interpolation on ``grid`` (δ per unit scale);
    NaN when no grid point reaches it (the design cannot call anything: too few nulls for its p-values to pass)."""
    top = float(design.scales.max())
    previous = (0.0, 0.0)
    for size in sorted(grid):
        test = score_test(plant(concept_delta, design, size), null_delta, design, groups=groups,
                          heterogeneity=heterogeneity)
        called = float((benjamini_hochberg(np.maximum(test.p_random, test.p_controls)) <= alpha).mean())
        if called >= power:
            (s0, c0) = previous
            frac = (power - c0) / (called - c0) if called > c0 else 1.0
            return float((s0 + frac * (size - s0)) * top)
        previous = (size, called)
    return float("nan")


def population_p(z: np.ndarray, null_z: np.ndarray) -> float:
    """Are the concepts, as a group, beyond their nulls? The one-sided Mann–Whitney p-value of the concepts' scores
    ``z [V]`` against the nulls' out-of-sample ``null_z [R]`` (:attr:`ScoreTest.z`, :attr:`ScoreTest.null_z`;
    ranks only)."""
    from scipy.stats import mannwhitneyu

    if len(z) == 0 or len(null_z) == 0:
        return float("nan")
    return float(mannwhitneyu(z, null_z, alternative="greater").pvalue)
