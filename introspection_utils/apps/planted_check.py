"""Does the plasmode's power hold through the model? A plain atlas sweep, the plasmode's prediction on its numbers, and
the concept rows measured again with each effect planted by forward hooks (:func:`atlas.planted_effect`): a
detection signal on the wordings must be called at the rate the plasmode predicts, a compression, a shared yes-shift
or a push on questions about the model must not be called (issue #30).

    python -m introspection_utils.apps.planted_check --model qwen2.5-coder-1.5b-instruct --concepts 20
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from introspection_utils.engine.metadata import save_table
from introspection_utils.engine.vectors import concept_vectors, default_layer
from introspection_utils.experiments.atlas import default_controls, planted_effect
from introspection_utils.experiments.sweeps import SweepSpec, scale_sweep
from introspection_utils.stats import plasmode
from introspection_utils.stats.verdicts import verdicts

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

GRID = (0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2)  # δ, logits per unit scale: where the signal is picked
KEYS = ["concept", "vector_kind", "vector_seed", "scale", "question"]
CONFOUNDS = ("compression", "yes-shift", "self push")  # planted at the sizes fitted to the plain sweep


def planted_arithmetically(plain: pd.DataFrame, effect: plasmode.Effect) -> pd.DataFrame:
    """The sweep table ``plain`` with ``effect`` planted into its concept rows' answers by the plasmode's arithmetic
    (:meth:`plasmode.Effect.answer`, row by row), Δ recomputed; random rows unchanged."""
    out = plain.copy()
    concept = out["vector_kind"] == "concept"
    out.loc[concept, "logit_diff"] = effect.answer(
        out.loc[concept, "logit_diff"].to_numpy(), scale=out.loc[concept, "scale"].to_numpy(),
        polarity=out.loc[concept, "polarity"].to_numpy(),
        about_self=(out.loc[concept, "question_about"] == "self").to_numpy(), top_scale=float(out["scale"].max()))
    out["delta"] = out["logit_diff"] - out["baseline_logit_diff"]
    return out


def planted_check(handle: ModelHandle, concepts: Sequence[str], scales: Sequence[float], *, layer: int | None = None,
                  n_controls: int = 12, n_random: int = 4, seed: int = 0, grid: Sequence[float] = GRID,
                  results_dir: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """One row per planted effect: ``effect``, ``size``, ``predicted_called`` (the plasmode's fraction of concepts
    called introspection-specific, on the plain sweep's numbers with the effect planted), ``called`` (the same from
    the sweep measured with the effect planted by hooks: the concept rows re-measured, the plain sweep's random
    vectors, which the hooks leave alone), ``max_abs_error`` (the largest |Δ measured − Δ planted by arithmetic| over
    the re-measured rows, logits), ``n_concepts``, ``n_nulls``.

    The signal is the wording effect δ·s·p_w with δ the smallest ``grid`` point predicted called for at least half
    of the concepts (the largest if none is);
    the confounds (:data:`CONFOUNDS`) take the sizes :func:`plasmode.fitted_scenarios` fits to the plain sweep. The
    controls are the model's battery picks (:func:`atlas.default_controls`), the wordings the default ones, the layer
    the default, ``n_random`` isotropic random vectors per concept (R = ``len(concepts)·n_random``: the smallest
    rank p-value is 1/(R + 1)). With ``results_dir`` every sweep is chunked and resumable there and the table is
    saved as ``planted_check.csv``."""
    layer = default_layer(handle, layer)
    bank = concept_vectors(handle, concepts, progress=progress)
    controls = default_controls(handle, n_controls)
    spec = SweepSpec.build(concepts, scales, [layer], controls=controls, n_random=n_random, seed=seed)
    plain = scale_sweep(handle, spec, bank=bank, results_dir=results_dir, name="planted_plain_sweep",
                        progress=progress).df
    panel = plasmode.panel(plain)
    curve = plasmode.power_curve(panel, grid)
    half = np.flatnonzero(curve["called"].to_numpy() >= 0.5)
    signal = plasmode.Effect("wording", float(curve["delta"].iloc[half[0] if len(half) else -1]))
    fitted = plasmode.fitted_scenarios(panel)
    concept_spec = SweepSpec.build(concepts, scales, [layer], controls=controls, n_random=0, seed=seed)
    nulls = plain[plain["vector_kind"] == "random"]
    rows = []
    for effect in (signal, *(fitted[name] for name in CONFOUNDS)):
        with planted_effect(handle, concept_spec, effect, bank=bank):
            hooked = scale_sweep(handle, concept_spec, bank=bank, results_dir=results_dir,
                                 name=f"planted_{effect.kind.replace(' ', '_')}_{effect.size:g}_sweep".replace(
                                     ".", "p"),  # a dot would end the table's name
                                 progress=progress).df
        expected = planted_arithmetically(plain, effect).set_index(KEYS)
        got = hooked.set_index(KEYS)
        error = float(np.abs(got["delta"].to_numpy() - expected.loc[got.index, "delta"].to_numpy()).max())
        measured = verdicts(pd.concat([hooked, nulls], ignore_index=True), n_boot=1, mde=False)
        predicted = plasmode.score_method(effect.apply(panel.concept_delta, panel), panel.null_delta, panel,
                                          panel.groups)
        rows.append({"effect": effect.kind, "size": effect.size,
                     "predicted_called": plasmode.called_fraction(predicted),
                     "called": float((measured["class"] == "introspection-specific").mean()),
                     "max_abs_error": error, "n_concepts": len(concepts), "n_nulls": len(panel.null_delta)})
    table = pd.DataFrame(rows)
    if results_dir is not None:
        save_table(handle, table, results_dir, "planted_check", concepts=list(concepts), scales=list(scales),
                   layer=layer, n_controls=n_controls, n_random=n_random, seed=seed, grid=list(grid))
    return table


def planted_markdown(table: pd.DataFrame, model: str) -> str:
    """:func:`planted_check`'s table as ``docs/verdicts.md`` shows it."""
    first = table.iloc[0]
    lines = [f"**{model}** ({first['n_concepts']} concepts, {first['n_nulls']} random vectors; the signal's δ is the "
             "smallest grid point the plasmode predicts called for half the concepts, the confounds' sizes are fitted "
             "to the plain sweep; called = introspection-specific after Benjamini–Hochberg):", "",
             "| planted by hooks | size | plasmode predicts called | measured called | max \\|Δ − planted\\| "
             "(logits) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r.effect} | {r.size:g} | {r.predicted_called:.0%} | {r.called:.0%} | {r.max_abs_error:.1e} |"
              for r in table.itertuples()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the check on ``--model`` (the first ``--concepts`` of the findings atlas's list), save its table under
    ``figures/<model>/results/`` and write it into docs/verdicts.md's ``planted`` block."""
    import tomllib

    from introspection_utils.core.paths import project_root, replace_block
    from introspection_utils.models.handle import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--concepts", type=int, default=20)
    parser.add_argument("--scales", type=float, nargs="+", default=[4.0, 8.0])
    parser.add_argument("--n-random", type=int, default=2, help="random vectors per concept (the atlas's 2)")
    parser.add_argument("--dtype", default="float32", help="the hooks plant to float32 rounding (engine.planted)")
    args = parser.parse_args(argv)
    with open(project_root() / "data" / "findings" / f"{args.model}.toml", "rb") as f:
        atlas_concepts = tomllib.load(f)["11"]["concepts"]
    handle = load_model(args.model, dtype=args.dtype)
    table = planted_check(handle, atlas_concepts[:args.concepts], args.scales, n_random=args.n_random,
                          results_dir=project_root() / "figures" / args.model / "results")
    text = planted_markdown(table, args.model)
    print(text)
    replace_block(project_root() / "docs" / "verdicts.md", "planted", text)


if __name__ == "__main__":
    main()
