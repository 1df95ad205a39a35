"""The interactive explorer: :class:`ExplorerState` computes (memoised per concept and layer), :class:`Explorer`
wires ipywidgets to it; notebook 00 and ``explorer.ipynb`` call :func:`explorer`."""

from __future__ import annotations

import html
import io
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from introspection_utils.engine.prompts import control_questions, introspection_questions
from introspection_utils.engine.vectors import concept_vectors, default_layer
from introspection_utils.experiments.sweeps import SweepSpec, scale_sweep
from introspection_utils.plotting import series as plots
from introspection_utils.stats import definitions

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

INTROSPECTION = "introspection"


class ExplorerState:
    """The explorer's numbers, computed on demand and memoised.

    ``values(concept, layer, scale, question, random)`` → a dict: ``value`` (the selected question's yes−no logit
    difference), ``baseline`` (that question without injection), ``introspection`` and ``control_mean`` (the current
    trial's introspection answer and control mean), ``predicted`` (what the controls' line b + c·baseline predicts
    for the introspection answer at its own baseline: :meth:`definitions.QuestionCurves.predicted`),
    ``residual`` (I, the
    introspection answer's shift beyond that prediction), ``fit_ok``, ``vector_norm``. ``question`` is
    ``"introspection"`` or one of :attr:`controls`; ``random=True`` injects the norm-matched random vector (seed
    ``seed``) instead.
    """

    def __init__(self, handle: ModelHandle, concepts: Sequence[str], *, scales: Sequence[float] = (0, 1, 2, 4, 8, 16),
                 n_controls: int = 4, seed: int = 0) -> None:
        if not concepts:
            raise ValueError("no concepts given")
        if not scales:
            raise ValueError("no scales given")
        self.handle = handle
        self.concepts = list(concepts)
        self.scales = sorted(float(s) for s in scales)
        self.controls = control_questions(n_controls)
        self.seed = seed
        self.bank = concept_vectors(handle, self.concepts, progress=False)
        self.cache: dict[tuple[str, int], pd.DataFrame] = {}
        self.hits = 0
        self.misses = 0

    @property
    def questions(self) -> list[str]:
        return [INTROSPECTION, *self.controls]

    def sweep(self, concept: str, layer: int, *, progress: bool = False) -> pd.DataFrame:
        """The scale sweep of ``concept`` at ``layer`` (all questions, concept and one random vector), memoised;
        ``progress`` shows a progress bar (over the questions) while a new sweep computes."""
        if concept not in self.concepts:
            raise ValueError(f"concept {concept!r} is not one of the explorer's ({', '.join(self.concepts)})")
        key = (concept, self.handle.check_layer(int(layer)))
        if key in self.cache:
            self.hits += 1
            return self.cache[key]
        self.misses += 1
        # one wording, the paper's trial line: the explorer shows one introspection curve, so its I is that curve's
        # distance from the controls' line (the atlas averages over wordings of both polarities)
        spec = SweepSpec.build([concept], self.scales, [key[1]], controls=self.controls, n_random=1,
                               introspection=introspection_questions(["paper"])[0], seed=self.seed)
        result = scale_sweep(self.handle, spec, bank=self.bank, progress=progress)
        self.cache[key] = result.df
        return result.df

    def values(self, concept: str, layer: int, scale: float, question: str = INTROSPECTION,
               random: bool = False) -> dict[str, Any]:
        if float(scale) not in self.scales:
            raise ValueError(f"scale {scale!r} is not on the explorer's grid {self.scales}")
        if question not in self.questions:
            raise ValueError(f"question {question!r} is not one of the explorer's: {self.questions}")
        df = self.sweep(concept, layer)
        rows = df[(df["scale"] == float(scale)) & (df["vector_kind"] == ("random" if random else "concept"))]
        intro = rows[rows["question_kind"] == INTROSPECTION].iloc[0]
        control = rows[rows["question_kind"] == "control"]
        chosen = intro if question == INTROSPECTION else control[control["question"] == question].iloc[0]
        curves = definitions.question_curves(df)[(concept, int(layer), "random" if random else "concept",
                                               self.seed if random else None)]
        at = int(np.flatnonzero(curves.x == float(scale))[0])
        signed_base = float((curves.polarity * curves.baseline)[curves.is_intro].mean())
        return {"concept": concept, "layer": int(layer), "scale": float(scale), "question": question,
                "random": bool(random), "value": float(chosen["logit_diff"]),
                "baseline": float(chosen["baseline_logit_diff"]), "introspection": float(intro["logit_diff"]),
                "control_mean": float(control["logit_diff"].mean()), "vector_norm": float(intro["vector_norm"]),
                "answer_mass": float(chosen["answer_mass"]),
                "predicted": signed_base + float(curves.predicted()[at]), "residual": float(curves.residual()[at]),
                "fit_ok": curves.fit_ok}

    def describe(self, v: dict[str, Any]) -> str:
        """One line of the current trial's numbers."""
        kind = "random vector" if v["random"] else "concept vector"
        fit = "" if v["fit_ok"] else " — the controls' fit is degenerate (too few controls or too little spread)"
        return (f"{v['concept']} {kind} at layer {v['layer']}, scale {v['scale']:g} (‖v‖ = {v['vector_norm']:.3g}): "
                f"introspection yes−no {v['introspection']:+.2f}, control mean {v['control_mean']:+.2f}; the "
                f"controls' line predicts {v['predicted']:+.2f} for the introspection answer at its own baseline, so "
                f"I = {v['residual']:+.2f}{fit}; "
                f"selected question {v['value']:+.2f} (no injection {v['baseline']:+.2f}"
                + (f"){note}." if (note := definitions.mass_note(v["answer_mass"]))  # the mass, said once
                   else f"; answer mass P(yes)+P(no) {v['answer_mass']:.2f})."))

    def figure(self, concept: str, layer: int, scale: float, question: str = INTROSPECTION,
               random: bool = False) -> plt.Figure:
        """The scale sweep of ``concept`` at ``layer`` with the current trial marked."""
        v = self.values(concept, layer, scale, question, random)
        label = f"current: {'random, ' if random else ''}{'introspection' if question == INTROSPECTION else 'control'}"
        return plots.plot_scale_sweep(self.sweep(concept, layer), concept, mark=(v["scale"], v["value"]),
                                      mark_label=label)


