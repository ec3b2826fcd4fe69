"""Where the runner's executions run: here, one per GPU, or as Ray tasks on a cluster.

:func:`~collapse_utils.book.runner.execute_plan` hands each phase's executions to one of two
dispatchers, which run ``job(execution, env)`` for each and call ``done(execution, error)`` as
each ends. ``env`` holds variables added to the kernel's environment, never to this process's.

* :class:`LocalSlots`: ``jobs`` executions at a time in spawned processes (in this process for
  one). With ``devices`` (``--gpus``) an execution that runs a model takes a free GPU and its
  kernel starts with ``CUDA_VISIBLE_DEVICES`` set to that one device, so each GPU runs one
  kernel at a time; the other pages take one of the ``jobs`` CPU slots.
* :class:`RayCluster` (``--ray``): the same executions as Ray tasks, ``num_gpus=1`` for those
  that run a model (Ray sets the worker's ``CUDA_VISIBLE_DEVICES``, which the kernel inherits),
  one CPU for the others. Ray re-runs a task whose worker died (:data:`MAX_RETRIES`); every
  write of an execution is atomic and overwrites, so a retry redoes that execution and nothing
  else. Every node must see the driver's folders at the same path: a marker file written by the
  driver is read back on every node before anything runs (:func:`write_markers`).

Ray is imported only here and only for ``--ray``: the library works without the ``cluster``
extra.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

DEVICES_ENV = "CUDA_VISIBLE_DEVICES"
MARKER = ".runner-shared-check"  # written by the driver into each folder workers must share
MAX_RETRIES = 3  # Ray re-runs a task whose worker process died this many times
NODE_CHECK_TIMEOUT_S = 300  # a node that cannot start a worker for the folder check by then

Job = Callable[[Any, Mapping[str, str]], "str | None"]  # (execution, kernel env) → error or None


class DispatchError(RuntimeError):
    """The executions cannot be dispatched (no Ray, a node without the shared folders); the
    message says what to fix."""


@dataclass(frozen=True)
class Work:
    """What a dispatcher runs: ``job(execution, env)`` per execution (``env``: variables added
    to the kernel's environment), on a GPU of its own where ``needs_gpu(execution)``; then
    ``done(execution, error)`` in this process, one at a time."""

    job: Job
    env: Mapping[str, str]
    needs_gpu: Callable[[Any], bool]
    done: Callable[[Any, str | None], None]


def _error_of(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# --- kernels with an environment of their own --------------------------------------------------


def kernel_manager_with(env: Mapping[str, str]) -> type:
    """A jupyter_client ``AsyncKernelManager`` whose kernels start with this process's
    environment plus ``env`` (for nbclient's ``kernel_manager_class``): each kernel gets its own
    devices while this process's ``os.environ`` stays as it is."""
    from jupyter_client.manager import AsyncKernelManager

    added = dict(env)

    class KernelManagerWithEnv(AsyncKernelManager):
        async def _async_pre_start_kernel(self, **kw: Any) -> Any:
            kw["env"] = {**kw.get("env", os.environ), **added}
            return await super()._async_pre_start_kernel(**kw)

    return KernelManagerWithEnv


# --- GPUs ----------------------------------------------------------------------------------


def parse_gpus(text: str) -> str | tuple[str, ...]:
    """``--gpus``: ``auto``, a count ``N`` (the first N visible GPUs) or device ids with commas
    (``0,1``; one device: ``3,``). Returns ``"auto"``, ``("#N",)`` for a count, or the ids."""
    text = text.strip()
    if text == "auto":
        return text
    if text.isdigit():
        if int(text) < 1:
            raise ValueError(f"a GPU count must be >= 1, got {text!r} (device 0 alone: '0,')")
        return (f"#{int(text)}",)
    ids = tuple(i.strip() for i in text.rstrip(",").split(","))
    if not all(ids) or len(set(ids)) < len(ids) or any(i.startswith(("#", "-")) for i in ids):
        raise ValueError(f"expected auto, a count or distinct device ids like 0,1, got {text!r}")
    return ids


def visible_gpus() -> tuple[str, ...]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set (a Slurm allocation, a
    container), else one id per GPU that ``nvidia-smi -L`` (or torch) lists."""
    if os.environ.get(DEVICES_ENV) is not None:
        return tuple(i.strip() for i in os.environ[DEVICES_ENV].split(",") if i.strip())
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False)
        if listing.returncode == 0:
            gpus = [line for line in listing.stdout.splitlines() if line.startswith("GPU ")]
            return tuple(str(i) for i in range(len(gpus)))
    import torch  # no nvidia-smi (a container without the tool): ask CUDA

    return tuple(str(i) for i in range(torch.cuda.device_count()))


def resolve_gpus(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """Device ids, one per kernel slot, for a :func:`parse_gpus` value; ``()`` for ``None`` or
    ``auto`` on a machine without GPUs. A count larger than the visible GPUs is an error."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        spec = parse_gpus(spec)
    if spec == "auto":
        return visible_gpus()
    if len(spec) == 1 and spec[0].startswith("#"):
        count, visible = int(spec[0][1:]), visible_gpus()
        if count > len(visible):
            seen = ",".join(visible) or "none"
            raise DispatchError(
                f"--gpus {count}: only {len(visible)} GPU(s) visible ({seen}); name the devices "
                "(--gpus 0,1,…) to use them anyway"
            )
        return visible[:count]
    return tuple(spec)


# Device memory one training run of the full profile may need: ViT-B/32 weights, gradients and
# AdamW state (1.4 GB in fp32), bf16 activations at batch 64, the uint8 image caches (EuroSAT
# train + val + the zero-shot test sets, ≈ 6 GB) and the CUDA context. bench.py --study
# records each run's measured peak beside it.
RUN_GPU_MEMORY_GB = 12.0


def gpu_free_memory_gb(device: str) -> float | None:
    """Free memory of GPU ``device`` (an id as ``CUDA_VISIBLE_DEVICES`` names it) from
    ``nvidia-smi``; None where the tool is missing or does not answer."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = [smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits", f"--id={device}"]
    answer = subprocess.run(query, capture_output=True, text=True, check=False)
    try:
        return float(answer.stdout.strip().splitlines()[0]) / 1024
    except (IndexError, ValueError):
        return None


def check_gpu_memory(
    devices: Sequence[str], runs_per_gpu: int, per_run_gb: float = RUN_GPU_MEMORY_GB
) -> list[str]:
    """Before packing ``runs_per_gpu`` runs on each device: raises :class:`DispatchError` naming
    the devices whose free memory is below ``runs_per_gpu × per_run_gb``; returns notes for the
    devices it could not query."""
    notes, short = [], []
    for device in devices:
        free = gpu_free_memory_gb(device)
        if free is None:
            notes.append(f"GPU {device}: free memory unknown (no nvidia-smi); not checked")
        elif free < runs_per_gpu * per_run_gb:
            short.append(f"GPU {device} has {free:.1f} GB free")
    if short:
        fits = ", ".join(short)
        raise DispatchError(
            f"--runs-per-gpu {runs_per_gpu} needs about {runs_per_gpu * per_run_gb:.0f} GB per "
            f"GPU ({per_run_gb:.0f} GB a run) but {fits}: lower --runs-per-gpu or free the GPU"
        )
    return notes


# --- here: processes and GPU slots -----------------------------------------------------------


class LocalSlots:
    """Runs executions on this machine: ``jobs`` at a time, plus ``runs_per_gpu`` per device in
    ``devices`` for those that need a GPU, each kernel started with
    ``CUDA_VISIBLE_DEVICES=<device>``. Without devices the GPU pages take CPU slots too (the
    ``--jobs`` fallback). Spawned worker processes live as long as the ``with`` block."""

    def __init__(self, jobs: int = 1, devices: Sequence[str] = (), runs_per_gpu: int = 1):
        self.jobs = jobs
        # A device listed k times is k slots: the study's small runs share a GPU.
        self.devices = tuple(d for d in devices for _ in range(runs_per_gpu))
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> LocalSlots:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def _submit(self, work: Work, execution: Any, env: Mapping[str, str]) -> Future:
        if self._pool is None:
            workers = self.jobs + len(self.devices)
            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
        return self._pool.submit(work.job, execution, env)

    def run(self, todo: Sequence[Any], work: Work) -> None:
        if self.jobs == 1 and not self.devices:  # one at a time: in this process
            for execution in todo:
                work.done(execution, work.job(execution, work.env))
            return
        on_gpu = deque(e for e in todo if self.devices and work.needs_gpu(e))
        on_cpu = deque(e for e in todo if not (self.devices and work.needs_gpu(e)))
        free, cpu_slots = list(self.devices), self.jobs
        running: dict[Future, tuple[Any, str | None]] = {}
        while on_gpu or on_cpu or running:
            while on_gpu and free:
                execution, device = on_gpu.popleft(), free.pop(0)
                env = {**work.env, DEVICES_ENV: device}
                running[self._submit(work, execution, env)] = (execution, device)
            while on_cpu and cpu_slots:
                execution, cpu_slots = on_cpu.popleft(), cpu_slots - 1
                running[self._submit(work, execution, work.env)] = (execution, None)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                execution, device = running.pop(future)
                if device is None:
                    cpu_slots += 1
                else:
                    free.append(device)
                try:
                    error = future.result()
                except Exception as err:  # a worker process died; report it like a failure
                    error = _error_of(err)
                work.done(execution, error)


# --- Ray -------------------------------------------------------------------------------------


def write_markers(folders: Iterable[Path]) -> list[tuple[str, str]]:
    """A marker file with a fresh token in each folder (created if needed), written atomically:
    ``(path, token)`` pairs a worker reads back with :func:`missing_markers`."""
    token = uuid.uuid4().hex
    markers = []
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder.resolve() / MARKER
        tmp = path.with_name(f"{MARKER}.{os.getpid()}.tmp")
        tmp.write_text(token)
        os.replace(tmp, path)
        markers.append((str(path), token))
    return markers


def missing_markers(markers: Sequence[tuple[str, str]]) -> list[str]:
    """The folders of ``markers`` where this process does not read the driver's token."""
    missing = []
    for path, token in markers:
        try:
            seen = Path(path).read_text()
        except OSError:
            seen = None
        if seen != token:
            missing.append(str(Path(path).parent))
    return missing


def _not_shared(where: str, missing: Sequence[str]) -> str:
    return (
        f"{where} cannot see the driver's {', '.join(missing)}: the output folders must be on a "
        "filesystem every Ray node mounts at the same path (NFS, Lustre, a cluster home); see "
        "README, Scaling out"
    )


def _node_check(markers: Sequence[tuple[str, str]]) -> tuple[str, list[str]]:
    return socket.gethostname(), missing_markers(markers)


def _ray_task(job: Job, execution: Any, env: Mapping[str, str], markers) -> str | None:
    """One execution in a Ray worker: on a node that sees the shared folders, ``job`` with the
    worker's environment (``CUDA_VISIBLE_DEVICES`` set by Ray) plus ``env``."""
    missing = missing_markers(markers)
    if missing:
        return _not_shared(f"Ray node {socket.gethostname()}", missing)
    return job(execution, env)


class RayCluster:
    """Runs executions as Ray tasks on the cluster at ``address`` (``auto``, ``host:port``,
    ``ray://…``) or on a local one started here (``local``); a cluster already initialised in
    this process is used as it is. Each phase's executions are submitted at once and Ray
    schedules them by resources: ``num_gpus=1/runs_per_gpu`` for those that need a GPU (when
    the cluster has GPUs), one CPU otherwise. Entering checks, on every node, that ``shared``
    folders are the driver's (:func:`write_markers`), and raises :class:`DispatchError` if
    not."""

    def __init__(self, address: str, shared: Sequence[Path], runs_per_gpu: int = 1):
        self.address, self.shared = address, tuple(shared)
        self.gpu_share = 1 / runs_per_gpu  # Ray's fractional num_gpus: k tasks per GPU
        self._started = False
        self._markers: list[tuple[str, str]] = []
        self._gpus = False

    def __enter__(self) -> RayCluster:
        try:
            import ray
        except ImportError:
            raise DispatchError(
                "--ray needs Ray: pip install -e '.[cluster]' (every node needs it too)"
            ) from None
        if not ray.is_initialized():
            local = {"include_dashboard": False} if self.address == "local" else {}
            try:
                ray.init(self.address, log_to_driver=False, logging_level="WARNING", **local)
            except (ConnectionError, ValueError, RuntimeError) as err:
                raise DispatchError(f"--ray {self.address}: {_error_of(err)}") from err
            self._started = True
        try:
            self._gpus = ray.cluster_resources().get("GPU", 0) >= 1
            if not self._gpus:
                print("note: the Ray cluster declares no GPU; every page runs on CPUs")
            self._markers = write_markers(self.shared)
            self._check_nodes(ray)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def _check_nodes(self, ray: Any) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        check = ray.remote(_node_check)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = [
            check.options(
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            ).remote(self._markers)
            for n in nodes
        ]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=NODE_CHECK_TIMEOUT_S)
        if pending:
            raise DispatchError(
                f"{len(pending)} Ray node(s) did not run the shared-folder check within "
                f"{NODE_CHECK_TIMEOUT_S} s"
            )
        for host, missing in ray.get(ready):
            if missing:
                raise DispatchError(_not_shared(f"Ray node {host}", missing))

    def run(self, todo: Sequence[Any], work: Work) -> None:
        import ray

        task = ray.remote(_ray_task)
        job, env = ray.put(work.job), ray.put(dict(work.env))
        submitted = {}
        for execution in todo:
            gpu = self._gpus and work.needs_gpu(execution)
            options = {"num_cpus": 1, "num_gpus": self.gpu_share if gpu else 0,
                       "name": execution.name}  # fmt: skip
            ref = task.options(max_retries=MAX_RETRIES, retry_exceptions=False, **options)
            submitted[ref.remote(job, execution, env, self._markers)] = execution
        pending = list(submitted)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    try:
                        error = ray.get(ref)
                    except ray.exceptions.RayError as err:  # its worker died MAX_RETRIES times
                        error = _error_of(err)
                    work.done(submitted[ref], error)
        finally:
            for ref in pending:  # interrupted: leave nothing running on the cluster
                ray.cancel(ref, force=True)
