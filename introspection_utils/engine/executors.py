"""Where a sweep's units run: here in order (``"local"``) or on the actors of a Ray cluster (``"ray"``);
:func:`introspection_utils.experiments.sweeps.run_sweep` calls it."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from introspection_utils.models.handle import load_model

if TYPE_CHECKING:
    from introspection_utils.models.handle import ModelHandle

EXECUTORS = ("local", "ray")
MAX_ATTEMPTS = 2  # a unit that fails this many times is reported, not retried again

Work = Callable[["ModelHandle", Any], Any]


class UnitsFailed(RuntimeError):
    """Units that failed :data:`MAX_ATTEMPTS` times (or were left when no actor could run them): ``labels`` names
    each unit's trials, ``errors`` the last error of each; the units that succeeded were delivered (and written)."""

    def __init__(self, labels: Sequence[str], errors: Sequence[str]) -> None:
        self.labels, self.errors = list(labels), list(errors)
        lines = [f"- {label}: {error}" for label, error in zip(self.labels, self.errors, strict=True)]
        super().__init__(f"{len(self.labels)} unit(s) failed after {MAX_ATTEMPTS} attempts (their results are "
                         f"missing; the others were written, so a rerun computes only these):\n" + "\n".join(lines))


@dataclass(frozen=True)
class ModelRecipe:
    """How to load, in another process, the model a handle holds: ``load_model(source, dtype=, attn=)``, checked
    against the handle's ``name`` and ``revision`` (different weights on a node are refused, not measured)."""

    source: str
    name: str
    revision: str
    dtype: str
    attn: str

    @classmethod
    def of(cls, handle: ModelHandle) -> ModelRecipe:
        if handle.remote:
            raise ValueError(f"{handle.name} runs remotely (remote={handle.remote!r}): NDIF spreads its traces "
                             f"itself; use executor='local' with a remote handle")
        attn = getattr(handle.torch_model.config, "_attn_implementation", None) or "eager"
        return cls(handle.source, handle.name, handle.revision, str(handle.dtype).removeprefix("torch."), attn)

    def load(self, *, device_map: str | None = None) -> ModelHandle:
        handle = load_model(self.source, dtype=self.dtype, attn=self.attn, device_map=device_map)
        if (handle.name, handle.revision) != (self.name, self.revision):
            raise ValueError(f"{self.source!r} loaded here as {handle.name} revision {handle.revision[:24]!r}, but "
                             f"the driver's handle is {self.name} revision {self.revision[:24]!r}: this node has "
                             f"different weights")
        return handle


def _check_labels(payloads: Sequence[Any], labels: Sequence[str]) -> None:
    if len(labels) != len(payloads):
        raise ValueError(f"give one label per unit: {len(payloads)} payloads, {len(labels)} labels")


class LocalExecutor:
    """Every unit here, in order, on the caller's handle (today's behaviour; an error stops the sweep at once)."""

    name = "local"

    def map(self, handle: ModelHandle, work: Work, payloads: Sequence[Any], *, labels: Sequence[str]
            ) -> Iterator[tuple[int, Any]]:
        _check_labels(payloads, labels)
        for index, payload in enumerate(payloads):
            yield index, work(handle, payload)

    def close(self) -> None:
        pass


class _Worker:
    """The actor: loads the model once and runs work functions on it (made a Ray actor class by
    :meth:`RayExecutor._spawn`; Ray sets its ``CUDA_VISIBLE_DEVICES`` and ``OMP_NUM_THREADS``)."""

    def __init__(self, recipe: ModelRecipe, device_map: str | None) -> None:
        self.handle = recipe.load(device_map=device_map)

    def info(self) -> dict:
        return {"pid": os.getpid(), "device": str(self.handle.device), "threads": torch.get_num_threads(),
                "revision": self.handle.revision}

    def run(self, work: Work, payload: Any) -> Any:
        return work(self.handle, payload)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ImportError("executor='ray' needs Ray: pip install -e '.[ray]' (or pip install 'ray>=2.60,<3')"
                          ) from err
    return ray


