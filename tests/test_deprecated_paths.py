"""The module paths the house renamed keep working for one release: each old path gives the same object as its new
home, with a DeprecationWarning that names the new path."""

from __future__ import annotations

import importlib

import pytest

MOVED = {  # old module -> (a name it had, its new module)
    "engine.inject": ("measure", "engine.measure"),
    "engine.injection": ("traced_pass", "engine.traced_pass"),
    "stats.terms": ("statistic_weights", "stats.definitions"),
    "stats.calibration": ("SCENARIOS", "stats.synthetic_calibration"),
    "experiments.task_common": ("label_token_ids", "experiments.tasks.common"),
    "experiments.task_forced_choice": ("run_forced_choice", "experiments.tasks.forced_choice"),
    "experiments.task_congruence": ("run_congruence", "experiments.tasks.congruence"),
    "experiments.task_strength": ("run_strength_comparison", "experiments.tasks.strength"),
    "experiments.tasks": ("describe_forced_choice", "experiments.tasks.forced_choice"),
    "plotting.series": ("save_figure", "plotting.saving"),
    "plotting.style": ("save_figure", "plotting.saving"),  # a name that left a module that stays
    "apps.run": ("main", "apps.runner.cli"),
    "apps.run_checks": ("plan_runs", "apps.runner.checks"),
    "apps.run_execute": ("run_notebooks", "apps.runner.execute"),
    "apps.run_findings": ("run_findings", "apps.runner.findings"),
    "apps.side_by_side": ("KernelPool", "apps.runner.kernels"),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_gives_the_new_object_with_a_warning_naming_it(old):
    name, new = MOVED[old]
    shim = importlib.import_module(f"introspection_utils.{old}")
    with pytest.warns(DeprecationWarning, match=rf"introspection_utils\.{new}\.{name}"):
        value = getattr(shim, name)
    assert value is getattr(importlib.import_module(f"introspection_utils.{new}"), name)


def test_an_unknown_name_on_an_old_path_says_where_the_module_went():
    shim = importlib.import_module("introspection_utils.engine.inject")
    with pytest.raises(AttributeError, match="engine.measure"):
        shim.no_such_name  # noqa: B018


def test_a_sub_package_gives_its_own_modules_without_a_warning(recwarn):
    from introspection_utils.experiments import tasks
    from introspection_utils.experiments.tasks import forced_choice

    assert tasks.forced_choice is forced_choice
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]
