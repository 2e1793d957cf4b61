"""Sweeps sharded over a Ray cluster (``executor="ray"``; ``pip install actpatch[ray]``).

The driver (the process that called :func:`actpatch.sweep`) keeps the experiment: it runs each
length group's baselines and writes the result. Workers are Ray actors, one per CPU slot (or
one per GPU, with ``num_gpus=1``, when the cluster has GPUs). Each actor rebuilds the model
once from its :class:`~actpatch.models.recipe.Recipe` and checks that its weights hash to the
driver's; then, per group, it receives the job without its model, prepares the group itself
and runs the units it is sent.

Results are merged in unit order, so a sweep gives the local executor's numbers bit for bit
when both use the same ``unit_size`` (the same units, hence the same batched arithmetic) and,
on CPUs, workers run as many torch threads as the driver (a CPU matmul may split its sums
differently over a different number of threads: the last bit of a float can differ).
A unit whose actor dies (killed, out of memory, node lost) is sent again to another actor,
and a replacement actor is started; it is counted once, when its values arrive. With a
:class:`~actpatch.experiment.checkpoint.UnitStore` each finished unit is saved as it arrives,
so a killed *driver* resumes like a local run.
"""

from __future__ import annotations

import os
import uuid
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ExecutorError
from .checkpoint import UnitStore
from .units import Advance, Unit, UnitJob, UnitValues, keep_unit, merge, saved_unit, with_model, without_model

if TYPE_CHECKING:  # pragma: no cover
    from ..models.handle import Model
    from ..models.recipe import Recipe
    from .core import GroupRuns

__all__ = ["RayExecutor"]


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ExecutorError("executor='ray' needs Ray: pip install 'actpatch[ray]' (or pip install ray).") from None
    return ray


def _probe(address: str) -> None:
    """A clear error now when nothing listens at ``address`` (``[ray://]host:port``)."""
    import socket

    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(f"Ray address {address!r}: give host:port (e.g. 10.0.0.1:6379), ray://host:10001 or 'auto'.")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ExecutorError(f"No Ray cluster reachable at {address!r} ({e}). Start the head node with "
                            f"`ray start --head --port={port}`, check the address `ray status` prints there, "
                            f"or leave out the address to start a local cluster.") from None


class _Worker:
    """One Ray actor: a model rebuilt from its recipe, and the prepared state of the group it
    works on (one group at a time: a new job or group replaces it)."""

    def __init__(self, recipe: "Recipe", weight_hash: str, threads: int, device: str | None) -> None:
        torch.set_num_threads(max(1, threads))
        self.recipe = recipe if device is None else recipe.on_device(device)
        self.weight_hash = weight_hash
        self.model: Model | None = None
        self.key: tuple[str, int, tuple[int, int] | None] | None = None
        self.job: UnitJob | None = None
        self.state: Any = None

    def setup(self) -> None:
        """Load the model (once) and check it against the driver's."""
        if self.model is None:
            model = self.recipe.build()
            got = model.current_weight_hash()
            if got != self.weight_hash:
                raise ExecutorError(
                    f"The model a worker rebuilt with {self.recipe.describe()} has weights {got}, the driver's "
                    f"{self.weight_hash}: the driver's model was changed after loading, or this node loads other "
                    f"files. Ship only unmodified models, and give every node the same model cache.")
            self.model = model

    def run(self, key: str, job: UnitJob, group: int, unit: Unit) -> UnitValues:
        self.setup()
        if self.key != (key, group, unit.part) or self.job is None:
            self.job, self.state = with_model(job, self.model), None  # the previous group's state freed first
            with self.job.context():
                self.state = self.job.prepare(self.job.experiment.group(group, unit.part))
            self.key = (key, group, unit.part)
        bound = self.job
        with bound.context():
            values = bound.run_unit(self.state, unit)
        return {m: v.detach().cpu() for m, v in values.items()}


