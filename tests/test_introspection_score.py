"""The null-learned score: its prediction is least squares on the nulls, its weights are the constrained least-variance
ones, a hand-computed case, the planted-effect identity on the committed Qwen sweep, and the rank p-values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize
from statsmodels.stats.multitest import multipletests

from introspection_utils.core.paths import project_root
from introspection_utils.stats import introspection_score as nm
from introspection_utils.stats import score_weights as sw
from introspection_utils.stats.plasmode import panel


def _design(m_detect: int = 2, m_inverted: int = 2, n_controls: int = 5, scales=(2.0, 4.0, 8.0), seed: int = 0
            ) -> nm.QuestionDesign:
    rng = np.random.default_rng(seed)
    m = m_detect + m_inverted
    return nm.QuestionDesign(wordings=np.arange(m), controls=np.arange(m, m + n_controls),
                     polarity=np.r_[np.ones(m_detect), -np.ones(m_inverted)].astype(int),
                     baseline=rng.normal(0, 2, m + n_controls), scales=np.asarray(scales, float))


def test_prediction_is_least_squares_of_the_wordings_on_the_controls():
    d = _design()
    rng = np.random.default_rng(1)
    nulls = rng.normal(0, 1, (30, 9, 3))
    pred = nm.fit_prediction(nulls, d, ridge=0.0)
    # by hand: one row per (null, scale), columns = the controls' Δ then one indicator per scale
    rows, targets = [], []
    for v in range(30):
        for s in range(3):
            rows.append(np.r_[nulls[v, d.controls, s], np.eye(3)[s]])
            targets.append(nulls[v, d.wordings, s])
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(targets), rcond=None)
    assert pred.loadings == pytest.approx(coef[:5], abs=1e-9) and pred.intercept == pytest.approx(coef[5:], abs=1e-9)
    resid = pred.residual(nulls, d)
    assert resid.shape == (30, 3, 4)
    assert resid[4, 1] == pytest.approx(nulls[4, d.wordings, 1] - coef[5 + 1] - nulls[4, d.controls, 1] @ coef[:5])
    # beyond the controls' part alone keeps the intercept in
    assert pred.residual(nulls, d, controls_only=True) - resid == pytest.approx(
        np.broadcast_to(pred.intercept, resid.shape))


def test_the_prediction_error_in_a_score_has_the_variance_it_is_given_and_grows_with_the_push():
    """prediction_variance against simulation: nulls drawn again and again from a known linear model (their controls'
    Δ held fixed, each null's residuals over scales × wordings correlated), the prediction refitted each time, and a
    vector pushing the controls three times harder scored with fixed weights: the spread of a·(its prediction's
    error) matches the formula, and is larger than for a vector pushing as hard as the nulls."""
    d = _design()
    rng = np.random.default_rng(7)
    r, n, s, m = 40, 5, 3, 4
    controls = rng.normal(0, 1, (r, n, s))
    loadings, intercept = rng.normal(0, 0.5, (n, m)), rng.normal(0, 1, (s, m))
    root = rng.normal(0, 0.3, (s * m, s * m))
    sigma = root @ root.T + 0.05 * np.eye(s * m)
    weights = rng.normal(0, 1, s * m)
    probes = np.zeros((2, 9, s))
    probes[0, d.controls] = rng.normal(0, 1, (n, s))
    probes[1, d.controls] = 3 * rng.normal(0, 1, (n, s))
    truth = intercept[None] + np.einsum("vqs,qm->vsm", probes[:, d.controls], loadings)  # [2, S, m]
    errors = []
    for _ in range(2000):
        nulls = np.zeros((r, 9, s))
        nulls[:, d.controls] = controls
        noise = (rng.normal(0, 1, (r, s * m)) @ root.T + np.sqrt(0.05) * rng.normal(0, 1, (r, s * m))).reshape(r, s, m)
        wordings = intercept[None] + np.einsum("vqs,qm->vsm", controls, loadings) + noise
        nulls[:, d.wordings] = np.transpose(wordings, (0, 2, 1))
        fit = nm.fit_prediction(nulls, d, ridge=0.0)
        predicted = fit.intercept[None] + fit.controls_part(probes, d)
        errors.append((predicted - truth).reshape(2, -1) @ weights)
    nulls[:, d.wordings] = 0.0  # the formula reads the controls only
    formula = nm.prediction_variance(probes, nulls, d, weights, sigma, ridge=0.0)
    assert np.var(np.array(errors), axis=0) == pytest.approx(formula, rel=0.1)
    assert formula[1] > 2 * formula[0]
    # one row of weights and one covariance per vector (how score_test asks for every concept at once)
    batched = nm.prediction_variance(probes, nulls, d, np.stack([weights, weights]), np.stack([sigma, sigma]),
                                     ridge=0.0)
    assert batched == pytest.approx(formula, rel=1e-12)


def test_weights_are_unbiased_orthogonal_to_a_shared_push_and_count_every_wording_towards_detection():
    d = _design()
    rng = np.random.default_rng(2)
    root = rng.normal(0, 1, (12, 12))
    sigma = root @ root.T + 0.1 * np.eye(12)
    a = sw.score_weights(sigma, d, heterogeneity=0.0)
    u = d.signal.ravel()
    sign = np.tile(d.polarity, 3)
    assert a @ u == pytest.approx(1.0, abs=1e-6)
    assert sw.constraints(d).T @ a == pytest.approx(np.zeros(3), abs=1e-6)
    assert (sign * a >= -1e-9).all()
    # no other weights meeting the same constraints have a smaller variance (an independent solver)
    cons = [{"type": "eq", "fun": lambda w: np.r_[w @ u - 1, sw.constraints(d).T @ w]}]
    best = minimize(lambda w: w @ sigma @ w, sign / (sign @ u), constraints=cons, method="SLSQP",
                    bounds=[(0, None) if s > 0 else (None, 0) for s in sign], options={"ftol": 1e-14, "maxiter": 1000})
    assert a @ sigma @ a <= best.fun * (1 + 1e-4)
    # one polarity only: a push on every wording is the signal itself, so no such constraint
    assert sw.constraints(_design(m_inverted=0)).shape == (6, 0)
    # with the heterogeneity term: the least-variance weights under the residuals' covariance plus the effect's
    # spread across wordings (the same independent solver)
    total = sigma + sw.heterogeneity_covariance(sigma, d, 4.0)
    h = sw.score_weights(sigma, d, heterogeneity=4.0)
    assert h @ u == pytest.approx(1.0, abs=1e-6) and (sign * h >= -1e-9).all()
    best = minimize(lambda w: w @ total @ w, sign / (sign @ u), constraints=cons, method="SLSQP",
                    bounds=[(0, None) if s > 0 else (None, 0) for s in sign], options={"ftol": 1e-14, "maxiter": 1000})
    assert h @ total @ h <= best.fun * (1 + 1e-4)


def test_the_heterogeneity_term_is_the_spread_of_an_effect_across_wordings():
    """heterogeneity_covariance is the covariance of u_w·s·p_w with the u_w independent, variance τ² = h × the mean
    residual variance / the mean squared scale — checked by simulation; and it spreads the weights: with one quiet
    twin pair and two noisy ones, the weights for one effect on every wording put nearly everything on the quiet
    pair, the heterogeneity term much less."""
    d = _design(m_detect=3, m_inverted=3, scales=(4.0, 8.0))  # wordings 0–2 detect, 3–5 inverted
    sigma = np.diag(np.tile(np.array([0.04, 1.0, 1.0, 0.04, 1.0, 1.0]), 2))  # wordings 0 and 3 quiet, [S·m]
    h = sw.heterogeneity_covariance(sigma, d, 4.0)
    tau2 = 4.0 * float(np.trace(sigma)) / 12 / float(np.mean(d.scales ** 2))
    rng = np.random.default_rng(0)
    u = rng.normal(0, np.sqrt(tau2), (200_000, 6))
    draws = (u[:, None, :] * np.outer(d.scales, d.polarity)[None]).reshape(len(u), -1)
    assert np.cov(draws.T) == pytest.approx(h, abs=0.02 * float(np.abs(h).max()))
    quiet = np.tile(np.array([1, 0, 0, 1, 0, 0], bool), 2)
    share = lambda a: float(np.abs(a[quiet]).sum() / np.abs(a).sum())  # noqa: E731
    assert share(sw.score_weights(sigma, d, heterogeneity=0.0)) > 0.9
    assert share(sw.score_weights(sigma, d, heterogeneity=4.0)) < 0.6


def test_a_hand_computed_score_with_one_detect_and_one_inverted_wording():
    """One scale s, one detect and one inverted wording: the constraints leave one direction, a = (1, −1) / (2s), so
    δ̂ = (r_detect − r_inverted) / (2s) whatever the covariance; the nulls' wordings are an exact linear function of
    the controls, so the residual is what was planted."""
    s = 4.0
    d = nm.QuestionDesign(wordings=np.array([0, 1]), controls=np.array([2, 3, 4]), polarity=np.array([1, -1]),
                  baseline=np.array([-1.0, 1.0, 0.0, 2.0, 4.0]), scales=np.array([s]))
    rng = np.random.default_rng(3)
    loadings = np.array([[0.5, -0.2], [0.1, 0.3], [-0.4, 0.6]])  # [controls, wordings]
    intercept = np.array([0.3, -0.1])

    def vectors(n, planted=(0.0, 0.0)):
        out = np.zeros((n, 5, 1))
        out[:, 2:, 0] = rng.normal(0, 1.5, (n, 3))
        out[:, :2, 0] = out[:, 2:, 0] @ loadings + intercept + np.array(planted)
        return out

    nulls = vectors(12)
    nulls[:, :2, 0] += rng.normal(0, 0.05, (12, 2))  # a little noise: the covariance is not singular
    concept = vectors(3, planted=(0.8, -0.4))
    test = nm.score_test(concept, nulls, d, ridge=0.0)
    assert test.weights.shape == (2, 2)  # one row an alternative; with one twin pair both are the one direction
    for a in test.weights:
        assert a == pytest.approx(np.array([1.0, -1.0]) / (2 * s), abs=1e-6)
    # the prediction is fitted on noisy nulls, so its own error enters: the planted residual (0.8, −0.4) to 0.05
    assert test.delta_hat == pytest.approx(np.full(3, (0.8 + 0.4) / (2 * s)), abs=0.02)
    assert test.I == pytest.approx(test.delta_hat * s)
    assert (test.p_random == 1 / 13).all()  # beyond every null: the smallest rank p-value 12 nulls allow


def test_the_larger_z_of_two_alternatives_is_exact_against_the_nulls_larger_z():
    """Concepts drawn exactly as the nulls are (wordings = loadings × controls + noise that differs by wording, a
    concept's two random vectors one group): the test's p-value, the concept's larger z of the two alternatives
    ranked among the nulls' larger z, is uniform — P(p ≤ 0.1) within three binomial sds of 0.1 over 800 concepts.
    Ranked instead among one alternative's nulls (what taking the larger z for the concepts alone would do) it is
    liberal."""
    d = _design(3, 3, 6, scales=(4.0, 8.0), seed=2)
    rng = np.random.default_rng(0)
    loadings, noise = rng.normal(0, 0.3, (6, 6)), np.array([0.1, 0.5, 1.0, 0.2, 0.8, 1.5])

    def draw(n):
        grow = d.scales[None, None, :] / 4
        out = np.zeros((n, len(d.baseline), len(d.scales)))
        out[:, d.controls] = rng.normal(0, 1, (n, len(d.controls), 1)) * grow
        out[:, d.wordings] = (np.einsum("ncs,cw->nws", out[:, d.controls], loadings)
                              + rng.normal(0, 1, (n, 6, len(d.scales))) * noise[None, :, None] * grow)
        return out

    exact, one_reference = [], []
    for _ in range(40):
        nulls, concepts = draw(60), draw(20)
        test = nm.score_test(concepts, nulls, d, groups=np.repeat(np.arange(30), 2))
        assert test.heterogeneities == nm.HETEROGENEITIES and test.delta_hats.shape == (2, 20)
        exact.append(test.p_random)
        varying = nm.score_test(concepts, nulls, d, groups=np.repeat(np.arange(30), 2), heterogeneity=4.0)
        one_reference.append(nm.rank_p(test.z, varying.null_z))
    rate = float((np.concatenate(exact) <= 0.1).mean())
    assert abs(rate - 0.1) <= 3 * np.sqrt(0.1 * 0.9 / 800)
    assert float((np.concatenate(one_reference) <= 0.1).mean()) > 0.1 + 3 * np.sqrt(0.1 * 0.9 / 800)


def test_rank_p_values_by_hand():
    reference = np.array([0.1, 0.5, 0.5, 0.9])
    # #{reference ≥ value}: 0, 3 (ties count), 4
    assert nm.rank_p(np.array([1.0, 0.5, -1.0]), reference) == pytest.approx([1 / 5, 4 / 5, 5 / 5])


def test_benjamini_hochberg_matches_statsmodels():
    p = np.array([0.001, 0.04, 0.03, 0.5, 0.2, 0.011])
    assert nm.benjamini_hochberg(p) == pytest.approx(multipletests(p, method="fdr_bh")[1])


@pytest.fixture(scope="module")
def qwen():
    return panel(pd.read_csv(project_root() / "figures/qwen2.5-coder-1.5b-instruct/results/atlas_sweep.csv"))


def test_a_planted_wording_effect_moves_every_concepts_score_by_exactly_its_size(qwen):
    """δ̂ is linear in the Δ with a·signal = 1, and a shift every concept shares does not enter the weights (each kind
    is centred): planting δ adds exactly δ — on the committed Qwen sweep's real noise."""
    base = nm.score_test(qwen.concept_delta, qwen.null_delta, qwen.design, groups=qwen.groups)
    planted = nm.score_test(nm.plant(qwen.concept_delta, qwen.design, 0.05), qwen.null_delta, qwen.design,
                            groups=qwen.groups)
    assert planted.delta_hat - base.delta_hat == pytest.approx(np.full(57, 0.05), abs=1e-9)
    assert planted.null_delta_hat == pytest.approx(base.null_delta_hat, abs=1e-12)
    assert base.I == pytest.approx(base.delta_hat * 8.0)
    # the concepts' score is as noisy as the nulls' (effect-matched spread), and 57 + 114 vectors were scored
    assert np.std(base.delta_hat) == pytest.approx(base.null_sd, rel=0.25)
    assert len(base.null_delta_hat) == 114 and 0 <= base.shrinkage <= 1
