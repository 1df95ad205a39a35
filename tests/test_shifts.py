"""One definition of each number: S (the introspection − control contrast) is the same whether read from the curve
table, the per-question curves or a contrast table; the descriptive statistics' rules use their named thresholds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_verdicts import _scaled, _spread, _table

from introspection_utils.stats import definitions, shifts


def test_s_is_one_number_in_the_curve_table_the_question_curves_and_the_contrast_table():
    deltas = _scaled([1.0, 0.5, -0.25, 0.0, 0.5, 1.5])  # 2 wordings of both polarities, 4 controls
    df = _table({"x": (deltas, 2)}, baseline=_spread(2, 4), polarity=[1, -1])
    table = definitions.curve_table(df, "x")
    curves = definitions.question_curves(df)[("x", 3, "concept", None)]
    np.testing.assert_allclose(table["shift"].to_numpy(), curves.shift(), atol=1e-12)
    contrast = shifts.question_contrast(df[df["vector_kind"] == "concept"], "delta", ["scale"])
    np.testing.assert_allclose(contrast["specific"].to_numpy(), curves.shift(), atol=1e-12)
    # the weights' form: 1/m on every wording (unsigned), −1/n on every control
    weights = definitions.statistic_weights(curves.baseline, curves.polarity, "S")
    assert weights.tolist() == pytest.approx([0.5, 0.5, -0.25, -0.25, -0.25, -0.25])


def test_specific_is_introspection_minus_control_elementwise():
    assert shifts.specific(3.0, 1.0) == 2.0
    got = shifts.specific(pd.Series([1.0, 2.0]), pd.Series([0.5, 3.0]))
    assert got.tolist() == [0.5, -1.0]


def test_the_rules_use_their_named_thresholds():
    r = shifts.COMOVEMENT_R
    assert shifts.moves_together(r + 0.01, 1.0, 2.0) and not shifts.moves_together(r, 1.0, 2.0)
    assert not shifts.moves_together(0.99, 1.0, -2.0)  # correlated but opposite overall changes
    half = shifts.SHARED_FRACTION
    assert bool(shifts.shared_rise(1.0, half)) and not bool(shifts.shared_rise(1.0, half - 0.01))
