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
  residual covariance (shrunk to its diagonal by ``shrinkage``) plus a **heterogeneity** term — a real effect is not
  the same on every wording (each wording's effect is δ + u_w, u_w varying across wordings; :data:`HETEROGENEITY`) —
  constrained so that at every scale they sum to zero
  over the wordings (a push shared by every wording, e.g. a "yes" on self questions, does not enter) and — with
  ``compression_proof`` — are orthogonal to the wordings' baselines (a push proportional to the baseline,
  i.e. linear compression, does not enter). **I** = δ̂·max(s): the same in logits at the largest scale.
* **effect matching**: concept vectors push the controls harder than norm-matched random ones, and the further a
  vector's push lies beyond the nulls', the more the prediction's error (fitted on finitely many nulls) enters its
  residual: each score's sd is the residuals' part a'Σa plus that error at the vector's own push
  (:func:`null_prediction.prediction_variance`), and z(v) = δ̂ / sd(v) is compared with the nulls' z — the nulls
  matched to the vector's effect on the controls.
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

# The variance of a concept's effect across wordings, in units of the residuals' mean variance (at the mean squared
# scale). Why not 0: without it the weights pile onto the wordings the nulls barely move — the wordings the model
# connects least to an injection — and an effect that differs between wordings is missed (issue #30: Qwen's trained
# introspector, whose held-out concepts move five of six wordings, was called for none). docs/verdicts.md's plasmode
# table and the organisms' table show the verdict with and without it.
HETEROGENEITY = 4.0
MIN_NULLS = 3  # null vectors a test needs (the ridge carries the loadings; the p-value cannot go below 1 / (R + 1))
POWER = 0.8  # the power an MDE is stated at
GRID = (0.0125, 0.025, 0.0375, 0.05, 0.0625, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5)  # δ, logits per unit scale


def constraints(design: QuestionDesign, *, compression_proof: bool = False) -> np.ndarray:
    """``[S·m, k]``: the directions the weights must be orthogonal to — at each scale the all-wordings vector (a
    push shared by every wording; only when both polarities are asked: with one polarity it is the signal itself,
    and nothing cancels such a push — the readings say so) and, with ``compression_proof``, the wordings' baselines
    (a push proportional to x_w). ``[S·m, 0]`` when there is none."""
    s, m = len(design.scales), len(design.wordings)
    x = design.baseline[design.wordings]
    patterns = ([np.ones(m)] if len(set(np.sign(design.polarity))) > 1 else []) + (
        [x - x.mean()] if compression_proof else [])
    cols = []
    for i in range(s):
        for pattern in patterns:
            col = np.zeros((s, m))
            col[i] = pattern
            cols.append(col.ravel())
    return np.stack(cols, axis=1) if cols else np.zeros((s * m, 0))


SHRINKAGE_GRID = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def choose_shrinkage(residuals: np.ndarray, groups: np.ndarray, grid: Sequence[float] = SHRINKAGE_GRID) -> float:
    """The shrinkage of the residual covariance towards its diagonal that best predicts held-out nulls: the largest
    Gaussian log-likelihood of each group's ``residuals [R, k]`` under the covariance of the other groups', summed
    over ``groups [R]`` (cross-validation; ties go to the larger shrinkage)."""
    best, best_ll = 1.0, -np.inf
    if len(np.unique(groups)) < 3:
        return best
    for lam in sorted(grid, reverse=True):
        ll = 0.0
        for g in np.unique(groups):
            held = groups == g
            train = residuals[~held]
            cov = np.cov(train.T)
            sigma = (1 - lam) * cov + lam * np.diag(np.diag(cov))
            sign, logdet = np.linalg.slogdet(sigma)
            if sign <= 0:
                ll = -np.inf
                break
            d = residuals[held] - train.mean(axis=0)
            ll -= 0.5 * (logdet * len(d) + float(np.einsum("ij,jk,ik->", d, np.linalg.inv(sigma), d)))
        if ll > best_ll + 1e-9:
            best, best_ll = lam, ll
    return best


def heterogeneity_covariance(covariance: np.ndarray, design: QuestionDesign, heterogeneity: float) -> np.ndarray:
    """``[S·m, S·m]``: the covariance a wording effect that varies across wordings adds to the residuals — wording w's
    effect δ + u_w at scale s is (δ + u_w)·s·p_w, the u_w independent with variance τ² = ``heterogeneity`` × the mean
    diagonal of ``covariance [S·m, S·m]`` / the mean squared scale (so at the mean squared scale the spread of the
    effect across wordings is ``heterogeneity`` times the mean residual variance)."""
    s, m = len(design.scales), len(design.wordings)
    tau2 = float(heterogeneity) * float(np.trace(covariance)) / len(covariance) / float((design.scales ** 2).mean())
    out = np.zeros_like(covariance, dtype=float)
    for w in range(m):
        e = np.zeros((s, m))
        e[:, w] = design.scales * design.polarity[w]
        out += np.outer(e.ravel(), e.ravel())
    return tau2 * out


