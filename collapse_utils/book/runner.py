"""Execute every notebook × configuration with papermill, write ``_toc.yml``, build the book.

The plan (:func:`build_plan`) has three phases; the first runs before the other two, which run
together (:data:`STAGES`), each stage longest page first (:func:`longest_first`):

1. ``config``: each family notebook once per configuration of its family
   (parameters ``profile``, ``config_id``) → ``book/executed/<notebook>/<id>.ipynb``;
2. ``summary``: each family notebook once more with ``config_id=""`` (family comparison,
   reads the results of phase 1) → ``book/executed/<notebook>/summary.ipynb``;
3. ``profile``: the cross-study notebooks with ``profile`` only → ``book/executed/<nb>.ipynb``.

Family notebooks list their configurations' pages in the order of the family's setting where
it is a number every run has (:data:`PAGE_ORDER`: learning rate, frozen layers), else by id.
After executing, :func:`dress_pages` gives every executed page its heading: a run page is titled
with its id and description (the family's heading and intro stay on the family page), the
injected parameters cell is hidden and its values appear in a small "built with" line.

An execution is skipped when its output notebook carries, in ``metadata["collapse_runner"]``,
status ``ok`` and the same key: a hash of the notebook source bytes, the profile, the library
code the page runs (:mod:`collapse_utils.code_hash`: an edit to a page's module re-executes
that page and the pages that import it, no other), and the config hashes it depends on (its
own for a configuration page; every config for a summary, which also shows other families'
reference runs, and for the cross-study notebooks). The families, their notebooks and titles
come from ``params/families.yaml``. A failing execution keeps papermill's notebook with its
error cell, so the book shows the failure; the others still run, and the run exits non-zero
after the toc and the book are still written.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing.util
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import nbformat
import yaml
from tqdm import tqdm

from collapse_utils.analysis.reproduction import load_report_numbers
from collapse_utils.book.dispatch import (
    LocalSlots,
    RayCluster,
    Work,
    check_gpu_memory,
    kernel_manager_with,
    resolve_gpus,
)
from collapse_utils.code_hash import (
    PACKAGE_ROOT,
    RETRAIN_STALE,
    is_stale,
    notebook_code_hash,
    training_code_hash,
)
from collapse_utils.config import (
    PARAMS_DIR,
    PARAMS_ENV,
    REPO_ROOT,
    RunConfig,
    experiment_files,
    load_config,
    plan_runs,
    profile_about,
    profile_output_root,
    run_name,
)
from collapse_utils.families import Family, load_families
from collapse_utils.run_record import RecordError, RunFiles, find_runs, read_record
from collapse_utils.storage import LockedError, locked
from collapse_utils.training.data import prepare_datasets

KERNEL = "python3"
RUN_NOTEBOOK = "run"  # notebooks/run.ipynb: the page of every configuration and seed
STALE = "stale"  # run_book(force=STALE): retrain the runs other training code made
METADATA_KEY = "collapse_runner"
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # torch.compile's on-disk cache, shared by a study

# Family notebooks and their titles: params/families.yaml (collapse_utils.families).
# cross-study notebooks (parameter ``profile`` only) → toc title, in book order
PROFILE_NOTEBOOKS = {
    "00_findings": "Findings",
    "14_study_b_published": "Study B on the authors' published runs",
    "07_zero_shot": "Zero-shot transfer",
    "11_interpolation": "Interpolation (WiSE-FT)",
    "08_statistics": "Statistics",
    "09_explore": "Exploration",
    "10_reproducibility": "Reproducibility",
    "12_reproduction_check": "Reproduction check",
}
# Cross-study notebooks listed in the toc's first part, right after the method page (the answers
# to the research questions); the others make the last part, "Across the study".
AFTER_METHOD = ("00_findings", "14_study_b_published")
# html.announcement per profile: shown at the top of every page of the built book.
BANNERS = {
    "smoke": (
        "Smoke profile: every number, table and figure in this book comes from a tiny random "
        "CLIP trained on synthetic images. They check that the pipeline runs and are "
        "<strong>not findings</strong>."
    ),
}
TITLE_SUFFIX = {"smoke": " (smoke run, not findings)"}
# Settings by which a family's run pages are ordered (else: id order).
PAGE_ORDER: dict[str, Callable[[RunConfig], float]] = {
    "lr": lambda c: c.train.lr,
    "freeze_layers": lambda c: c.train.freeze_layers,
}

# Seconds one cell may run before its execution fails (a cell trains a whole configuration in
# the full profile). A hung kernel then becomes a failed page instead of a stalled build.
CELL_TIMEOUT_S = {"smoke": 600, "full": 4 * 3600}

# Kernel log level ERROR silences ipykernel's per-start TCP warning, which breaks the bar.
# papermill interrupts each kernel on shutdown, which ipykernel logs at ERROR ("KeyboardInterrupt
# caught in kernel") although the execution succeeded.
_KERNEL_ARGS = ["--IPKernelApp.log_level=CRITICAL"]


class RunnerError(RuntimeError):
    """The plan cannot be built (unknown id, missing notebook source); the message says which."""


@dataclass(frozen=True)
class BookPaths:
    """Where the runner reads and writes. ``root`` is the book's source folder (``_config.yml``,
    ``_toc.yml``, ``_build/``) and the notebooks' working directory."""

    root: Path
    notebooks: Path
    params: Path
    book: Path
    library: Path = PACKAGE_ROOT  # the collapse_utils whose code the page keys hash

    @classmethod
    def repo(cls) -> BookPaths:
        return cls(REPO_ROOT, REPO_ROOT / "notebooks", PARAMS_DIR, REPO_ROOT / "book")

    @property
    def executed(self) -> Path:
        return self.book / "executed"

    @property
    def toc(self) -> Path:
        return self.root / "_toc.yml"

    @property
    def config(self) -> Path:
        return self.root / "_config.yml"

    @property
    def build(self) -> Path:
        return self.root / "_build"


