"""Figures for the notebook series, by the name the notebooks import them (``plots.save_figure``): one palette for
the conditions, labelled axes with units, a legend, a title that names the model, the concept and the layer, and
:func:`save_figure` writing PNGs under ``figures/<model>/``.

The figures live by kind — :mod:`.style` (palette, labels, layout, :func:`save_figure`), :mod:`.curves` (sweeps,
lens, attention, vectors; the conditions and their colours are described there, once), :mod:`.summaries`
(localization, atlas, detection rates), :mod:`.refusal` (with and without the refusal ablation) — and every name the
notebooks use is importable from here.
"""

from __future__ import annotations

from introspection_utils.core.paths import figures_dir, project_root, results_dir
from introspection_utils.plotting.curves import (
    lens_panels,
    plot_attention_maps,
    plot_cosine_matrix,
    plot_layer_sweep,
    plot_logit_lens,
    plot_scale_sweep,
    plot_vector_norms,
    sweep_panels,
)
from introspection_utils.plotting.refusal import ablation_panels, plot_ablation_comparison, plot_refusal_layers
from introspection_utils.plotting.style import (
    CLASS_COLORS,
    FIGURE_FORMATS,
    LENS_XLABEL,
    LENS_YLABEL,
    LOCALIZATION_COLORS,
    PALETTE,
    RANDOM_ALPHA,
    STABLE_STEPS,
    YLABEL,
    legend_labels,
    plot_grid,
    save_figure,
    scale_label,
    stabilise,
)
from introspection_utils.plotting.summaries import plot_atlas, plot_detection_rates, plot_localization

__all__ = ["PALETTE", "RANDOM_ALPHA", "YLABEL", "LENS_XLABEL", "LENS_YLABEL", "STABLE_STEPS", "LOCALIZATION_COLORS",
           "CLASS_COLORS", "project_root", "figures_dir", "results_dir", "save_figure", "stabilise", "FIGURE_FORMATS",
           "plot_scale_sweep", "plot_layer_sweep", "plot_logit_lens", "plot_attention_maps", "plot_vector_norms",
           "plot_cosine_matrix", "sweep_panels", "lens_panels", "plot_grid", "legend_labels", "scale_label",
           "plot_localization", "plot_atlas", "plot_detection_rates", "plot_refusal_layers",
           "plot_ablation_comparison", "ablation_panels"]