def score_weights(covariance: np.ndarray, design: QuestionDesign, *, compression_proof: bool = False,
                  heterogeneity: float = HETEROGENEITY) -> np.ndarray:
    """``[S·m]``: the least-variance weights a under ``covariance [S·m, S·m]`` plus the effect's spread across
    wordings (:func:`heterogeneity_covariance`; ``heterogeneity=0``: the residuals' covariance alone), with
    a·signal = 1, a ⟂ :func:`constraints`, and every wording counted towards reporting detection (p_w·a_ws ≥ 0: a
    weight never turns a wording's move towards detection into evidence against it, so the score does not depend on
    the exact shape of an effect across scales). Solved as non-negative least squares with the equalities as heavy
    penalty rows."""
    from scipy.optimize import nnls

    sign = np.tile(design.polarity, len(design.scales)).astype(float)
    total = covariance + heterogeneity_covariance(covariance, design, heterogeneity) if heterogeneity else covariance
    sigma = total * np.outer(sign, sign)  # in b = sign·a ≥ 0
    equal = np.vstack([design.signal.ravel() * sign, (constraints(design, compression_proof=compression_proof)
                                                      * sign[:, None]).T]).reshape(-1, len(sign))
    target = np.r_[1.0, np.zeros(len(equal) - 1)]
    jitter = 1e-9 * float(np.trace(sigma)) / len(sigma)
    root = np.linalg.cholesky(sigma + jitter * np.eye(len(sigma))).T
    heavy = 1e4 * float(np.sqrt(np.trace(sigma) / len(sigma))) / max(1.0, float(np.abs(equal).max()))
    b, _ = nnls(np.vstack([root, heavy * equal]), np.r_[np.zeros(len(root)), heavy * target], maxiter=2000)
    a = sign * b
    scale = float(a @ design.signal.ravel())
    if not np.isfinite(scale) or abs(scale) < 1e-12:
        raise ValueError("no weights score the polarity-signed signal under the constraints")
    return a / scale


def control_push(delta: np.ndarray, design: QuestionDesign) -> np.ndarray:
    """``delta [V, Q, S]`` → ``[V]``: m(v), the root-mean-square Δ of the controls over the injected scales — how
    hard the vector pushes questions that are not about it."""
    return np.sqrt((delta[:, design.controls, :] ** 2).mean(axis=(1, 2)))


def pooled_covariance(blocks: Sequence[np.ndarray]) -> np.ndarray:
    """The covariance of residuals ``[n_i, k]`` pooled over ``blocks``, each centred on its own mean (so a shift
    shared by one block — a planted effect on every concept — does not enter it)."""
    blocks = [b for b in blocks if len(b) > 1]
    centred = np.vstack([b - b.mean(axis=0) for b in blocks])
    cov = centred.T @ centred / max(1, len(centred) - len(blocks))
    floor = 1e-6 * max(float(np.diag(cov).mean()), 1e-12)  # a question that never moves keeps a finite weight
    return cov + floor * np.eye(len(cov))


def shrunk(covariance: np.ndarray, shrinkage: float) -> np.ndarray:
    """``covariance`` shrunk towards its diagonal by ``shrinkage`` ∈ [0, 1]."""
    return (1 - shrinkage) * covariance + shrinkage * np.diag(np.diag(covariance))


