"""Notebooks side by side: the runner's ``--jobs N`` executes up to N notebooks at once, each in its own kernel.

Why: on a small CPU most of a demo-sized notebook is start-up (a kernel, ~7 s of imports, loading the model) and
work that one thread cannot keep two cores busy with, so two one-thread kernels finish the series in about half the
wall time of one two-thread kernel. A one-thread kernel also computes the same floats whatever else is running, so
the committed demo figures are the same run to run.

Order: notebooks start in series order; a notebook that reads what another saves (:data:`AFTER`) starts only after
that one finished. The first failure starts nothing new; the notebooks already running finish, then the failure is
raised. Ctrl-C interrupts every running kernel (SIGINT to this process's children) and raises ``KeyboardInterrupt``
with the names that were running in ``err.running``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

T = TypeVar("T")

# A notebook prefix → the prefixes whose saved tables it reads. 04 reads the scale sweep 02 saved (same grid): run
# side by side it would compute the sweep again.
AFTER: dict[str, tuple[str, ...]] = {"04": ("02",)}


def run_side_by_side(tasks: Sequence[tuple[str, Callable[[], T]]], jobs: int, *,
                     on_done: Callable[[str, T], None] | None = None,
                     after: Mapping[str, Sequence[str]] = AFTER) -> list[T]:
    """Call each ``(name, run)`` of ``tasks`` with at most ``jobs`` running at once and return their results in
    ``tasks`` order. ``name`` starts with the notebook's two-digit prefix, which :data:`AFTER` (``after``) is keyed
    by; a prefix waits only for prefixes that are among ``tasks``. ``on_done(name, result)`` is called (in this
    thread) as each finishes, e.g. to write its timing."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    names = [name for name, _ in tasks]
    prefixes = {name[:2] for name in names}
    waits_for = {name: {p for p in after.get(name[:2], ()) if p in prefixes and p != name[:2]} for name in names}
    pending = list(tasks)
    finished: set[str] = set()
    results: dict[str, T] = {}
    running: dict[Future[T], str] = {}
    failure: BaseException | None = None
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="notebook")
    try:
        while pending or running:
            while failure is None and len(running) < jobs:
                ready = next((t for t in pending if waits_for[t[0]] <= {n[:2] for n in finished}), None)
                if ready is None:
                    break
                pending.remove(ready)
                running[pool.submit(ready[1])] = ready[0]
            if not running:
                break  # a failure stopped new starts, or nothing left can start
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                name = running.pop(future)
                error = future.exception()
                if error is not None:
                    failure = failure or error
                    continue
                results[name] = future.result()
                finished.add(name)
                if on_done is not None:
                    on_done(name, results[name])
    except KeyboardInterrupt as err:
        err.running = sorted(running.values())  # type: ignore[attr-defined]
        interrupt_children()
        wait(running, timeout=60)  # the kernels stop at their next Python bytecode
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    if failure is not None:
        raise failure
    return [results[name] for name in names if name in results]


def interrupt_children() -> list[int]:
    """Send SIGINT to this process's child processes (the kernels papermill started, which a Ctrl-C in a terminal
    reaches but a signal sent to the runner alone does not); returns their pids."""
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():  # field 4 of stat: the parent pid
            pids.append(int(entry))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGINT)
        except OSError:
            pass
    return pids


def default_jobs(model: str, small: Sequence[str], free_cpus: int) -> int:
    """How many notebooks run at once by default: the CPUs free now for a ``small`` model (the 135M/270M embedded
    ones); 1 for any other (two kernels would each load it: twice the memory, and on one GPU twice its weights)."""
    return max(1, free_cpus) if model in small else 1


def describe(jobs: int, threads: Any) -> str:
    """One line for the runner's start: how the series is spread over the CPUs."""
    return (f"{jobs} notebook(s) at a time, {threads} thread(s) per kernel "
            f"(CPUs {os.cpu_count()}; --jobs N / --threads N to choose)")