class RayExecutor:
    """Run units on Ray actors.

    Args:
        address: a running cluster (``"auto"``, ``"ray://host:10001"`` or ``"host:6379"``);
            default: the cluster this process already joined with ``ray.init``, else the one
            ``RAY_ADDRESS`` names, else a new local one.
        workers: actors to start (default: one per GPU when the cluster has GPUs, else one per
            ``cpus_per_worker`` CPUs).
        cpus_per_worker: CPUs reserved per actor.
        threads: torch threads per actor (default ``cpus_per_worker``; give the driver's
            ``torch.get_num_threads()`` for bit-identical CPU results).
        max_retries: how often one unit may be re-sent after its actor died.
        start_timeout: seconds for the actors to start and load the model before giving up
            (a cluster without free resources would otherwise wait forever).

    Use as a context manager, or call :meth:`close`, to stop the actors; ``executor="ray"``
    makes one per call and closes it. One executor keeps its actors (and their loaded model)
    across the calls it serves; the driver's weights are hashed when the actors start, so edit a
    model in place only before handing it to an executor.

    Example, on a cluster started with ``ray start --head`` (docs/scale.md runs one locally)::

        with ap.experiment.RayExecutor(address="auto") as ex:
            res = ap.sweep(model, prompts, "z", executor=ex)
    """

    def __init__(self, address: str | None = None, *, workers: int | None = None, cpus_per_worker: int = 1,
                 threads: int | None = None, max_retries: int = 3, start_timeout: float = 600.0) -> None:
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ExecutorError(f"workers={workers!r}: give a positive number of Ray actors.")
        if isinstance(cpus_per_worker, bool) or not isinstance(cpus_per_worker, int) or cpus_per_worker < 1:
            raise ExecutorError(f"cpus_per_worker={cpus_per_worker!r}: give a positive number of CPUs.")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ExecutorError(f"threads={threads!r}: give a positive number of torch threads per actor.")
        self.address, self.workers, self.cpus_per_worker, self.max_retries = address, workers, cpus_per_worker, max_retries
        self.threads = threads or cpus_per_worker
        self.start_timeout = float(start_timeout)
        self._actors: list[Any] = []
        self._model_key: tuple[int, str] | None = None
        self._spawn: Any = None
        self.restarts = 0
        """Actors replaced after dying (for tests and logs)."""

    # -- cluster and actors ------------------------------------------------------------------
    def _connect(self) -> Any:
        ray = _ray()
        if ray.is_initialized():
            return ray
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        if address not in (None, "auto"):
            _probe(address)  # Ray itself retries an unreachable address for minutes
        try:
            if address is None:
                ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"at {address!r}" if address else "locally"
            raise ExecutorError(f"Could not start or reach a Ray cluster {where}: {e}\nStart one with "
                                f"`ray start --head` (and `ray start --address=HEAD:6379` on the other nodes), "
                                f"or leave out the address to start a local one.") from None
        return ray

    def _ensure_actors(self, model: "Model") -> list[Any]:
        recipe = model.recipe
        if recipe is None:
            raise ExecutorError(
                f"Model {model.name!r} was built in memory, so Ray workers cannot rebuild it. Load it with "
                f"ap.load_model(name_or_path) (for your own weights: model.hf.save_pretrained(DIR) and "
                f"ap.load_model(DIR) on a path every node can read), or use executor='local'.")
        key = (id(model), repr(recipe))
        if self._actors and self._model_key == key:  # hashing every call would reread all weights
            return self._actors
        self.close()
        weight_hash = model.current_weight_hash()  # as the weights are now: edits since loading show
        ray = self._connect()
        free = ray.available_resources()
        gpus = int(free.get("GPU", 0))
        n = self.workers or (gpus or max(1, int(free.get("CPU", 1)) // self.cpus_per_worker))
        options: dict[str, Any] = {"num_cpus": self.cpus_per_worker, "max_restarts": 0, "max_concurrency": 1}
        if gpus:
            options["num_gpus"] = 1
        remote = ray.remote(**options)(_Worker)

        def spawn() -> Any:
            return remote.remote(recipe, weight_hash, self.threads, "cuda" if gpus else None)

        self._spawn = spawn
        self._actors = [spawn() for _ in range(n)]
        try:
            ray.get([a.setup.remote() for a in self._actors], timeout=self.start_timeout)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise ExecutorError(f"{n} Ray workers ({self.cpus_per_worker} CPU{'s' if self.cpus_per_worker > 1 else ''}"
                                f"{' and 1 GPU' if gpus else ''} each) did not start within {self.start_timeout:.0f} s; "
                                f"the cluster has {free.get('CPU', 0):.0f} CPUs and {gpus} GPUs free. Ask for fewer "
                                f"(workers=...), free the cluster, or raise start_timeout for a slow model load.") from None
        except Exception as e:  # a worker that cannot load the model: one clear error, nothing started stays
            self.close()
            cause = getattr(e, "cause", None)
            raise ExecutorError(f"A Ray worker could not load {recipe.describe()}: {cause or e}") from None
        self._model_key = key
        return self._actors

    def close(self) -> None:
        """Stop the actors (the cluster stays up)."""
        if self._actors:
            ray = _ray()
            for a in self._actors:
                try:
                    ray.kill(a)
                except Exception:  # pragma: no cover - already gone
                    pass
        self._actors, self._model_key = [], None

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running -----------------------------------------------------------------------------
    def map(self, job: UnitJob, runs: "GroupRuns", state: Any, todo: Sequence[Unit], *,
            store: UnitStore | None = None, advance: Advance | None = None) -> UnitValues:
        done: dict[str, UnitValues] = {}
        queue: deque[Unit] = deque()
        for unit in todo:
            values = saved_unit(store, unit)
            if values is None:
                queue.append(unit)
                continue
            done[unit.key] = values
            if advance is not None:
                advance(len(unit))
        if queue:
            self._run(job, runs.index, queue, done, store, advance)
        return merge([done[u.key] for u in todo])

    def _run(self, job: UnitJob, group: int, queue: deque[Unit], done: dict[str, UnitValues],
             store: UnitStore | None, advance: Advance | None) -> None:
        ray = self._connect()
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

        lost = (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)
        idle = list(self._ensure_actors(job.experiment.model))
        shipped = ray.put(without_model(job))
        key = uuid.uuid4().hex
        pending: dict[Any, tuple[Unit, Any]] = {}
        tries: dict[str, int] = {}
        while queue or pending:
            while queue and idle:
                actor, unit = idle.pop(), queue.popleft()
                pending[actor.run.remote(key, shipped, group, unit)] = (unit, actor)
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                unit, actor = pending.pop(ref)
                try:
                    values = ray.get(ref)
                except lost:
                    tries[unit.key] = tries.get(unit.key, 0) + 1
                    if tries[unit.key] > self.max_retries:
                        raise ExecutorError(f"Unit {unit.key} lost its Ray worker {tries[unit.key]} times; giving "
                                            f"up (finished units are saved when the run has an output directory).") from None
                    queue.appendleft(unit)  # again, on another actor
                    idle.append(self._replace(actor))
                    continue
                except Exception as e:  # an error raised by the work itself: the same error here
                    raise getattr(e, "cause", None) or e from None
                keep_unit(store, unit, values)
                done[unit.key] = values
                idle.append(actor)
                if advance is not None:
                    advance(len(unit))

    def _replace(self, dead: Any) -> Any:
        """A new actor in place of one that died."""
        fresh = self._spawn()
        self._actors = [fresh if a is dead else a for a in self._actors]
        self.restarts += 1
        return fresh
