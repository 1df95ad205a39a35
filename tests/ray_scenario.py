"""The Ray scenario behind tests/test_executors.py, run inside a private network namespace holding only loopback.

    python tests/ray_scenario.py OUT_DIR                     # the whole scenario; writes OUT_DIR/report.json
    python tests/ray_scenario.py --child ADDRESS RESULTS_DIR # a driver that the scenario kills mid-sweep

On a local Ray cluster of 2 CPU workers and the embedded model (SmolLM2-135M, float32): a local sweep; the same sweep
on 2 Ray actors and on 1; on 2 actors with one actor killed (SIGKILL of its process) mid-sweep; a unit that fails
twice; a driver (a child process) killed after some chunks, then the sweep resumed. Every number it reports is
measured here; the test asserts on them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
CONCEPTS = ["Sandwich"]
SCALES = [0, 2, 4, 8, 12, 16]
N_CONTROLS = 8  # 9 questions (units): the paper's introspection wording and 8 controls
LAYER = 20


def sweep(handle, bank, results_dir, **kwargs):
    from introspection_utils.engine.prompts import introspection_questions
    from introspection_utils.experiments.sweeps import SweepSpec, scale_sweep

    spec = SweepSpec.build(CONCEPTS, SCALES, [LAYER], n_controls=N_CONTROLS, n_random=1,
                           introspection=introspection_questions(["paper"]))
    return scale_sweep(handle, spec, bank=bank, results_dir=results_dir, name="sweep", progress=False, **kwargs)


def fail_on_two(handle, payload):
    """A work function whose unit 2 always raises (the other units return their payload and the model's name)."""
    if payload == 2:
        raise RuntimeError("unit 2 fails on purpose")
    return payload, handle.name


def chunks(results_dir: Path) -> list[Path]:
    return sorted(results_dir.glob(".chunks/*/*.csv"))


def same_table(a: Path, b: Path) -> bool:
    """The two saved tables are byte-identical and their metadata equal but for the creation time."""
    meta = [json.loads(p.with_suffix(".meta.json").read_text()) for p in (a, b)]
    for m in meta:
        m.pop("created")
    return a.read_bytes() == b.read_bytes() and meta[0] == meta[1]


def child(address: str, results_dir: str) -> None:
    """A driver on the running cluster (``executor="ray"``, ``address``), to be killed mid-sweep."""
    import ray

    from introspection_utils import load_model
    from introspection_utils.engine.vectors import concept_vectors

    ray.init(address=address, log_to_driver=False)
    handle = load_model(MODEL)
    sweep(handle, concept_vectors(handle, CONCEPTS, progress=False), Path(results_dir), executor="ray",
          address=address)


def scenario(out: Path) -> dict:
    import ray

    from introspection_utils import load_model
    from introspection_utils.engine.executors import RayExecutor, UnitsFailed
    from introspection_utils.engine.vectors import concept_vectors

    report: dict = {"seconds": {}}
    start = time.perf_counter()
    temp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths live under it (a 107-character limit)
    for attempt in range(3):  # on a CPU shared with other jobs the daemons can miss Ray's 30 s start deadline
        try:
            ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1", _temp_dir=temp)
            break
        except Exception as err:  # Ray raises a bare Exception for a node that did not start in time
            ray.shutdown()
            report.setdefault("start_failures", []).append(str(err)[:200])
            if attempt == 2:
                raise
    report["seconds"]["cluster_start"] = time.perf_counter() - start
    report["node_ips"] = sorted({n["NodeManagerAddress"] for n in ray.nodes()})
    try:
        handle = load_model(MODEL)
        bank = concept_vectors(handle, CONCEPTS, progress=False)

        def timed(label, fn):
            t = time.perf_counter()
            value = fn()
            report["seconds"][label] = time.perf_counter() - t
            return value

        timed("local", lambda: sweep(handle, bank, out / "local"))
        reference = out / "local" / "sweep.csv"
        report["units"] = len(chunks(out / "local"))

        with RayExecutor(actors=1) as one:  # closed before the 2-actor pool takes both CPUs
            timed("ray_1_actor_first", lambda: sweep(handle, bank, out / "ray1", executor=one))
            timed("ray_1_actor_warm", lambda: sweep(handle, bank, out / "ray1warm", executor=one))
            report["actors_one"] = one.stats["actors"]
            report["equal_one"] = same_table(reference, out / "ray1" / "sweep.csv")
        with RayExecutor(actors=2) as two:
            timed("ray_2_actors_first", lambda: sweep(handle, bank, out / "ray2", executor=two))
            report["actors_two"] = two.stats["actors"]
            report["equal_two"] = same_table(reference, out / "ray2" / "sweep.csv")
            timed("ray_2_actors_warm", lambda: sweep(handle, bank, out / "ray2warm", executor=two))
            report["equal_two_warm"] = same_table(reference, out / "ray2warm" / "sweep.csv")

            # An actor killed (SIGKILL of its process) as soon as the first unit is written.
            victim = two.pids[0]
            killed: dict = {}

            def kill_after_first_chunk():
                while not chunks(out / "kill"):
                    time.sleep(0.01)
                killed["chunks_then"] = len(chunks(out / "kill"))
                os.kill(victim, signal.SIGKILL)

            killer = threading.Thread(target=kill_after_first_chunk, daemon=True)
            killer.start()
            timed("ray_actor_killed", lambda: sweep(handle, bank, out / "kill", executor=two))
            killer.join(timeout=5)
            report["killed"] = {"pid": victim, **killed, "failures": two.stats["failures"],
                                "replaced": two.stats["replaced"], "pids_after": two.pids}
            report["equal_killed"] = same_table(reference, out / "kill" / "sweep.csv")

            # A unit that fails twice is reported with its trials named; the others are delivered.
            labels = [f"unit {i} (trials {i}a, {i}b)" for i in range(4)]
            delivered = []
            try:
                for index, result in two.map(handle, fail_on_two, list(range(4)), labels=labels):
                    delivered.append([index, *result])
            except UnitsFailed as err:
                report["failed_twice"] = {"labels": err.labels, "errors": err.errors, "message": str(err)}
            report["delivered"] = sorted(delivered)
            report["failures_fail_twice"] = two.stats["failures"]

            # A driver killed after two chunks (this driver's actors closed first: the child's take both CPUs),
            # then the sweep resumed by this driver on fresh actors.
            two.close()
            resumed = out / "resume"
            address = ray.get_runtime_context().gcs_address
            log = open(out / "child.log", "w")  # closed below, after the child is killed
            t = time.perf_counter()
            proc = subprocess.Popen([sys.executable, __file__, "--child", address, str(resumed)], stdout=log,
                                    stderr=subprocess.STDOUT)
            while len(chunks(resumed)) < 2 and proc.poll() is None and time.perf_counter() - t < 240:
                time.sleep(0.01)
            proc.kill()
            proc.wait()
            log.close()
            report["seconds"]["child_until_killed"] = time.perf_counter() - t
            before = {p.name: p.stat().st_mtime_ns for p in chunks(resumed)}
            report["child"] = {"returncode": proc.returncode, "chunks_when_killed": len(before),
                               "log_tail": (out / "child.log").read_text()[-2000:]}
            timed("resume", lambda: sweep(handle, bank, resumed, executor=two))  # new actors, once the child's go
            after = {p.name: p.stat().st_mtime_ns for p in chunks(resumed)}
            report["resume"] = {"units_run": two.stats["units"], "chunks_before": len(before),
                                "chunks_after": len(after),
                                "kept_untouched": all(after.get(k) == v for k, v in before.items())}
            report["equal_resumed"] = same_table(reference, resumed / "sweep.csv")
    finally:
        t = time.perf_counter()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        report["seconds"]["shutdown"] = time.perf_counter() - t
    report["seconds"]["total"] = time.perf_counter() - start
    return report


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2])
        return 0
    out = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="ray-scenario-"))
    report = scenario(out)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report["seconds"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
