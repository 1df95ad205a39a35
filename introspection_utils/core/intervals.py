"""Confidence intervals shared by the analyses (grading rates, localization accuracy): one Wilson interval."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

Z95 = 1.96  # the conventional two-sided 95% normal quantile


def z_score(level: float) -> float:
    """The two-sided normal quantile of a confidence ``level`` (1.95996… for 0.95)."""
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(successes, n, *, z: float = Z95):
    """Wilson score interval of a binomial proportion ``successes / n``, clipped to [0, 1] (it is well-behaved at 0
    and n, where the normal interval is not). Scalars give a ``(low, high)`` pair of floats, arrays a pair of
    arrays (elementwise); ``n = 0`` gives NaN. ``z``: the normal quantile (see :func:`z_score`)."""
    k, n_ = np.asarray(successes, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n_
        centre = (p + z * z / (2 * n_)) / (1 + z * z / n_)
        half = z * np.sqrt(p * (1 - p) / n_ + z * z / (4 * n_ * n_)) / (1 + z * z / n_)
    low, high = np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high
