"""The executor seam: sweeps run here or on Ray actors, with the same numbers, and faults lose nothing.

The Ray part runs for real: a local cluster of 2 CPU workers on the embedded model, inside a private network
namespace that holds only loopback (``unshare --net``, then ``ip link set lo up``; root only), so that Ray's daemons
listen on 127.0.0.1 alone and its probe for an outside address finds nothing. It skips, saying why, where such a
namespace cannot be made or Ray is not installed (``pip install -e ".[ray]"``; ``make test`` installs it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from introspection_utils.engine.executors import LocalExecutor, ModelRecipe, RayExecutor, UnitsFailed, executor_for
from introspection_utils.experiments.sweeps import SweepSpec, run_sweep

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = Path(__file__).with_name("ray_scenario.py")


def test_executor_for_names_what_is_allowed():
    runner, owned = executor_for("local")
    assert isinstance(runner, LocalExecutor) and owned
    with pytest.raises(ValueError, match="unknown executor 'dask'.*'local', 'ray'"):
        executor_for("dask")
    with pytest.raises(ValueError, match="address='auto' needs executor='ray'"):
        executor_for("local", "auto")
    given = RayExecutor(actors=2)
    assert executor_for(given) == (given, False)  # an executor object stays open for the caller
    with pytest.raises(ValueError, match="actors must be a positive integer"):
        RayExecutor(actors=0)
    with pytest.raises(ValueError, match="cpus_per_actor must be a positive number"):
        RayExecutor(cpus_per_actor=-1)


def test_a_bad_executor_is_refused_before_any_compute(tiny_llama):
    spec = SweepSpec(concepts=("Sandwich",), scales=(1.0,), layers=(1,), controls=())
    with pytest.raises(ValueError, match="unknown executor"):
        run_sweep(tiny_llama, spec, executor="threads", progress=False)


def test_units_failed_names_every_failed_unit_and_its_error():
    err = UnitsFailed(["question 3 (control: 'Is water wet?'): 12 trials"], ["actor died (ActorDiedError: ...)"])
    assert "1 unit(s) failed after 2 attempts" in str(err)
    assert "- question 3 (control: 'Is water wet?'): 12 trials: actor died" in str(err)


def test_local_executor_yields_every_unit_in_order(tiny_llama):
    got = list(LocalExecutor().map(tiny_llama, lambda h, p: (h.name, p * 2), [1, 2, 3], labels=["a", "b", "c"]))
    assert got == [(0, (tiny_llama.name, 2)), (1, (tiny_llama.name, 4)), (2, (tiny_llama.name, 6))]
    with pytest.raises(ValueError, match="one label per unit: 3 payloads, 1 labels"):
        list(LocalExecutor().map(tiny_llama, lambda h, p: p, [1, 2, 3], labels=["a"]))


def test_model_recipe_reloads_the_same_model_and_refuses_other_weights(tiny_llama):
    recipe = ModelRecipe.of(tiny_llama)
    assert (recipe.source, recipe.dtype, recipe.attn) == ("tiny-llama", "float32", "eager")
    again = recipe.load()
    assert (again.name, again.revision, again.dtype) == (tiny_llama.name, tiny_llama.revision, tiny_llama.dtype)
    other = ModelRecipe(recipe.source, recipe.name, "another-revision", recipe.dtype, recipe.attn)
    with pytest.raises(ValueError, match="different weights"):
        other.load()


def _namespace_problem() -> str | None:
    """Why a private loopback-only network namespace cannot be made here (None when it can)."""
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install -e '.[ray]'; make test installs it)"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "a private network namespace (unshare --net) needs root here"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip (util-linux, iproute2) is missing"
    probe = subprocess.run(["unshare", "--net", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare --net failed: {probe.stderr.strip()[:200]}"
    return None


@pytest.fixture(scope="module")
def ray_report(tmp_path_factory, smollm):
    """Run tests/ray_scenario.py in a loopback-only network namespace; its measured report."""
    problem = _namespace_problem()
    if problem:
        pytest.skip(problem)
    out = tmp_path_factory.mktemp("ray")
    # jupyter's jsonschema extra pulls rfc3987-syntax, whose import builds Earley parsers for seconds in every Ray
    # process (daemons and workers); Ray does not use it, so the scenario's processes do without it.
    stub = out / "stub" / "rfc3987_syntax"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('rfc3987_syntax is left out of the Ray test processes')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stub.parent), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(out),
           # no idle workers started ahead (they would compete with the daemons' start); a slower start tolerated;
           # actors at the driver's priority (Ray starts workers niced: on a CPU shared with other jobs they crawl)
           "RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0",
           "RAY_raylet_start_wait_time_s": "60", "RAY_worker_niceness": "0"}
    command = f"ip link set lo up && exec {sys.executable} {SCENARIO} {out}"
    start = time.perf_counter()
    run = subprocess.run(["unshare", "--net", "sh", "-c", command], env=env, capture_output=True, text=True,
                         timeout=900)
    wall = time.perf_counter() - start
    assert run.returncode == 0, f"the Ray scenario failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    report = json.loads((out / "report.json").read_text())
    report["seconds"]["wall_with_python_start"] = wall
    print("Ray scenario seconds:", json.dumps({k: round(v, 1) for k, v in report["seconds"].items()}))
    report["out"] = out
    return report


@pytest.mark.integration
def test_ray_cluster_talks_on_loopback_only(ray_report):
    assert ray_report["node_ips"] == ["127.0.0.1"]


@pytest.mark.integration
def test_a_ray_sweep_equals_the_local_sweep_bitwise_on_two_actors_and_on_one(ray_report):
    assert ray_report["units"] == 9  # the introspection wording + 8 controls
    assert ray_report["actors_two"] == 2 and ray_report["actors_one"] == 1
    assert ray_report["equal_two"], "2 actors: the saved table or its metadata differs from the local run"
    assert ray_report["equal_two_warm"], "2 warm actors (a second sweep): the table differs from the local run"
    assert ray_report["equal_one"], "1 actor: the saved table or its metadata differs from the local run"
    local = pd.read_csv(ray_report["out"] / "local" / "sweep.csv")
    assert len(local) == 9 * 2 * 6 and local["logit_diff"].notna().all()  # 9 questions × 2 vectors × 6 scales


@pytest.mark.integration
def test_an_actor_killed_mid_sweep_loses_nothing(ray_report):
    killed = ray_report["killed"]
    assert killed["chunks_then"] >= 1
    assert killed["failures"], "the kill was not seen: no unit failed"
    assert all("actor died" in error for _, error in killed["failures"])
    assert killed["replaced"] == 1 and killed["pid"] not in killed["pids_after"]
    assert ray_report["equal_killed"], "after the kill the table differs from the local run"


@pytest.mark.integration
def test_a_unit_that_fails_twice_is_reported_with_its_trials_named(ray_report):
    failed = ray_report["failed_twice"]
    assert failed["labels"] == ["unit 2 (trials 2a, 2b)"]
    assert "unit 2 fails on purpose" in failed["errors"][0]
    assert "unit 2 (trials 2a, 2b)" in failed["message"]
    assert [index for index, *_ in ray_report["delivered"]] == [0, 1, 3]  # the others were delivered
    assert [index for index, _ in ray_report["failures_fail_twice"]] == [2, 2]  # tried twice, not more


@pytest.mark.integration
def test_a_driver_killed_mid_sweep_resumes_from_the_chunks_written(ray_report):
    child, resume = ray_report["child"], ray_report["resume"]
    assert child["returncode"] != 0 and 2 <= child["chunks_when_killed"] < 9, child["log_tail"]
    assert resume["units_run"] == 9 - child["chunks_when_killed"]  # only the missing questions ran again
    assert resume["kept_untouched"] and resume["chunks_after"] == 9
    assert ray_report["equal_resumed"], "the resumed table differs from the local run"


def test_the_runner_passes_the_executor_to_the_notebooks_that_declare_it():
    from introspection_utils.apps.runner import cli as run

    params = {"model": "tiny-llama", "executor": "ray", "ray_address": "auto"}
    plans = dict(run.plan_runs(run.notebooks(["02", "03", "04", "11"]), params, where_declared=run.RUNNER_PLACED))
    by_prefix = {path.name[:2]: p for path, p in plans.items()}
    for prefix in ("02", "03", "11"):
        assert (by_prefix[prefix]["executor"], by_prefix[prefix]["ray_address"]) == ("ray", "auto")
    assert "executor" not in by_prefix["04"]  # 04 reads the saved sweep: nothing to spread
    plans = dict(run.plan_runs(run.notebooks(["04"]), params, where_declared=run.RUNNER_PLACED))
    assert "executor" not in next(iter(plans.values()))  # a selection without 02/03/11 is not an error
    with pytest.raises(SystemExit):
        run.main(["--notebooks", "02", "--address", "auto"])  # --address needs --executor ray
