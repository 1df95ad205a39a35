"""The wordings' prediction learned on the null (random) vectors, and how uncertain it is for a given vector.

For wording w at injected scale s, Δ_w(v, s) ≈ α_w(s) + Σ_q L_wq·Δ_q(v, s) over the control questions q
(:func:`fit_prediction`: loadings shared by the scales, an intercept per scale, ridge on the loadings, least squares
over every null vector and scale). A vector's residual beyond that prediction is what the introspection score reads
(:mod:`.introspection_score`).

The prediction is fitted on a finite set of nulls, so its error enters every residual, and more so the harder a
vector pushes the controls: its rows lie further from the nulls' (their leverage is larger). Concept vectors push the
controls about twice as hard as norm-matched random ones, so their scores are noisier than the nulls' for this reason
alone, and a rank test against the nulls' raw scores would be liberal for them (issue #30: the plasmode's "stronger as
concepts are" scenario). :func:`prediction_variance` gives that part of each vector's score variance, so each score
can be compared with the nulls' in units of its own standard deviation — the nulls matched to the vector's effect on
the controls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RIDGE = 1.0  # ridge on the loadings (logits², summed over null vectors × scales)


@dataclass(frozen=True)
class QuestionDesign:
    """Which questions are what, at which injected scales: ``wordings [m]`` and ``controls [n]`` (indices into the
    question axis), ``polarity [m]`` (+1 detect, −1 inverted), ``baseline [Q]`` (no-injection yes − no),
    ``scales [S]`` (the injected scales, > 0)."""

    wordings: np.ndarray
    controls: np.ndarray
    polarity: np.ndarray
    baseline: np.ndarray
    scales: np.ndarray

    @property
    def signal(self) -> np.ndarray:
        """``[S, m]``: a wording effect of 1 logit per unit scale, signed by polarity (s·p_w)."""
        return np.outer(self.scales, self.polarity).astype(float)


@dataclass(frozen=True)
class Prediction:
    """The nulls' prediction for the wordings: ``intercept [S, m]`` (the generic response α) and ``loadings [n, m]``
    on the controls' Δ."""

    intercept: np.ndarray
    loadings: np.ndarray

    def controls_part(self, delta: np.ndarray, design: QuestionDesign) -> np.ndarray:
        """``delta [V, Q, S]`` → ``[V, S, m]``: Σ_q L_wq·Δ_q."""
        return np.einsum("vqs,qm->vsm", delta[:, design.controls, :], self.loadings)

    def residual(self, delta: np.ndarray, design: QuestionDesign, *, controls_only: bool = False) -> np.ndarray:
        """``delta [V, Q, S]`` → ``[V, S, m]``: the wordings' Δ beyond the prediction (``controls_only``: beyond the
        controls' part alone, the intercept kept in)."""
        wordings = np.transpose(delta[:, design.wordings, :], (0, 2, 1))
        out = wordings - self.controls_part(delta, design)
        return out if controls_only else out - self.intercept[None]


def regression_rows(delta: np.ndarray, design: QuestionDesign) -> np.ndarray:
    """``delta [V, Q, S]`` → ``[V, S, n + S]``: each vector's rows of the prediction's regression (the controls' Δ at
    that scale, then one indicator per scale)."""
    v, _, s = delta.shape
    controls = np.transpose(delta[:, design.controls, :], (0, 2, 1))
    return np.concatenate([controls, np.broadcast_to(np.eye(s), (v, s, s))], axis=2)


def _penalty(design: QuestionDesign, ridge: float) -> np.ndarray:
    return np.diag(np.r_[np.full(len(design.controls), float(ridge)), np.zeros(len(design.scales))])


def fit_prediction(null_delta: np.ndarray, design: QuestionDesign, *, ridge: float = RIDGE) -> Prediction:
    """Least squares of every wording's Δ on the controls' Δ over the null vectors ``null_delta [R, Q, S]`` and the
    injected scales, one intercept per scale, ridge ``ridge`` on the loadings (not the intercepts)."""
    r, _, s = null_delta.shape
    n = len(design.controls)
    x = regression_rows(null_delta, design).reshape(r * s, n + s)
    y = np.transpose(null_delta[:, design.wordings, :], (0, 2, 1)).reshape(r * s, -1)
    coef = np.linalg.solve(x.T @ x + _penalty(design, ridge), x.T @ y)
    return Prediction(intercept=coef[n:], loadings=coef[:n])


def prediction_variance(delta: np.ndarray, null_delta: np.ndarray, design: QuestionDesign, weights: np.ndarray,
                        covariance: np.ndarray, *, ridge: float = RIDGE) -> np.ndarray:
    """``[V]``: the variance that the error of the prediction fitted on ``null_delta [R, Q, S]`` adds to the score
    a·r of each vector of ``delta [V, Q, S]`` (a vector not among those nulls), with ``weights`` a ``[S·m]`` (or one
    row per vector, ``[V, S·m]``) and each null's residuals ``[S·m]`` (scales × wordings, all of one vector together)
    of ``covariance [S·m, S·m]`` (or ``[V, S·m, S·m]``, one per vector's weights).

    The fitted coefficients' error is B̂ − B = M·Σ_r X_rᵀE_r with M = (XᵀX + ridge)⁻¹, X_r a null's rows and E_r its
    residuals (the ridge's bias left out), so the score's part is Σ_r Σ_t,w C_r[t, w]·E_r[t, w] with
    C_r = (X_v·M·X_rᵀ)ᵀ·A (A the weights as ``[S, m]``), of variance Σ_r vec(C_r)ᵀ·covariance·vec(C_r): it grows with
    the vector's leverage, i.e. with how far its push on the controls lies beyond the nulls'."""
    v, s = len(delta), len(design.scales)
    train = regression_rows(null_delta, design)  # [R, S, p]
    flat = train.reshape(-1, train.shape[2])
    inverse = np.linalg.inv(flat.T @ flat + _penalty(design, ridge))
    rows = regression_rows(delta, design)  # [V, S, p]
    gram = np.einsum("vsp,pq,rtq->vrst", rows, inverse, train, optimize=True)  # [V, R, S, S]
    a = np.broadcast_to(np.asarray(weights, float), (v, s * len(design.wordings))).reshape(v, s, -1)
    coupling = np.einsum("vrst,vsw->vrtw", gram, a, optimize=True).reshape(v, len(null_delta), -1)
    sigma = np.broadcast_to(np.asarray(covariance, float), (v, *np.shape(covariance)[-2:]))
    return np.einsum("vri,vij,vrj->v", coupling, sigma, coupling, optimize=True)