@dataclass(frozen=True)
class Execution:
    """One papermill run: ``source`` with ``parameters`` → ``output``."""

    phase: str
    source: Path
    output: Path
    parameters: dict[str, Any]
    key: str
    title: str
    family: str | None = None
    config_id: str | None = None
    runs_root: Path | None = None  # summaries and study pages read every run under it
    # A run page of a grid or of a configuration with several seeds: listed under its family's
    # comparison page in the toc, not as a chapter of its own.
    grouped: bool = False

    def current_key(self) -> str:
        """``key``, plus for pages that read the runs, the state of those runs now: a page is
        out of date when any run it reads was trained, retrained or failed since."""
        if self.runs_root is None:
            return self.key
        state = hashlib.sha256(self.key.encode())
        for files in find_runs(self.runs_root):
            state.update(str(files.history.relative_to(self.runs_root)).encode())
            state.update(hashlib.sha256(files.history.read_bytes()).digest())
        return state.hexdigest()[:16]

    @property
    def name(self) -> str:
        return f"{self.output.parent.name}/{self.output.stem}" if self.family else self.source.stem


@dataclass
class Report:
    executed: list[Execution] = field(default_factory=list)
    skipped: list[Execution] = field(default_factory=list)
    failed: list[tuple[Execution, str]] = field(default_factory=list)
    build_returncode: int | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and not self.build_returncode


# --- plan ------------------------------------------------------------------------------------


