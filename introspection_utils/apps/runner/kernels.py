"""Notebooks side by side, each in its own warm one-thread kernel (the runner's ``--jobs N``); why, and how a kernel
is reused, is in ``docs/design.md`` ("Module notes")."""

from __future__ import annotations

import json
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


_FRESH: dict[str, Any] = {}  # in a warm kernel: its state just after start-up (remember_fresh_state)


def remember_fresh_state() -> None:
    """Run in a warm kernel at start-up (its ``exec_lines``): import what every notebook imports (so the next
    notebooks find it loaded) and keep matplotlib's settings and torch's global random state as they are now."""
    import matplotlib.pyplot  # noqa: F401  (the kernel's inline backend sets its rcParams on this import)
    import torch

    import introspection_utils  # noqa: F401
    import introspection_utils.models.handle  # noqa: F401  (torch, transformers, nnsight)

    _FRESH.update(rc=dict(matplotlib.rcParams), torch_rng=torch.get_rng_state())


def restore_fresh_state() -> None:
    """Run in a warm kernel between notebooks, after ``%reset -f``: figures closed, matplotlib's settings and
    torch's global random state back to :func:`remember_fresh_state`'s, the execution count at 1."""
    import warnings

    import matplotlib
    import matplotlib.pyplot as plt
    import torch
    from IPython import get_ipython

    plt.close("all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few rcParams are deprecated aliases: setting them back warns
        matplotlib.rcParams.update(_FRESH["rc"])
    torch.set_rng_state(_FRESH["torch_rng"])
    shell = get_ipython()
    if shell is not None:
        shell.execution_count = 1


RESET = ("get_ipython().run_line_magic('reset', '-f')\n"
         "from introspection_utils.apps.runner.kernels import restore_fresh_state\n"
         "restore_fresh_state()\n"
         "get_ipython().run_line_magic('reset', '-f')\n")


class WarmKernel:
    """A Jupyter kernel kept for several notebooks (papermill's ``km``): started once with ``extra_arguments``
    (plus :func:`remember_fresh_state`) in ``cwd``, :meth:`reset` before each notebook after the first, shut down at
    the end (or after a notebook failed in it)."""

    def __init__(self, kernel_name: str, extra_arguments: Sequence[str], cwd: str) -> None:
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name=kernel_name)
        lines = [a for a in extra_arguments if not a.startswith("--IPKernelApp.exec_lines=")]
        startup = [a for a in extra_arguments if a.startswith("--IPKernelApp.exec_lines=")]
        exec_lines = (json.loads(startup[0].split("=", 1)[1]) if startup else []) + [
            "from introspection_utils.apps.runner.kernels import remember_fresh_state; remember_fresh_state()"]
        self.km.start_kernel(extra_arguments=[*lines, f"--IPKernelApp.exec_lines={json.dumps(exec_lines)}"],
                             cwd=cwd)
        self.used = False

    def reset(self) -> None:
        """Back to how it started (see the module docstring); a kernel that can't be reset raises."""
        client = self.km.client()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=120)
            reply = client.execute_interactive(RESET, timeout=120, store_history=False, output_hook=lambda msg: None)
        finally:
            client.stop_channels()
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"could not reset the kernel: {reply['content'].get('evalue')}")

    def shutdown(self) -> None:
        try:
            self.km.shutdown_kernel(now=True)
        except Exception:  # already gone (a failed notebook, Ctrl-C): nothing left to stop
            pass


class KernelPool:
    """Warm kernels for notebooks run one after another or side by side: a notebook takes an idle one (or a new one,
    started with ``extra_arguments`` in ``cwd``) and gives it back when it succeeded; :meth:`close` shuts all down."""

    def __init__(self, kernel_name: str, extra_arguments: Sequence[str], cwd: str) -> None:
        import threading

        self.kernel_name, self.extra_arguments, self.cwd = kernel_name, list(extra_arguments), cwd
        self.idle: list[WarmKernel] = []
        self.started: list[WarmKernel] = []
        self.lock = threading.Lock()

    def prestart(self, n: int) -> None:
        """Start ``n`` kernels now (their start-up imports run while the caller goes on)."""
        for _ in range(n):
            warm = WarmKernel(self.kernel_name, self.extra_arguments, self.cwd)
            with self.lock:
                self.started.append(warm)
                self.idle.append(warm)

    def take(self) -> WarmKernel:
        with self.lock:
            if self.idle:
                return self.idle.pop()
        warm = WarmKernel(self.kernel_name, self.extra_arguments, self.cwd)
        with self.lock:
            self.started.append(warm)
        return warm

    def give_back(self, warm: WarmKernel) -> None:
        with self.lock:
            self.idle.append(warm)

    def close(self) -> None:
        for warm in self.started:
            warm.shutdown()


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
