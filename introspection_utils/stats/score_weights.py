"""How a concept's residuals across wordings and scales are combined into one score: the weights (least variance under
the nulls' residual covariance, an effect's assumed spread across wordings added, constrained against a shared push
and, optionally, compression) and the covariance they are computed from (pooled by kind, shrunk towards its diagonal
by cross-validation); used by :func:`introspection_utils.stats.introspection_score.score_test`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from introspection_utils.stats.null_prediction import QuestionDesign


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
                  heterogeneity: float) -> np.ndarray:
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