class Explorer:
    """ipywidgets around an :class:`ExplorerState`: concept dropdown, layer slider, scale slider, question selector,
    random-vector toggle; every change redraws the figure and the numbers (sliders update on release).

    The figure is an ``Image`` widget (PNG bytes), not an ``Output`` widget, and the first render, which runs while
    the notebook itself executes, draws no progress bar: a headless executor (nbclient, under Voilà, papermill and
    nbval) mimics a front end for ``Output`` widgets by sending ``comm_msg`` messages to the kernel on the shell channel
    while it awaits the cell's ``execute_reply`` on that same socket, and under load that reply was never seen
    (the page hung on "Executing 3 of 5"; the kernel was idle, its cell done). A sweep started from a control
    later shows its progress in an ``Output`` (``progress``), cleared when it finishes: by then the page's own
    front end, not the executor, holds the kernel connection.
    """

    def __init__(self, state: ExplorerState, *, layer: int | None = None) -> None:
        import ipywidgets as w

        self.state = state
        h = state.handle
        self.concept = w.Dropdown(options=state.concepts, value=state.concepts[0], description="concept")
        self.layer = w.IntSlider(value=default_layer(h, layer), min=0, max=h.arch.n_layers - 1,
                                 description="layer", continuous_update=False)
        self.scale = w.SelectionSlider(options=state.scales, value=state.scales[len(state.scales) // 2],
                                       description="scale", continuous_update=False)
        self.question = w.Dropdown(options=state.questions, value=INTROSPECTION, description="question",
                                   layout=w.Layout(width="32em"))
        self.random = w.ToggleButton(value=False, description="random vector", tooltip="inject a norm-matched "
                                     "random vector instead of the concept vector")
        self.numbers = w.HTML()
        self.status = w.HTML()
        self.progress = w.Output()  # a control's new sweep: its progress bar, cleared when done
        self.figure = w.Image(format="png")
        self.notes: dict[tuple[str, int], list[str]] = {}  # (concept, layer) → the warnings its sweep raised
        # Stable CSS hooks for the web page (introspection_utils.apps.explore) and its browser test.
        for widget, name in ((self.concept, "concept"), (self.layer, "layer"), (self.scale, "scale"),
                             (self.question, "question"), (self.random, "random"), (self.numbers, "numbers"),
                             (self.status, "status"), (self.progress, "progress"), (self.figure, "figure")):
            widget.add_class(f"iu-{name}")
        for control in (self.concept, self.layer, self.scale, self.question, self.random):
            control.observe(self._on_change, names="value")
        self.box = w.VBox([w.HBox([self.concept, self.layer, self.scale]), w.HBox([self.question, self.random]),
                           self.status, self.numbers, self.progress, self.figure])

    def current(self) -> dict[str, Any]:
        return {"concept": self.concept.value, "layer": self.layer.value, "scale": self.scale.value,
                "question": self.question.value, "random": self.random.value}

    def render(self, progress: bool = False) -> plt.Figure:
        """Recompute (or reuse) the current state; update the numbers and the figure; return the figure.
        ``progress``: show a new sweep's progress bar in ``self.progress`` (the controls' callbacks do; the first
        render, inside the notebook's own execution, does not: see the class docstring)."""
        current = self.current()
        key = (current["concept"], current["layer"])
        if key not in self.state.cache:  # sent to the page before the long computation starts
            self.status.value = (f"<i>computing the scale sweep of {key[0]} at layer {key[1]} "
                                 f"({len(self.state.scales)} scales × {len(self.state.questions)} questions × "
                                 f"concept and random vector)…</i>")
            with warnings.catch_warnings(record=True) as caught:  # shown on the status line, not as stderr boxes
                warnings.simplefilter("always")
                if progress:
                    with self.progress:
                        self.state.sweep(*key, progress=True)
                    self.progress.clear_output()
                else:
                    self.state.sweep(*key, progress=False)
            self.notes[key] = list(dict.fromkeys(str(w.message) for w in caught))
        v = self.state.values(**current)
        self.numbers.value = (f"<b>introspection yes−no</b> <span class='iu-introspection'>{v['introspection']:+.2f}"
                              f"</span> &nbsp; <b>control mean</b> <span class='iu-control-mean'>"
                              f"{v['control_mean']:+.2f}</span> &nbsp; <b>controls' prediction for it</b> "
                              f"<span class='iu-predicted'>{v['predicted']:+.2f}</span> &nbsp; <b>I</b> "
                              f"<span class='iu-residual'>{v['residual']:+.2f}</span>"
                              f"<br><code>{self.state.describe(v)}</code>")
        fig = self.state.figure(**current)
        png = io.BytesIO()
        fig.savefig(png, format="png", bbox_inches="tight")  # as the inline backend draws it
        self.figure.value = png.getvalue()
        plt.close(fig)
        notes = "".join(f"<br><small>⚠ {html.escape(note)}</small>" for note in self.notes.get(key, ()))
        self.status.value = (f"ready · {len(self.state.cache)} (concept, layer) sweep(s) cached; moving the scale, "
                             f"question or random toggle reuses them{notes}")
        return fig

    def _on_change(self, _change: dict) -> None:
        self.render(progress=True)


def explorer(handle: ModelHandle, concepts: Sequence[str], *, layer: int | None = None,
             scales: Sequence[float] = (0, 1, 2, 4, 8, 16), n_controls: int = 4, seed: int = 0,
             show: bool = True) -> Explorer:
    """Build and display the explorer. Headless (papermill, nbval) the widget has no live view, so the initial
    state's figure and numbers are also displayed as static outputs."""
    from IPython.display import display

    state = ExplorerState(handle, concepts, scales=scales, n_controls=n_controls, seed=seed)
    ui = Explorer(state, layer=layer)
    fig = ui.render()
    if show:
        display(ui.box)
        print("initial state (static copy for headless runs):", state.describe(state.values(**ui.current())))
        display(fig)
    return ui