def execution_key(source: Path, profile: str, configs: Iterable[RunConfig], code: str) -> str:
    """Hash of the notebook source bytes, the profile, ``(id, config_hash)`` of ``configs`` and
    ``code``, the hash of the library code the page runs (:mod:`collapse_utils.code_hash`)."""
    payload = {
        "notebook": hashlib.sha256(source.read_bytes()).hexdigest(),
        "profile": profile,
        "configs": sorted((c.id, c.config_hash()) for c in configs),
        "code": code,
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def build_plan(
    profile: str, paths: BookPaths, seeds: Sequence[int] | None = None
) -> list[Execution]:
    """Every execution of the book for ``profile``, in run order (phases config, summary,
    profile); ``seeds`` overrides every configuration's seeds. Raises :class:`RunnerError`
    naming any missing notebook source."""
    families = load_families(paths.params)
    needed = [RUN_NOTEBOOK, *(f.notebook for f in families.values()), *PROFILE_NOTEBOOKS]
    missing = [n for n in needed if not (paths.notebooks / f"{n}.ipynb").is_file()]
    if missing:
        raise RunnerError(f"missing notebook source(s) in {paths.notebooks}: {missing}")
    configs = plan_runs(profile, paths.params, tuple(seeds) if seeds else None)
    # read now, so that a malformed report file fails the plan, not its page after training
    load_report_numbers()
    by_family = {f: [c for c in configs if c.family == f] for f in families}
    runs_root = profile_output_root(profile, paths.params)
    files = set(experiment_files(paths.params))
    runs_per_id = Counter(c.id for c in configs)
    several = {i for i, n in runs_per_id.items() if n > 1}  # their pages are named <id>_s<seed>
    codes: dict[Path, str] = {}

    def key(source: Path, configs: Sequence[RunConfig]) -> str:
        if source not in codes:  # one import walk per notebook, not per page
            codes[source] = notebook_code_hash(source, paths.library)
        return execution_key(source, profile, configs, codes[source])

    plan: list[Execution] = []
    run_source = paths.notebooks / f"{RUN_NOTEBOOK}.ipynb"  # every run page, in its family's folder
    for family, stem, axis in ((f.name, f.notebook, f.axis) for f in families.values()):
        source = run_source
        members = by_family[family]
        if axis in PAGE_ORDER:
            members = sorted(members, key=lambda c, key=PAGE_ORDER[axis]: (key(c), c.id))
        for c in members:
            name = run_name(c, c.id in several)
            parameters = {"profile": profile, "config_id": c.id}
            plan.append(
                Execution(
                    phase="config",
                    source=source,
                    output=paths.executed / stem / f"{name}.ipynb",
                    # the seed is a parameter whenever it is not the configuration's own (several
                    # seeds, or --seeds): the page must train and show that seed
                    parameters=parameters | ({"seed": c.seed} if c.id in several or seeds else {}),
                    key=key(source, [c]),
                    title=f"{name}: {c.description}" if c.description else name,
                    family=family,
                    config_id=c.id,
                    grouped=c.id in several or c.id not in files,
                )
            )
    for family, stem, name in ((f.name, f.notebook, f.title) for f in families.values()):
        if not by_family[family]:
            continue
        source = paths.notebooks / f"{stem}.ipynb"
        plan.append(
            Execution(
                phase="summary",
                source=source,
                output=paths.executed / stem / "summary.ipynb",
                parameters={"profile": profile},
                # Summaries compare against other families' runs (their references), and the
                # statistics too: every summary depends on every configuration.
                key=key(source, configs),
                title=f"{name}: the runs compared",  # the sidebar names the family
                family=family,
                runs_root=runs_root,
            )
        )
    for stem, title in PROFILE_NOTEBOOKS.items():
        source = paths.notebooks / f"{stem}.ipynb"
        plan.append(
            Execution(
                phase="profile",
                source=source,
                output=paths.executed / f"{stem}.ipynb",
                parameters={"profile": profile},
                key=key(source, configs),
                title=title,
                runs_root=runs_root,
            )
        )
    return plan


def check_ids(only: Sequence[str], plan: Sequence[Execution]) -> None:
    """Raise :class:`RunnerError` listing the available ids if ``only`` names an unknown one
    (an id names every seed of a configuration; a run page's name, ``<id>_s<seed>``, one)."""
    pages = [e for e in plan if e.phase == "config"]
    available = sorted({e.config_id for e in pages})
    unknown = [i for i in only if i not in available and not any(_is_run(e, [i]) for e in pages)]
    if unknown:
        raise RunnerError(f"unknown experiment id(s) {unknown}; available: {', '.join(available)}")


def _is_run(execution: Execution, only: Sequence[str]) -> bool:
    return execution.config_id in only or execution.output.stem in only


def select_executions(plan: Sequence[Execution], only: Sequence[str] | None) -> list[Execution]:
    """The executions to run: all, or for ``only`` those ids' (or run names') pages and their
    families' summaries (the cross-study notebooks need every run, so they wait for a full
    run)."""
    if not only:
        return list(plan)
    chosen = [e for e in plan if e.phase == "config" and _is_run(e, only)]
    families = {e.family for e in chosen}
    return [*chosen, *(e for e in plan if e.phase == "summary" and e.family in families)]


# --- state in the executed notebook -----------------------------------------------------------


def stamp_of(output: Path) -> dict[str, Any]:
    """``metadata["collapse_runner"]`` of an executed notebook; ``{}`` if none or unreadable."""
    if not output.is_file():
        return {}
    try:
        nb = nbformat.read(output, as_version=4)
    except (OSError, ValueError):  # half-written or not a notebook: run it again
        return {}
    return dict(nb.metadata.get(METADATA_KEY, {}))


def is_current(execution: Execution) -> bool:
    stamp = stamp_of(execution.output)
    return stamp.get("status") == "ok" and stamp.get("key") == execution.current_key()


def _stamp_output(execution: Execution, error: str | None, seconds: float | None = None) -> None:
    """Stamp the output with key, status and the execution's wall time; write a stub page if
    a failure left none. The stamped page replaces the output at once (:func:`_write_page`)."""
    if error is not None and not execution.output.exists():
        nb = nbformat.v4.new_notebook()
        nb.cells.append(nbformat.v4.new_markdown_cell(f"# {execution.title}"))
        nb.cells.append(
            nbformat.v4.new_markdown_cell(
                f"```{{error}}\nThis notebook failed before papermill saved it:\n\n{error}\n```"
            )
        )
    else:
        nb = nbformat.read(execution.output, as_version=4)
    nb.metadata[METADATA_KEY] = {
        "key": execution.current_key(),
        "status": "ok" if error is None else "failed",
        "error": error,
        "parameters": execution.parameters,
        "seconds": None if seconds is None else round(seconds, 1),
    }
    _write_page(nb, execution.output)


def partial_path(output: Path) -> Path:
    """Where a page is written before it replaces ``output`` (hidden from the book; one name per
    page, so a re-run after a killed one overwrites what it left)."""
    return output.with_name(f".{output.stem}.partial.ipynb")


def _write_page(nb: nbformat.NotebookNode, output: Path) -> None:
    partial = partial_path(output)
    nbformat.write(nb, partial)
    os.replace(partial, output)


# --- execution ------------------------------------------------------------------------------

# (execution, working directory, variables added to the kernel's environment) → error or None
Executor = Callable[[Execution, Path, Mapping[str, str]], "str | None"]
# Cross-study notebooks that run models (the WiSE-FT path measures checkpoints): like training
# pages they get a GPU of their own under --gpus and --ray.
GPU_NOTEBOOKS = ("11_interpolation",)
RUN_LOCK_WAIT_S = 30.0  # see _wait_for_run_folder


# Run pages first; then the pages that read their runs (family comparisons and cross-study
# pages read runs, not each other's pages), together so that no slot idles between them.
STAGES = (("config",), ("summary", "profile"))


def longest_first(todo: Sequence[Execution], params: str | None = None) -> list[Execution]:
    """``todo`` ordered by expected cost, longest first, so that parallel slots end together:
    the seconds its last execution took (its stamp), else model pages before the others and
    run pages by the work of their configuration in ``params`` (epochs × image tokens)."""

    def cost(e: Execution) -> tuple[float, bool, int]:
        seconds = stamp_of(e.output).get("seconds") or 0.0
        work = 0
        if e.config_id and params:
            c = load_config(e.parameters["profile"], e.config_id, params)
            work = (c.train.epochs or 0) * (c.data.image_size // c.model.patch_size) ** 2
        return seconds, needs_gpu(e), work

    return sorted(todo, key=cost, reverse=True)


def needs_gpu(execution: Execution) -> bool:
    """Whether ``execution`` runs a model: a training page or a :data:`GPU_NOTEBOOKS` page."""
    return execution.phase == "config" or execution.source.stem in GPU_NOTEBOOKS


def papermill_execute(
    execution: Execution, cwd: Path, env: Mapping[str, str], km: Any = None
) -> str | None:
    """Run one notebook with papermill in ``cwd``, its kernel's environment this process's plus
    ``env`` (or in ``km``'s running kernel); return ``None`` or a one-line error. Papermill
    saves the notebook as it goes into :func:`partial_path`, which replaces the output at the
    end (also after a failure, so the page shows the error): a killed execution never leaves a
    half-written page."""
    import papermill

    partial = partial_path(execution.output)
    kernel = {"km": km} if km is not None else {"kernel_manager_class": kernel_manager_with(env)}
    try:
        papermill.execute_notebook(
            execution.source,
            partial,
            parameters=execution.parameters,
            kernel_name=KERNEL,
            cwd=cwd,
            progress_bar=False,
            extra_arguments=_KERNEL_ARGS,
            execution_timeout=CELL_TIMEOUT_S.get(execution.parameters["profile"], 4 * 3600),
            **kernel,
        )
    except papermill.PapermillExecutionError as err:
        return f"{err.ename}: {err.evalue} (cell [{err.exec_count}])"
    except Exception as err:  # any failure is reported at the end; the other runs go on
        return f"{type(err).__name__}: {err}"
    finally:
        if partial.exists():
            os.replace(partial, execution.output)
    return None


# A running kernel per environment, kept by the process that executes the pages (the runner, or
# each worker of its pool) so that one kernel's imports serve many pages.
_WARM: dict[tuple[tuple[str, str], ...], Any] = {}
# Before each page after the first: an empty namespace and no open figure, as a fresh kernel.
_RESET = (
    "get_ipython().run_line_magic('reset', '-f')\n"
    "import matplotlib.pyplot\n"
    "matplotlib.pyplot.close('all')\n"
    "get_ipython().execution_count = 1"
)


def warm_execute(execution: Execution, cwd: Path, env: Mapping[str, str]) -> str | None:
    """:func:`papermill_execute` in a kernel kept running between the pages this process
    executes with the same ``env``: torch, transformers and the page modules are imported once
    per kernel instead of once per page (half of a smoke page's time). Each page still runs
    every cell of its notebook through papermill, in a namespace reset as a fresh kernel's; a
    kernel that failed a page or died is replaced."""
    from jupyter_core.utils import run_sync

    key = tuple(sorted(env.items()))
    km = _WARM.get(key)
    if km is not None and not run_sync(km.is_alive)():
        shutdown_warm_kernels([key])
        km = None
    if km is None:  # nbclient starts its kernel at the first page
        if not _WARM:  # a pool worker exits without atexit: multiprocessing's finalizers run
            multiprocessing.util.Finalize(None, shutdown_warm_kernels, exitpriority=10)
        km = _WARM[key] = _warm_manager(env)(kernel_name=KERNEL)
    else:
        km.reset_namespace()
    try:
        error = papermill_execute(execution, cwd, env, km=km)
    finally:
        km.close_clients()
    if error is not None:
        shutdown_warm_kernels([key])
    return error


def _warm_manager(env: Mapping[str, str]) -> type:
    """:func:`kernel_manager_with` that also closes the clients nbclient leaves open on a
    kernel it does not own, and resets the kernel's namespace between pages."""
    from jupyter_core.utils import run_sync

    class WarmKernelManager(kernel_manager_with(env)):
        def client(self, **kw: Any) -> Any:
            kc = super().client(**kw)
            self.__dict__.setdefault("_clients", []).append(kc)
            return kc

        def close_clients(self) -> None:
            for kc in self.__dict__.pop("_clients", []):
                kc.stop_channels()

        def reset_namespace(self) -> None:
            kc = self.client()
            kc.start_channels()
            try:
                run_sync(kc.execute_interactive)(_RESET, timeout=60, store_history=False)
            finally:
                self.close_clients()

    return WarmKernelManager


def shutdown_warm_kernels(keys: Iterable[tuple] | None = None) -> None:
    """Shut down this process's warm kernels (of ``keys``; all by default)."""
    from jupyter_core.utils import run_sync

    for key in list(_WARM if keys is None else keys):
        km = _WARM.pop(key, None)
        if km is not None and km.has_kernel:
            run_sync(km.shutdown_kernel)(now=True)


def _wait_for_run_folder(execution: Execution, env: Mapping[str, str]) -> None:
    """Wait up to :data:`RUN_LOCK_WAIT_S` while another process holds the run folder's lock of a
    training page. A retried execution (its Ray worker killed) can start while the killed
    one's kernel is still exiting: ipykernel notices within a second that its parent died, and
    holds the lock until then. A lock still held afterwards fails the page as before."""
    if not execution.config_id or PARAMS_ENV not in env:
        return
    profile, seed = execution.parameters["profile"], execution.parameters.get("seed")
    run = RunFiles(load_config(profile, execution.config_id, env[PARAMS_ENV], seed=seed).run_dir)
    deadline = time.monotonic() + RUN_LOCK_WAIT_S
    while (run.run_dir / ".lock").exists():
        try:
            with run.locked():
                return
        except LockedError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.5)


def execute_and_stamp(
    execution: Execution, env: Mapping[str, str], cwd: Path, executor: Executor
) -> str | None:
    """One execution where it runs (this process, a pool worker, a Ray worker): the executor,
    then the stamp, so a finished execution leaves a complete, stamped page."""
    _wait_for_run_folder(execution, env)
    start = time.monotonic()
    error = executor(execution, cwd, env)
    _stamp_output(execution, error, time.monotonic() - start)
    return error


def execute_plan(
    selected: Sequence[Execution],
    cwd: Path,
    jobs: int = 1,
    force: bool | Collection[str] = False,
    executor: Executor = papermill_execute,
    report: Report | None = None,
    env: Mapping[str, str] | None = None,
    gpus: Sequence[str] = (),
    ray: str | None = None,
    shared: Sequence[Path] = (),
    runs_per_gpu: int = 1,
) -> Report:
    """Run ``selected`` phase by phase, skipping current outputs, each kernel with ``env`` added
    to its environment. Here: ``jobs`` at a time, plus ``runs_per_gpu`` per device of ``gpus``
    for the pages that run a model (:func:`needs_gpu`). With ``ray`` (an address, ``auto`` or
    ``local``): as Ray tasks, after checking that every node sees the ``shared`` folders. See
    :mod:`collapse_utils.book.dispatch`."""
    report = report or Report()
    if ray is not None:
        dispatcher = RayCluster(ray, shared, runs_per_gpu)
    else:
        dispatcher = LocalSlots(jobs, gpus, runs_per_gpu)

    def done(execution: Execution, error: str | None) -> None:
        if error is not None and stamp_of(execution.output).get("status") != "failed":
            _stamp_output(execution, error)  # its process died before it could stamp it
        if error is None:
            report.executed.append(execution)
        else:
            report.failed.append((execution, error))
            tqdm.write(f"FAILED {execution.name}: {error}")
        bar.set_postfix_str(execution.name)
        bar.update()

    job = partial(execute_and_stamp, cwd=cwd, executor=executor)
    work = Work(job=job, env=dict(env or {}), needs_gpu=needs_gpu, done=done)
    with dispatcher:
        bar = tqdm(total=len(selected), unit="notebook", desc="notebooks", dynamic_ncols=True)
        try:
            for phases in STAGES:
                todo = []
                for e in (e for e in selected if e.phase in phases):
                    forced = force is True or (force is not False and e.name in force)
                    if not forced and is_current(e):
                        report.skipped.append(e)
                        bar.update()
                    else:
                        todo.append(e)
                todo = longest_first(todo, (env or {}).get(PARAMS_ENV))  # reads the old stamps
                for e in todo:
                    e.output.parent.mkdir(parents=True, exist_ok=True)
                    e.output.unlink(missing_ok=True)  # a failure must not leave an old page
                dispatcher.run(todo, work)
        finally:
            bar.close()
    return report


# --- page headings ---------------------------------------------------------------------------

INJECTED_TAG = "injected-parameters"  # papermill's tag on the cell it adds with the parameters
ERROR_TAG = "papermill-error-cell-tag"  # papermill's tag on its "An Exception was…" banners
HIDDEN_TAG = "remove-cell"  # Jupyter Book leaves the cell (input and output) out of the page


def listed_pages(plan: Sequence[Execution]) -> list[Execution]:
    """The executions whose output belongs to this plan (ok or failed): the book's pages."""
    return [e for e in plan if stamp_of(e.output).get("key") == e.current_key()]


def built_with(parameters: dict[str, str]) -> str:
    """The small line under a page's heading that names the parameters it was executed with."""
    values = ", ".join(f'`{name} = "{value}"`' for name, value in parameters.items())
    return f"{{.built-with}}\nBuilt with {values} (papermill parameters)."


def page_heading(
    execution: Execution, original: str, family_page: str | None, run_index: str | None = None
) -> str:
    """The first markdown cell of a page. A run page: ``# <id>: <description>``, the built-with
    line and a link to its family's page (``family_page``: that page's file and title, if it is
    in the book). Any other page: the notebook's own heading and intro with the built-with line
    under the heading, and on a comparison page whose runs are listed apart (``run_index``, a
    link to :func:`write_run_index`'s page) the link to them."""
    line = built_with(execution.parameters)
    if execution.config_id:
        text = f"# {execution.title}\n\n{line}"
        if family_page:
            text += f"\n\nOne run of the family compared on {family_page}."
        return text
    heading, _, rest = original.partition("\n")
    if run_index:
        line += f"\n\nEvery run of this comparison has its own page: {run_index}."
    if not heading.startswith("# "):
        return f"{line}\n\n{original}"
    return f"{heading}\n\n{line}\n\n{rest.lstrip()}".rstrip()


def dress_page(
    nb: nbformat.NotebookNode,
    execution: Execution,
    family_page: str | None,
    run_index: str | None = None,
) -> bool:
    """Hide the injected parameters cell and set the page heading (:func:`page_heading`) of an
    executed notebook, in place: the notebook's first markdown cell (not papermill's error
    banner, which the heading goes above). Idempotent: the heading is rebuilt from the cell's
    original text, kept in its metadata. Returns whether anything changed."""
    before = nbformat.writes(nb)
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if INJECTED_TAG in tags and HIDDEN_TAG not in tags:
            cell.metadata["tags"] = [*tags, HIDDEN_TAG]
    title = next(
        (
            c
            for c in nb.cells
            if c.cell_type == "markdown" and ERROR_TAG not in c.metadata.get("tags", [])
        ),
        None,
    )
    if title is not None:
        kept = title.metadata.setdefault(METADATA_KEY, {})
        original = kept.setdefault("source", title.source)
        title.source = page_heading(execution, original, family_page, run_index)
        nb.cells.remove(title)
        nb.cells.insert(0, title)
    return nbformat.writes(nb) != before


def dress_pages(plan: Sequence[Execution], paths: BookPaths) -> None:
    """:func:`dress_page` on every listed page of ``plan`` (run on every build, so a changed
    description reaches the heading without re-executing)."""
    listed = listed_pages(plan)
    families = load_families(paths.params)
    summaries = {e.family: e for e in listed if e.phase == "summary"}
    grouped = {e.family for e in listed if e.grouped}
    for execution in listed:
        family_page = run_index = None
        summary = summaries.get(execution.family)
        if execution.config_id and summary is not None:
            title = families[execution.family].title
            family_page = f"[{title}]({summary.output.name})"
        if execution.phase == "summary" and execution.family in grouped:
            run_index = f"[the runs of {families[execution.family].title}]({RUN_INDEX})"
        nb = nbformat.read(execution.output, as_version=4)
        if dress_page(nb, execution, family_page, run_index):
            nbformat.write(nb, execution.output)


# --- table of contents and book ---------------------------------------------------------------


def _docname(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def write_toc(plan: Sequence[Execution], paths: BookPaths) -> Path:
    """``_toc.yml``: intro, method and the :data:`AFTER_METHOD` notebooks, one part per family
    (summary, then configurations), then the other cross-study notebooks. Lists only pages
    executed for this plan (ok or failed)."""
    listed = listed_pages(plan)

    def entry(e: Execution) -> dict[str, Any]:
        return {"file": _docname(e.output, paths.root), "title": e.title}

    method = {"file": _docname(paths.book / "method", paths.root)}
    cross = [e for e in listed if e.phase == "profile"]
    first = [entry(e) for e in cross if e.source.stem in AFTER_METHOD]
    parts: list[dict[str, Any]] = [{"caption": "The study", "chapters": [method, *first]}]
    indexes = []
    for family in load_families(paths.params).values():
        pages = [e for e in listed if e.family == family.name]
        pages.sort(key=lambda e: e.phase != "summary")  # summary first, then plan order
        apart = bool(pages) and pages[0].phase == "summary"
        chapters = [entry(e) for e in pages if not (e.grouped and apart)]
        grouped = [e for e in pages if e.grouped and apart]
        if grouped:  # a grid's run pages: listed at the end, so that "Next" is not trapped
            index = write_run_index(family, pages[0], grouped)
            indexes.append({"file": _docname(index, paths.root),
                            "sections": [entry(e) for e in grouped]})  # fmt: skip
        if chapters:
            parts.append({"caption": family.title, "chapters": chapters})
    across = [entry(e) for e in cross if e.source.stem not in AFTER_METHOD]
    if across:
        parts.append({"caption": "Across the study", "chapters": across})
    if indexes:
        parts.append({"caption": "Run pages", "chapters": indexes})
    for part in parts:  # figures numbered per chapter (Fig. 2.3), chapters per part
        part["numbered"] = True
    toc = {"format": "jb-book", "root": _docname(paths.book / "intro", paths.root), "parts": parts}
    paths.toc.write_text(
        "# Generated by collapse_utils.book.runner; do not edit.\n"
        + yaml.safe_dump(toc, sort_keys=False, allow_unicode=True)
    )
    return paths.toc


RUN_INDEX = "runs.md"  # beside a family's pages: the list of its grouped run pages


def write_run_index(family: Family, summary: Execution, runs: Sequence[Execution]) -> Path:
    """``runs.md`` beside the family's pages: a page listing its run pages (each a section of
    it in the toc, in the book's last part), linked from the comparison page."""
    path = summary.output.parent / RUN_INDEX
    links = "\n".join(f"- [{e.title}]({e.output.name})" for e in runs)
    path.write_text(
        f"# {family.title}: every run\n\n"
        f"Each run of [{family.title}]({summary.output.name}) has its own page: its settings, "
        f"its training and how its attention changed.\n\n{links}\n"
    )
    return path


def write_build_config(profile: str, paths: BookPaths) -> Path:
    """``_build/_config.<profile>.yml``: ``_config.yml`` with the profile's banner and title."""
    config = yaml.safe_load(paths.config.read_text())
    config["title"] = config.get("title", "") + TITLE_SUFFIX.get(profile, "")
    about = profile_about(profile, paths.params)
    banner = BANNERS.get(profile) or f"Built with the <code>{profile}</code> profile: {about}."
    config.setdefault("html", {})["announcement"] = banner
    out = paths.build / f"_config.{profile}.yml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"# Generated by collapse_utils.book.runner from {paths.config.name} for profile "
        f"{profile!r}; do not edit.\n" + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    )
    return out


def _jupyter_book() -> str:
    beside = Path(sys.executable).with_name("jupyter-book")
    found = str(beside) if beside.is_file() else shutil.which("jupyter-book")
    if found is None:
        raise RunnerError("jupyter-book not found next to this Python or on PATH")
    return found


def build_book(profile: str, paths: BookPaths) -> int:
    """Build ``_build/html`` with warnings as errors (``-W -n --keep-going``), re-reading every
    page (``--all``) so a warning is never hidden by the cache. Returns the exit status."""
    if not (paths.book / "_static" / "npm" / ".copied").is_file():
        print(
            "note: book/_static/npm is missing (run `make book-assets`): widgets and math "
            "will not render",
            file=sys.stderr,
        )
    config = write_build_config(profile, paths)
    command = [
        _jupyter_book(),
        "build",
        str(paths.root),
        "--toc",
        str(paths.toc),
        "--config",
        str(config),
        "--path-output",
        str(paths.root),
        "-W",
        "-n",
        "--keep-going",
        "--all",
    ]
    return subprocess.run(command, cwd=paths.root, check=False).returncode


def kernel_environment(
    paths: BookPaths, parallel: int | None, output_root: Path | None = None
) -> dict[str, str]:
    """Variables every kernel gets added to its environment: the params folder its load_config
    reads, no tqdm bars (a saved page would keep an empty progress widget), one Inductor cache
    for every run of the study under ``output_root`` (a configuration's
    compiled graphs serve the next one of the same shapes), and a share of the cores per
    kernel running at once (``parallel``; ``None``: Ray gives each task its own count)."""
    env = {PARAMS_ENV: str(paths.params.resolve()), "TQDM_DISABLE": "1"}
    if output_root is not None:  # always: torch sets a default in any process importing it
        env[INDUCTOR_CACHE_ENV] = str((output_root / ".inductor-cache").resolve())
    if parallel is not None and os.environ.get("OMP_NUM_THREADS") is None:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    return env


def run_book(
    profile: str,
    paths: BookPaths | None = None,
    only: Sequence[str] | None = None,
    jobs: int = 1,
    build: bool = True,
    force: bool | str = False,
    executor: Executor | None = None,
    seeds: Sequence[int] | None = None,
    gpus: str | Sequence[str] | None = None,
    ray: str | None = None,
    runs_per_gpu: int = 1,
) -> Report:
    """Plan, execute, write the toc and (``build``) the book; print what failed. ``force``:
    re-execute every page (True), or (:data:`STALE`) retrain the runs that other training code
    made (:mod:`collapse_utils.code_hash`) and re-execute their pages. ``seeds``
    overrides every configuration's seeds. ``gpus`` (``auto``, ``N``, device ids; see
    :func:`~collapse_utils.book.dispatch.parse_gpus`): one kernel per GPU for the pages that run
    a model (``runs_per_gpu`` per GPU, after a free-memory check), ``jobs`` at a time for the
    others (and for all of them where there is no GPU).
    ``ray`` (``local``, ``auto``, an address): every execution as a Ray task instead. Pages run
    in warm kernels here (:func:`warm_execute`), in a fresh kernel each as Ray tasks; ``executor``
    replaces both (tests). One runner
    per profile at a time: a second one raises :class:`~collapse_utils.storage.LockedError`."""
    paths = paths or BookPaths.repo()
    output_root = profile_output_root(profile, paths.params)
    output_root.mkdir(parents=True, exist_ok=True)
    with locked(output_root / ".runner.lock", f"the {profile} book runner ({output_root})"):
        return _run_book(profile, paths, only, jobs, build, force, executor, seeds, gpus, ray,
                         runs_per_gpu)  # fmt: skip


def timing(report: Report, executing: float, building: float, slowest: int = 5) -> str:
    """Wall time of the run (executing, then dressing and building the book) and its
    ``slowest`` executions by their stamped wall time."""
    seconds = {e.name: stamp_of(e.output).get("seconds") for e in report.executed}
    ranked = sorted(((s, n) for n, s in seconds.items() if s is not None), reverse=True)
    pages = ", ".join(f"{name} {s:.0f} s" for s, name in ranked[:slowest])
    total = executing + building
    return (
        f"wall time {total // 60:.0f} min {total % 60:.0f} s (pages {executing:.0f} s, book "
        f"{building:.0f} s)" + (f"; slowest pages: {pages}" if pages else "")
    )


def stale_pages(plan: Sequence[Execution], paths: BookPaths) -> set[str]:
    """Names of the run pages of ``plan`` whose run is complete and was made by other training
    code than this checkout's."""
    current, stale = training_code_hash(), set()
    for e in (e for e in plan if e.phase == "config"):
        config = load_config(e.parameters["profile"], e.config_id, paths.params,
                             seed=e.parameters.get("seed"))  # fmt: skip
        history = RunFiles(config.run_dir).history
        try:
            record = read_record(history) if history.is_file() else None
        except RecordError:
            continue  # damaged: the page trains it again anyway
        if record is not None and record.status == "complete" and is_stale(record, current):
            stale.add(e.name)
    return stale


def _run_book(
    profile, paths, only, jobs, build, force, executor, seeds, gpus, ray, runs_per_gpu
) -> Report:
    start = time.monotonic()
    plan = build_plan(profile, paths, seeds)
    if only:
        check_ids(only, plan)
    selected = select_executions(plan, only)
    if ray is not None and gpus is not None:
        raise RunnerError("gpus and ray exclude each other: Ray assigns the cluster's GPUs")
    devices = resolve_gpus(gpus)
    if gpus is not None and not devices:
        print(f"note: no GPU found; running {jobs} notebook(s) at a time (--jobs)")
    if runs_per_gpu > 1 and devices:
        for note in check_gpu_memory(devices, runs_per_gpu):
            print(f"note: {note}")
    if ray is not None or jobs > 1 or len(devices) > 1:
        # Parallel runs must not download or decode the same dataset at once.
        configs = [load_config(profile, e.config_id, paths.params) for e in selected if e.config_id]
        for problem in prepare_datasets(configs):
            print(f"data: {problem}", file=sys.stderr)
    parallel = None if ray is not None else jobs + runs_per_gpu * len(devices)
    env = kernel_environment(paths, parallel, profile_output_root(profile, paths.params))
    if force == STALE:
        force = stale_pages(selected, paths)
        env[RETRAIN_STALE] = "1"
        print(f"{len(force)} run page(s) made by other training code: training them again")
    shared = (profile_output_root(profile, paths.params), paths.executed)
    executor = executor or (papermill_execute if ray is not None else warm_execute)
    try:
        report = execute_plan(selected, paths.root, jobs, force, executor, env=env, gpus=devices,
                              ray=ray, shared=shared, runs_per_gpu=runs_per_gpu)  # fmt: skip
    finally:
        shutdown_warm_kernels()  # those of this process (jobs 1); pool workers close theirs
    executed_at = time.monotonic()
    dress_pages(plan, paths)
    write_toc(plan, paths)
    if build:
        report.build_returncode = build_book(profile, paths)
    print(
        f"{len(report.executed)} executed, {len(report.skipped)} up to date, "
        f"{len(report.failed)} failed"
    )
    print(timing(report, executed_at - start, time.monotonic() - executed_at))
    for execution, error in report.failed:
        print(f"FAILED {execution.output.relative_to(paths.root)}: {error}")
    if report.build_returncode:
        print(f"book build failed (exit {report.build_returncode}); see the warnings above")
    elif build:
        print(f"book: {paths.build / 'html' / 'index.html'}")
    return report