@dataclass(frozen=True)
class ScoreTest:
    """The test of every concept of one layer against the nulls (:func:`score_test`): ``delta_hat [V]`` (δ̂, logits
    per unit scale), ``I [V]`` (δ̂ at the largest scale, logits), ``controls_only [V]`` (the same beyond the controls'
    part alone: δ̂ + the generic response), ``sd [V]`` and ``null_score_sd [R]`` (each score's own sd: the residuals'
    part plus the prediction's error at the vector's push, :func:`null_prediction.prediction_variance`), ``p_random
    [V]`` (beyond random vectors: δ̂/sd ranked among the nulls'), ``p_controls [V]`` (beyond the controls),
    ``covered [V]`` (the vector's ``noise`` lies within the nulls' ``null_noise`` — a diagnostic the
    readings state, not a gate: an effect whose shape across wordings and scales differs from s·p_w also raises
    it), ``noise [V]`` and ``null_noise [R]`` (:func:`noise_ratio`),
    ``null_delta_hat [R]`` (each null out of sample), ``generic`` (a·α, logits per unit scale),
    ``weights [S·m]`` (a, from every vector), ``prediction``, ``shrinkage``, ``push [V]`` and ``null_push [R]`` (m),
    ``top_scale``."""

    delta_hat: np.ndarray
    I: np.ndarray  # noqa: E741 — the project's name for the score
    controls_only: np.ndarray
    sd: np.ndarray
    null_score_sd: np.ndarray
    p_random: np.ndarray
    p_controls: np.ndarray
    covered: np.ndarray
    noise: np.ndarray
    null_noise: np.ndarray
    null_delta_hat: np.ndarray
    generic: float
    weights: np.ndarray
    prediction: Prediction
    shrinkage: float
    push: np.ndarray
    null_push: np.ndarray
    top_scale: float

    @property
    def null_sd(self) -> float:
        """The spread of the nulls' out-of-sample δ̂ (logits per unit scale)."""
        return float(np.std(self.null_delta_hat, ddof=1))

    @property
    def z(self) -> np.ndarray:
        """``[V]``: δ̂ in units of its own sd — what ``p_random`` ranks."""
        return self.delta_hat / self.sd

    @property
    def null_z(self) -> np.ndarray:
        """``[R]``: the nulls' out-of-sample δ̂ in units of their own sd — the reference the concepts are ranked in."""
        return self.null_delta_hat / self.null_score_sd


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
               compression_proof: bool = False, heterogeneity: float = HETEROGENEITY) -> ScoreTest:
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
    ``heterogeneity``: the effect's assumed spread across wordings (:func:`score_weights`)."""
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

    def weights(drop_null: np.ndarray, drop_concept: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The score's weights, the residual covariance, and that covariance's own least-variance weights (the
        direction :func:`noise_ratio` takes out: its formula holds for them)."""
        keep = np.ones(n_c, bool)
        if drop_concept is not None:
            keep[drop_concept] = False
        sigma = shrunk(pooled_covariance([null_res[~drop_null], concept_res[keep]]), lam)
        own = score_weights(sigma, design, compression_proof=compression_proof, heterogeneity=0.0)
        a = score_weights(sigma, design, compression_proof=compression_proof,
                          heterogeneity=heterogeneity) if heterogeneity else own
        return a, sigma, own

    def sd(delta: np.ndarray, train: np.ndarray, a: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        """Each vector's score sd (``a`` and ``sigma`` shared, or one per vector): the residuals' part plus the
        prediction's error at the vector's own push."""
        return np.sqrt(np.einsum("...i,...ij,...j->...", a, sigma, a)
                       + prediction_variance(delta, train, design, a, sigma, ridge=ridge))

    none = np.zeros(n_r, bool)
    null_hat, null_noise, null_score_sd = np.empty(n_r), np.empty(n_r), np.empty(n_r)
    for g in np.unique(groups):
        out = groups == g
        a, sigma, own = weights(out, None)
        null_hat[out] = null_res[out] @ a
        null_noise[out] = noise_ratio(null_res[out], own, sigma)
        null_score_sd[out] = sd(null_delta[out], null_delta[~out], a, sigma)
    est, controls_only, noise = np.empty(n_c), np.empty(n_c), np.empty(n_c)
    concept_weights, concept_sigmas = [], []
    for i in range(n_c):
        a, sigma, own = weights(none, i)
        est[i], controls_only[i] = concept_res[i] @ a, concept_controls[i] @ a
        noise[i] = noise_ratio(concept_res[i:i + 1], own, sigma)[0]
        concept_weights.append(a)
        concept_sigmas.append(sigma)
    concept_sd = sd(concept_delta, null_delta, np.stack(concept_weights), np.stack(concept_sigmas))  # one fit's error
    a_all, _, _ = weights(none, None)
    top = float(design.scales.max())
    null_z = null_hat / null_score_sd
    return ScoreTest(delta_hat=est, I=est * top, controls_only=controls_only, sd=concept_sd,
                     null_score_sd=null_score_sd, p_random=rank_p(est / concept_sd, null_z),
                     p_controls=rank_p(controls_only / concept_sd, null_z), covered=noise <= null_noise.max(),
                     noise=noise, null_noise=null_noise, null_delta_hat=null_hat,
                     generic=float(prediction.intercept.ravel() @ a_all), weights=a_all, prediction=prediction,
                     shrinkage=lam, push=control_push(concept_delta, design),
                     null_push=control_push(null_delta, design), top_scale=top)


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
              grid: Sequence[float] = GRID, heterogeneity: float = HETEROGENEITY) -> float:
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
