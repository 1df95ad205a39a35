"""The terms every reading, figure and verdict quotes, defined once: Δ, polarity, the introspection and control
curves, the controls' line (b, c, R²), the line's residual and the contrast S as linear forms of the per-question Δ
(:func:`statistic_weights`), the flip scale and the answer mass — on tidy sweep tables and as per-question arrays
(:class:`QuestionCurves`). The verdict's statistic I is :mod:`introspection_utils.stats.introspection_score`'s; the
test and
the classes are in :mod:`introspection_utils.stats.verdicts`.

Inputs are the tidy sweep tables of :mod:`introspection_utils.experiments.sweeps` (``sweeps.COLUMNS``). All quantities
are in logits of the yes − no difference at the answer position. Tables saved before the question tags existed (no
``polarity`` column) are read with every introspection wording of polarity +1 and every control 0.

**Terms** (the words of the write-up, one definition each):

* **delta** Δ_q(v, s): question q's yes − no difference with ``s × v`` injected, minus the same question's own
  no-injection value x_q (its *baseline*).
* **polarity** p_q: +1 for a detect wording ("Do you detect an injected thought?": "Yes" reports detection), −1 for an
  inverted one ("Was this a control trial?": "No" reports detection), 0 for a control question. The introspection
  curve and Δ are signed by it (p·(yes − no): > 0 is "towards reporting detection"), so a detect and an inverted
  wording that both drift towards "yes" cancel.
* **introspection curve** / **control curve**: the mean over the wordings (of p·y) / over the control questions (of
  y), at each scale (or layer) — of yes − no (``curve_table``) or of Δ (``QuestionCurves``).
* **the controls' fit** at scale s: least squares Δ_q = b(s) + c(s)·x_q over the control questions. b is the
  **shared push** (what a question at indifference, x = 0, gets: > 0 towards "yes"), c the **slope** (< 0:
  **compression**, every answer drawn towards indifference; c = −1 erases the baseline). R² says how much of the
  controls' spread the line explains. The fit needs at least :data:`MIN_FIT_CONTROLS` controls whose baselines span at
  least :data:`MIN_CONTROL_SPAN` logits; otherwise it is **degenerate** (``fit_ok`` False): the slope is not
  identified: b and c then describe nothing, which the readings say (the verdict's test does not use the line).
* **the controls' prediction** for wording w: b(s) + c(s)·x_w — the Δ a question that is not about injected thoughts
  would get at w's own baseline.
* **the line's residual I_line(s)** (descriptive; the readings call it "the residual beyond the controls' line"):
  the mean over wordings of p_w·(Δ_w − b − c·x_w). It assumes the wordings respond as a control at their own baseline
  would, which a real model need not do (issue #30): the verdict's I is learned from the random vectors instead
  (:mod:`.introspection_score`). It is linear in the Δ's — Σ_q w_q·Δ_q(s) with the weights of :func:`statistic_weights`.
* **S(s), the introspection − control contrast** (the write-up's "introspection-specific shift", kept as its
  description, not the verdict): mean Δ over the wordings (unsigned) − mean Δ over the controls. Compression alone
  makes it positive when the wordings start lower than the controls (the synthetic calibration in
  ``docs/verdicts.md`` measures it), which is why it does not decide.
* **flip scale** of a curve: the smallest injected scale at which its yes − no difference is > 0 ("yes") while its
  no-injection value is ≤ 0 ("no"). NaN when it never flips — and when the no-injection answer already leans "yes":
  there is nothing to flip.
* **answer mass**: P(yes) + P(no) at the answer position. Where it is below :data:`MIN_ANSWER_MASS` the model is
  mostly about to say something else ("I", "As an AI", …), so a positive yes − no difference is an ordering of two
  unlikely tokens, not an answer: readings then say "yes over no" instead of calling a flip.
* **peak scale** s*: the injected scale with the largest line residual — where the readings probe
  (:func:`.line_test.peak_scale`).
* **effect scale**: the injected scale where the controls' line moves most — the larger of |b| and the compression's
  push on the controls, |c|·max|x_q| (``verdicts.movement``); the descriptive classes are read there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from introspection_utils.core.results import concept_rows

MIN_ANSWER_MASS = 0.5  # below it, "yes over no" is not the model's answer
MIN_FIT_CONTROLS = 3  # controls the line b + c·x needs (two points always fit exactly)
MIN_CONTROL_SPAN = 2.0  # logits: the controls' baselines must span this much for the slope c to mean anything
STATISTICS = ("I", "S")
REQUIRED = ["concept", "vector_kind", "vector_seed", "layer", "scale", "question_kind", "question", "logit_diff",
            "baseline_logit_diff", "delta"]


# ------------------------------------------------------------------------------------------------ the curves

def _check_columns(df: pd.DataFrame) -> None:
    missing = set(REQUIRED) - set(df.columns)
    if missing:
        raise ValueError(f"the table lacks columns {sorted(missing)}; pass a sweeps table (sweeps.COLUMNS)")
    if df.empty:
        raise ValueError("the sweep table is empty")


def polarity(df: pd.DataFrame) -> pd.Series:
    """Each row's question polarity (+1 detect wording, −1 inverted wording, 0 control): the table's ``polarity``
    column, or — for tables saved before it existed — +1 for every introspection row and 0 for every control."""
    default = (df["question_kind"] == "introspection").astype(int)
    if "polarity" not in df.columns:
        return default
    values = df["polarity"].fillna(default).astype(int)
    bad = sorted(set(values[df["question_kind"] == "introspection"]) - {1, -1})
    if bad:
        raise ValueError(f"introspection rows need polarity +1 or -1, the table has {bad}")
    return values.where(df["question_kind"] == "introspection", 0)


def select(df: pd.DataFrame, concept: str, *, layer: int | None = None, scale: float | None = None
           ) -> pd.DataFrame:
    """The rows of ``concept`` (and of ``layer`` / ``scale`` if given), with one clear error naming what the table
    holds when a value is not in it."""
    sub = concept_rows(df, concept)
    for column, value in (("layer", layer), ("scale", scale)):
        if value is not None:
            if value not in set(sub[column]):
                raise ValueError(f"{column} {value!r} is not in the table ({sorted(sub[column].unique())})")
            sub = sub[sub[column] == value]
    return sub


def _mean_or_nan(rows: pd.DataFrame, x: str, column: str) -> pd.Series:
    if column not in rows.columns:
        return pd.Series(np.nan, index=pd.Index(sorted(rows[x].unique()), name=x), dtype=float)
    return rows.groupby(x)[column].mean()


def fit_ok(baseline: np.ndarray, is_control: np.ndarray) -> bool:
    """Whether the controls' line can be fitted: at least :data:`MIN_FIT_CONTROLS` controls whose baselines
    (``baseline [Q]``, ``is_control [Q]`` bool) span at least :data:`MIN_CONTROL_SPAN` logits."""
    x = np.asarray(baseline, float)[np.asarray(is_control, bool)]
    return len(x) >= MIN_FIT_CONTROLS and float(x.max() - x.min()) >= MIN_CONTROL_SPAN


def statistic_weights(baseline: np.ndarray, roles: np.ndarray, statistic: str = "I",
                      counts: np.ndarray | None = None) -> np.ndarray:
    """The weights that make a statistic a linear form of the per-question Δ: stat = weights @ Δ.

    ``baseline [Q]`` (each question's no-injection yes − no), ``roles [Q]`` or ``[P, Q]`` ints (+1 detect wording, −1
    inverted wording, 0 control; P labellings at once) → weights of the same shape. ``counts`` (same shape as
    ``roles``, default 1 everywhere): how many times each question is drawn — a bootstrap resample is a labelling
    whose questions come 0, 1, 2, … times, and its statistic is this one definition with those multiplicities.

    ``"I"``: the mean over wordings of p_w·(Δ_w − b − c·x_w), with b, c the least-squares line over the controls:
    w_w = p_w / m on a wording; on a control q, −(1/m)·[Σp / n + (x_q − x̄)·Σ_w p_w (x_w − x̄) / Sxx] (x̄, Sxx
    over the controls; with ``counts`` every sum counts each question as often as it is drawn). Where the controls'
    baselines do not vary (Sxx ≈ 0) the slope term is dropped (b alone).
    ``"S"``: 1/m on every wording (unsigned), −1/n on every control.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic {statistic!r}: choose one of {STATISTICS}")
    roles = np.asarray(roles)
    single = roles.ndim == 1
    roles = np.atleast_2d(roles).astype(float)
    k = np.ones_like(roles) if counts is None else np.asarray(counts, float)
    if k.shape != roles.shape[-k.ndim:] or (k < 0).any():
        raise ValueError(f"counts of shape {k.shape} must be non-negative and shaped like roles {roles.shape}")
    is_control = roles == 0
    ctrl, wording = is_control * k, ~is_control * k  # each question as often as it is drawn
    roles = roles * k
    x = np.asarray(baseline, float)
    m = wording.sum(axis=1, keepdims=True)
    n = ctrl.sum(axis=1, keepdims=True)
    if (m == 0).any() or (n == 0).any():
        raise ValueError("every labelling needs at least one wording and one control")
    if statistic == "S":
        weights = wording / m - ctrl / n
    else:
        xbar = (ctrl @ x)[:, None] / n  # [P, 1]: the controls' mean baseline
        sxx = (ctrl @ (x * x))[:, None] - n * xbar ** 2  # their sum of squares about it
        total = roles.sum(axis=1, keepdims=True)  # Σ p_w
        lever = (roles @ x)[:, None] - total * xbar  # Σ p_w (x_w − x̄)
        slope = np.divide(lever, sxx, out=np.zeros_like(sxx), where=sxx > 1e-9 * max(1.0, float(np.abs(x).max())))
        weights = (roles - ctrl * (total / n + (x[None, :] - xbar) * slope)) / m
    return weights[0] if single else weights