class RayExecutor:
    """Units on Ray actors. ``address``: a running cluster (``"auto"``, ``"HOST:PORT"``), or ``None`` for the
    cluster this process is already connected to, else a new local one (all of this machine's CPUs and GPUs).

    ``actors``: how many (default: the cluster's GPUs ÷ ``gpus_per_actor``, or its CPUs ÷ ``cpus_per_actor`` when it
    has no GPU; never more than there are units). Each actor reserves ``cpus_per_actor`` CPUs (its torch threads) and,
    on a GPU cluster, ``gpus_per_actor`` GPUs (over 1: the model is sharded over them, ``device_map="auto"``).
    ``restarts``: how many dead actors may be replaced in one run (default: one per actor). ``runtime_env``: Ray's,
    for the actors (e.g. ``{"py_modules": [...]}`` where the nodes lack this package). ``start_timeout``: seconds
    for the actors to be placed and to load the model before the run is refused (a cluster without room for them).

    The actors are kept between runs on the same model (several sweeps load the model once per actor) until
    :meth:`close` (or the end of a ``with`` block); ``executor="ray"`` in a sweep makes one and closes it.
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, actors: int | None = None, cpus_per_actor: float = 1,
                 gpus_per_actor: float = 1, restarts: int | None = None, runtime_env: dict | None = None,
                 start_timeout: float = 900) -> None:
        if actors is not None and (isinstance(actors, bool) or not isinstance(actors, int) or actors < 1):
            raise ValueError(f"actors must be a positive integer or None, got {actors!r}")
        for label, value in (("cpus_per_actor", cpus_per_actor), ("gpus_per_actor", gpus_per_actor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{label} must be a positive number, got {value!r}")
        if restarts is not None and (isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0):
            raise ValueError(f"restarts must be a non-negative integer or None, got {restarts!r}")
        self.address, self.n_actors, self.restarts = address, actors, restarts
        self.cpus_per_actor, self.gpus_per_actor, self.runtime_env = cpus_per_actor, gpus_per_actor, runtime_env
        self.start_timeout = start_timeout
        self._recipe: ModelRecipe | None = None
        self._actors: list[Any] = []
        self._cls: Any = None
        self._pids: dict[int, int] = {}  # id(actor handle) -> process id, for the actors started and checked by _pool
        self.stats: dict[str, Any] = {}  # the last run: actors, units, failures (unit index, error), replaced actors

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the actors (the GPU memory they hold is freed); the cluster itself is left running."""
        if self._actors:
            ray = _import_ray()
            for actor in self._actors:
                ray.kill(actor)
        self._actors, self._pids, self._recipe = [], {}, None

    @property
    def pids(self) -> list[int]:
        """The process ids of the live actors started before the current run (what a fault test kills)."""
        return list(self._pids.values())

    def _connect(self, ray: Any) -> None:
        if not ray.is_initialized():
            ray.init(address=self.address)

    def _options(self, ray: Any) -> dict:
        gpus = ray.cluster_resources().get("GPU", 0)
        options = {"num_cpus": self.cpus_per_actor, "num_gpus": self.gpus_per_actor if gpus else 0}
        if self.runtime_env is not None:
            options["runtime_env"] = self.runtime_env
        return options

    def _wanted(self, ray: Any, n_units: int) -> int:
        resources = ray.available_resources()  # what other jobs (or this executor's own actors) leave free
        gpus = ray.cluster_resources().get("GPU", 0)
        if self._actors:  # this executor's actors hold their share already
            resources = {"GPU": resources.get("GPU", 0) + len(self._actors) * (self.gpus_per_actor if gpus else 0),
                         "CPU": resources.get("CPU", 0) + len(self._actors) * self.cpus_per_actor}
        if self.n_actors is not None:
            n = self.n_actors
        elif gpus:
            n = int(resources.get("GPU", 0) // self.gpus_per_actor)
        else:
            n = int(resources.get("CPU", 1) // self.cpus_per_actor)
        return max(1, min(n, n_units))

    def _spawn(self, ray: Any, recipe: ModelRecipe) -> Any:
        device_map = "auto" if self.gpus_per_actor > 1 and ray.cluster_resources().get("GPU", 0) else None
        if self._cls is None:
            self._cls = ray.remote(_Worker)
        return self._cls.options(**self._options(ray)).remote(recipe, device_map)

    def _pool(self, ray: Any, handle: ModelHandle, n_units: int) -> list[Any]:
        """The actors for ``handle``'s model, started (and their model checked) before any unit is handed out."""
        recipe = ModelRecipe.of(handle)
        if recipe != self._recipe:
            self.close()
            self._recipe = recipe
        wanted = self._wanted(ray, n_units)
        self._actors += [self._spawn(ray, recipe) for _ in range(wanted - len(self._actors))]
        try:
            infos = ray.get([a.info.remote() for a in self._actors], timeout=self.start_timeout)
        except ray.exceptions.GetTimeoutError as err:
            options = self._options(ray)
            self.close()
            raise RuntimeError(f"{wanted} Ray actor(s) of {options['num_cpus']} CPU(s) and {options['num_gpus']} "
                               f"GPU(s) each were not ready within {self.start_timeout:g} s (loading "
                               f"{recipe.source!r}); the cluster has {ray.available_resources()} free of "
                               f"{ray.cluster_resources()}: ask for fewer actors, or free the cluster") from err
        except ray.exceptions.RayError as err:
            self.close()
            raise RuntimeError(f"a Ray actor could not load {recipe.source!r} ({recipe.dtype}): {err}") from err
        self._pids = {id(a): i["pid"] for a, i in zip(self._actors, infos, strict=True)}
        return list(self._actors)

    def map(self, handle: ModelHandle, work: Work, payloads: Sequence[Any], *, labels: Sequence[str]
            ) -> Iterator[tuple[int, Any]]:
        _check_labels(payloads, labels)
        if not payloads:
            return
        ray = _import_ray()
        self._connect(ray)
        idle = deque(self._pool(ray, handle, len(payloads)))
        queue = deque(range(len(payloads)))
        running: dict[Any, tuple[int, Any]] = {}
        attempts = [0] * len(payloads)
        tried_on: list[set] = [set() for _ in payloads]
        last_error: dict[int, str] = {}
        failed: list[int] = []
        restarts = len(idle) if self.restarts is None else self.restarts
        self.stats = {"actors": len(idle), "units": len(payloads), "failures": [], "replaced": 0}
        while queue or running:
            while queue and idle:
                index = queue.popleft()
                # another actor than the one(s) it failed on, when there is one
                pick = next((a for a in idle if id(a) not in tried_on[index]), idle[0])
                idle.remove(pick)
                running[pick.run.remote(work, payloads[index])] = (index, pick)
            if not running:  # units left and no actor to run them
                failed += queue
                for index in queue:
                    last_error.setdefault(index, "no live actor was left to run it")
                break
            done, _ = ray.wait(list(running), num_returns=1)
            index, actor = running.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayActorError as err:  # the actor died: replace it while the budget lasts
                error = f"actor died ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
                self._drop(actor)
                if self.stats["replaced"] < restarts:
                    self.stats["replaced"] += 1
                    fresh = self._spawn(ray, self._recipe)
                    self._actors.append(fresh)
                    idle.append(fresh)
            except ray.exceptions.RayError as err:  # the work raised: the actor lives on
                error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
                idle.append(actor)
            else:
                idle.append(actor)
                yield index, result
                continue
            attempts[index] += 1
            tried_on[index].add(id(actor))
            last_error[index] = error
            self.stats["failures"].append((index, error))
            if attempts[index] >= MAX_ATTEMPTS:
                failed.append(index)
            else:
                queue.appendleft(index)
        if failed:
            failed.sort()
            raise UnitsFailed([labels[i] for i in failed], [last_error[i] for i in failed])

    def _drop(self, actor: Any) -> None:
        self._actors = [a for a in self._actors if a is not actor]
        self._pids.pop(id(actor), None)


def executor_for(executor: str | LocalExecutor | RayExecutor, address: str | None = None
                 ) -> tuple[LocalExecutor | RayExecutor, bool]:
    """The executor a sweep runs on and whether the sweep owns it (closes it at the end): ``"local"``, ``"ray"``
    (a :class:`RayExecutor` on ``address``) or an executor object (kept open: the caller closes it)."""
    if isinstance(executor, (LocalExecutor, RayExecutor)):
        if address is not None:
            raise ValueError("address goes to RayExecutor(address=...) when an executor object is given")
        return executor, False
    if executor == "local":
        if address is not None:
            raise ValueError(f"address={address!r} needs executor='ray' (executor is 'local')")
        return LocalExecutor(), True
    if executor == "ray":
        _import_ray()  # fail before any compute when the extra is missing
        return RayExecutor(address), True
    raise ValueError(f"unknown executor {executor!r}; use one of {', '.join(map(repr, EXECUTORS))} or a "
                     f"RayExecutor(...)")