def control_fit(baseline: np.ndarray, delta: np.ndarray, is_control: np.ndarray) -> dict[str, np.ndarray]:
    """The controls' least-squares line Δ = b + c·x at each point: ``baseline [Q]``, ``delta [Q, S]``,
    ``is_control [Q]`` → ``b [S]``, ``c [S]`` (0 where the baselines do not vary) and ``r2 [S]`` (NaN where the
    controls' Δ do not vary)."""
    x = np.asarray(baseline, float)[np.asarray(is_control, bool)]
    d = np.asarray(delta, float)[np.asarray(is_control, bool)]
    dx = x - x.mean()
    sxx = float((dx ** 2).sum())
    c = (dx @ (d - d.mean(axis=0))) / sxx if sxx > 1e-9 * max(1.0, float(np.abs(x).max())) else np.zeros(d.shape[1])
    b = d.mean(axis=0) - c * x.mean()
    resid = d - b - np.outer(x, c)
    total = ((d - d.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(total > 1e-12, 1 - (resid ** 2).sum(axis=0) / total, np.nan)
    return {"b": b, "c": c, "r2": r2}


def curve_table(df: pd.DataFrame, concept: str, *, x: str = "scale", layer: int | None = None,
                scale: float | None = None, y: str = "logit_diff", baseline: str = "baseline_logit_diff"
                ) -> pd.DataFrame:
    """The introspection and control curves of one concept, per value of ``x`` ("scale" or "layer" for sweep
    tables — pass the other one when the table holds several values of it; "lens_layer" for logit-lens tables with
    ``y="lens_diff"``, ``baseline="baseline_lens_diff"``).

    Columns: ``introspection`` (mean of polarity × ``y`` over the wordings: > 0 towards reporting detection; plain
    yes − no when every wording is a detect one), ``control_mean``, ``control_std`` and ``n_controls`` (over control
    questions), ``n_wordings``; ``random_introspection`` / ``random_control`` (mean over random vectors; NaN without
    them); the no-injection values ``introspection_baseline`` and ``control_baseline``; ``predicted`` (what the
    controls' fit predicts for the introspection curve: the wordings' baselines plus b + c·x_w, signed and averaged
    alike), ``residual`` (I = introspection − predicted), ``push`` (b), ``slope`` (c), ``fit_r2``, ``fit_ok``;
    ``shift`` (the contrast S); ``introspection_mass`` and ``control_mass`` (mean answer mass; NaN for tables saved
    before it was measured).
    """
    sub = select(df, concept, layer=layer, scale=scale)
    if x in ("scale", "layer"):
        other = "layer" if x == "scale" else "scale"
        if sub[other].nunique() > 1:
            raise ValueError(f"the table holds several {other}s ({sorted(sub[other].unique())}); pass {other}=")
    sub = sub.assign(_polarity=polarity(sub))
    sub = sub.assign(_signed=sub[y] * sub["_polarity"].where(sub["_polarity"] != 0, 1),
                     _signed_base=sub[baseline] * sub["_polarity"].where(sub["_polarity"] != 0, 1))
    out = pd.DataFrame(index=pd.Index(sorted(sub[x].unique()), name=x))
    for kind, prefix in (("concept", ""), ("random", "random_")):
        rows = sub[sub["vector_kind"] == kind]
        intro = rows[rows["question_kind"] == "introspection"].groupby([x, "question"])["_signed"].mean()
        control = rows[rows["question_kind"] == "control"].groupby([x, "question"])[y].mean()
        out[prefix + "introspection"] = intro.groupby(level=0).mean()
        out[prefix + ("control_mean" if kind == "concept" else "control")] = control.groupby(level=0).mean()
        if kind == "concept":
            out["control_std"] = control.groupby(level=0).std(ddof=0)
            out["n_controls"] = control.groupby(level=0).size()
            out["n_wordings"] = intro.groupby(level=0).size()
    concept_rows_ = sub[sub["vector_kind"] == "concept"]
    for kind, column in (("introspection", "_signed_base"), ("control", baseline)):
        rows = concept_rows_[concept_rows_["question_kind"] == kind]
        out[f"{kind}_baseline"] = rows.groupby(x)[column].mean() if len(rows) else np.nan
        out[f"{kind}_mass"] = _mean_or_nan(rows, x, "answer_mass") if len(rows) else np.nan
    for column in ("predicted", "residual", "push", "slope", "fit_r2", "shift"):
        out[column] = np.nan
    out["fit_ok"] = False
    for at, rows in concept_rows_.groupby(x):
        per_q = rows.groupby("question").agg(y=(y, "mean"), base=(baseline, "mean"), role=("_polarity", "first"))
        roles = per_q["role"].to_numpy(int)
        if not (roles != 0).any() or not (roles == 0).any():
            continue
        base, delta = per_q["base"].to_numpy(float), (per_q["y"] - per_q["base"]).to_numpy(float)[:, None]
        fit = control_fit(base, delta, roles == 0)
        residual = float(statistic_weights(base, roles) @ delta[:, 0])
        out.loc[at, "shift"] = float(statistic_weights(base, roles, "S") @ delta[:, 0])
        out.loc[at, ["residual", "push", "slope", "fit_r2"]] = [residual, fit["b"][0], fit["c"][0], fit["r2"][0]]
        out.loc[at, "predicted"] = out.loc[at, "introspection"] - residual
        out.loc[at, "fit_ok"] = fit_ok(base, roles == 0)
    return out


def random_curves(df: pd.DataFrame, concept: str, *, x: str = "scale", y: str = "logit_diff"
                  ) -> dict[int, pd.DataFrame]:
    """Each random vector's curves (``introspection``: mean of polarity × ``y`` over the wordings; ``control``: mean
    over the controls), by seed."""
    sub = select(df, concept)
    sub = sub.assign(_signed=sub[y] * polarity(sub).where(sub["question_kind"] == "introspection", 1))
    out = {}
    for seed, rows in sub[sub["vector_kind"] == "random"].groupby("vector_seed"):
        per_question = rows.groupby(["question_kind", x, "question"])["_signed"].mean()
        out[int(seed)] = pd.DataFrame({kind: per_question.loc[kind].groupby(level=0).mean()
                                       for kind in ("introspection", "control") if kind in per_question.index})
    return out


def question_table(df: pd.DataFrame, concept: str, *, x: str = "scale", y: str = "logit_diff",
                   question_kind: str = "control") -> pd.DataFrame:
    """One column per question of ``question_kind`` (concept vector), indexed by ``x``: the per-question curves
    that :func:`curve_table` averages (``y``: "logit_diff" or "delta"; unsigned)."""
    sub = select(df, concept)
    rows = sub[(sub["vector_kind"] == "concept") & (sub["question_kind"] == question_kind)]
    return rows.pivot_table(index=x, columns="question", values=y)


def flip_scale(x: Sequence[float], logit_diff: Sequence[float], baseline: float) -> float:
    """The smallest injected ``x`` (≠ 0) at which ``logit_diff [S]`` is > 0 ("yes") while the no-injection
    ``baseline`` is ≤ 0 ("no"); NaN if it never flips or the baseline already leans yes (nothing to flip)."""
    x, logit_diff = np.asarray(x, float), np.asarray(logit_diff, float)
    if baseline > 0:
        return float("nan")
    hits = (x != 0) & (logit_diff > 0)
    return float(np.sort(x[hits])[0]) if hits.any() else float("nan")


def mass_note(mass: float) -> str:
    """How to word a yes − no reading at answer mass ``mass`` (P(yes) + P(no)): empty when it is a real answer."""
    if np.isnan(mass) or mass >= MIN_ANSWER_MASS:
        return ""
    return (f" (answer mass P(yes)+P(no) = {mass:.2f} < {MIN_ANSWER_MASS}: yes over no, not the model's answer "
            f"— it would mostly say something else)")


# ----------------------------------------------------------------------------------------- per-question arrays

@dataclass(frozen=True)
class QuestionCurves:
    """One vector's Δ per question at one layer: ``x [S]`` (ascending), ``delta [Q, S]``, ``logit [Q, S]``,
    ``baseline [Q]``, ``mass [Q, S]`` (NaN if not measured), ``is_intro [Q]`` (bool), ``questions [Q]``,
    ``polarity [Q]`` (+1 / −1 on the wordings, 0 on the controls; default +1 on every wording)."""

    x: np.ndarray
    delta: np.ndarray
    logit: np.ndarray
    baseline: np.ndarray
    mass: np.ndarray
    is_intro: np.ndarray
    questions: tuple[str, ...]
    polarity: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.polarity is None:
            object.__setattr__(self, "polarity", self.is_intro.astype(int))
        elif not np.array_equal(self.polarity != 0, self.is_intro) or not set(np.abs(self.polarity)) <= {0, 1}:
            raise ValueError(f"polarity {self.polarity.tolist()} must be ±1 on the wordings and 0 on the controls")

    @property
    def injected(self) -> np.ndarray:
        """``[S]`` bool: the injected points (x ≠ 0; at 0 every Δ is 0 by definition)."""
        return self.x != 0

    @property
    def fit_ok(self) -> bool:
        """Whether the controls' fit is identified (:func:`fit_ok`)."""
        return fit_ok(self.baseline, ~self.is_intro)

    @property
    def control_span(self) -> float:
        """How far the controls' no-injection answers spread (max − min, logits)."""
        x = self.baseline[~self.is_intro]
        return float(x.max() - x.min())

    def statistic(self, statistic: str = "I", roles: np.ndarray | None = None) -> np.ndarray:
        """I (or S) per x ``[S]`` — or ``[P, S]`` for ``roles [P, Q]`` relabellings (default the real roles)."""
        return statistic_weights(self.baseline, self.polarity if roles is None else roles, statistic) @ self.delta

    def residual(self) -> np.ndarray:
        """I per x ``[S]``: the wordings' signed mean residual from the controls' line (the verdict's statistic)."""
        return self.statistic("I")

    def shift(self, is_intro: np.ndarray | None = None) -> np.ndarray:
        """S per x ``[S]`` under a labelling (default the real one): mean intro Δ − mean control Δ."""
        return self.statistic("S", None if is_intro is None else np.asarray(is_intro).astype(int))

    def fit(self) -> dict[str, np.ndarray]:
        """The controls' line at each x: ``b``, ``c``, ``r2`` ``[S]`` (:func:`control_fit`)."""
        return control_fit(self.baseline, self.delta, ~self.is_intro)

    def predicted(self) -> np.ndarray:
        """``[S]``: what the controls' line predicts for the signed mean Δ of the wordings (at their own baselines);
        :meth:`group_delta` (True) − this = I."""
        f, p = self.fit(), self.polarity[self.is_intro]
        return (p[:, None] * (f["b"][None, :] + np.outer(self.baseline[self.is_intro], f["c"]))).mean(axis=0)

    def group_delta(self, intro: bool) -> np.ndarray:
        """``[S]``: mean signed Δ over the introspection wordings (``True``) or mean Δ over the controls (``False``)."""
        if intro:
            return (self.polarity[self.is_intro, None] * self.delta[self.is_intro]).mean(axis=0)
        return self.delta[~self.is_intro].mean(axis=0)

    @classmethod
    def synthetic(cls, x: Sequence[float], delta: np.ndarray, n_intro: int, *, baseline: float | Sequence[float] = -2.0,
                  polarity: Sequence[int] | None = None) -> QuestionCurves:
        """Hand-made or simulated curves: ``delta [Q, S]`` with the first ``n_intro`` rows the introspection
        wordings; ``baseline`` one value for every question or one per question; ``polarity`` one ±1 per wording
        (default all +1); mass unmeasured."""
        delta = np.asarray(delta, float)
        q = delta.shape[0]
        is_intro = np.arange(q) < n_intro
        base = np.broadcast_to(np.asarray(baseline, float), (q,)).copy()
        pol = is_intro.astype(int)
        if polarity is not None:
            pol[:n_intro] = np.asarray(polarity, int)
        return cls(np.asarray(x, float), delta, delta + base[:, None], base, np.full(delta.shape, np.nan), is_intro,
                   tuple(f"q{i}" for i in range(q)), pol)


def _grid(order: pd.DataFrame, x: str) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]] | None:
    """One vector's rows (sorted by question kind, question, ``x``; one per question and ``x``) as ``[Q, S]``
    arrays; None when a question misses an ``x``."""
    xs = np.unique(order[x].to_numpy(float))
    shape = (len(order) // len(xs), len(xs))
    if len(order) % len(xs) or not (order[x].to_numpy(float).reshape(shape) == xs[None, :]).all():
        return None
    names = order["question"].to_numpy().reshape(shape)
    arrays = {c: order[c].to_numpy(float).reshape(shape) for c in ("logit_diff", "delta", "baseline_logit_diff",
                                                                   "_polarity", "answer_mass") if c in order}
    arrays["is_intro"] = (order["question_kind"].to_numpy() == "introspection").reshape(shape)[:, 0]
    return xs, list(names[:, 0]), arrays


def question_curves(df: pd.DataFrame, *, x: str = "scale") -> dict[tuple[str, int, str, int | None], QuestionCurves]:
    """Split a sweep table into :class:`QuestionCurves`, keyed by ``(concept, layer, vector_kind, vector_seed)``
    (``x="layer"``: keyed by ``(concept, scale, …)`` instead). Questions are in a fixed (sorted) order within each
    kind so a concept and its random vectors line up; repeated rows of a question at one ``x`` are averaged."""
    _check_columns(df)
    other = "layer" if x == "scale" else "scale"
    df = df.assign(_polarity=polarity(df)).sort_values(["question_kind", "question", x], ascending=[False, True, True],
                                                       kind="stable")
    numeric = [c for c in ("logit_diff", "delta", "baseline_logit_diff", "answer_mass") if c in df]
    out = {}
    for key, order in df.groupby(["concept", other, "vector_kind", "vector_seed"], dropna=False, sort=True):
        concept, at, kind, seed = key
        if order.duplicated(["question", x]).any():  # average repeats, keeping the order
            order = order.groupby(["question_kind", "question", x], sort=False, as_index=False).agg(
                {**dict.fromkeys(numeric, "mean"), "_polarity": "first"})
        grid = _grid(order, x)
        if grid is None:
            raise ValueError(f"{concept!r} {other} {at} ({kind}): the questions were measured at different {x}s")
        xs, questions, a = grid
        if not a["is_intro"].any() or a["is_intro"].all():
            raise ValueError(f"{concept!r} {other} {at} ({kind}): needs introspection and control questions")
        out[(concept, at.item() if hasattr(at, "item") else at, kind, None if pd.isna(seed) else int(seed))] = (
            QuestionCurves(xs, a["delta"], a["logit_diff"], a["baseline_logit_diff"].mean(axis=1),
                           a.get("answer_mass", np.full(a["delta"].shape, np.nan)), a["is_intro"], tuple(questions),
                           a["_polarity"][:, 0].astype(int)))
    return out
