"""Scale-out: one kernel per GPU here (``--gpus``) and the plan as Ray tasks (``--ray``).

The Ray tests start a real local Ray cluster with two declared GPUs (this machine needs none:
Ray assigns ``CUDA_VISIBLE_DEVICES`` by its own count) and run the real smoke notebooks; they
skip where Ray is missing (``make test`` installs the ``cluster`` extra)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest
import torch

from collapse_utils.__main__ import main
from collapse_utils.analysis.results import load_histories
from collapse_utils.book import dispatch
from collapse_utils.book.dispatch import DispatchError, parse_gpus, resolve_gpus
from collapse_utils.book.runner import (
    GPU_NOTEBOOKS,
    INDUCTOR_CACHE_ENV,
    METADATA_KEY,
    BookPaths,
    Execution,
    build_plan,
    execute_and_stamp,
    execute_plan,
    kernel_environment,
    papermill_execute,
    run_book,
    stamp_of,
)
from collapse_utils.config import PARAMS_DIR, PARAMS_ENV, load_config
from collapse_utils.families import FAMILIES_FILE
from collapse_utils.run_record import RunFiles
from collapse_utils.storage import LockedError
from collapse_utils.training.experiment import run_experiment
from tests.test_runner import FakeExecutor, make_book

REPO = Path(__file__).resolve().parent.parent
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="ray is not installed: pip install -e '.[cluster]' (make test installs it)",
)


def overlapping(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def assert_running_executions_had_distinct_devices(attempts: list[dict], devices: set[str]):
    on_gpu = [a for a in attempts if a["device"] is not None]
    assert on_gpu and {a["device"] for a in on_gpu} <= devices
    for i, a in enumerate(on_gpu):
        for b in on_gpu[i + 1 :]:
            if overlapping(a, b):
                assert a["device"] != b["device"], (a, b)


# --- --gpus: parsing ------------------------------------------------------------------------


def test_gpus_option_takes_auto_a_count_or_device_ids(monkeypatch):
    assert parse_gpus("auto") == "auto"
    assert parse_gpus("0,1,3") == ("0", "1", "3") and parse_gpus("3,") == ("3",)
    for bad in ("0", "0,0", ",", "1,,2"):
        with pytest.raises(ValueError):
            parse_gpus(bad)
    # Inside an allocation (Slurm, a container) the visible devices are the ones to share out.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert resolve_gpus("auto") == ("2", "5") and resolve_gpus("1") == ("2",)
    with pytest.raises(DispatchError, match=r"--gpus 3: only 2 GPU\(s\) visible \(2,5\)"):
        resolve_gpus("3")


def test_ray_excludes_jobs_and_gpus_on_the_command_line(capsys):
    for extra in (["--jobs", "2"], ["--gpus", "auto"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["run", "--profile", "smoke", "--ray", *extra, "--no-build"])
        assert exit_info.value.code == 2
        assert f"argument --ray: not allowed with {extra[0]}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--profile", "smoke", "--gpus", "0", "--no-build"])
    assert "device 0 alone: '0,'" in capsys.readouterr().err


# --- --gpus: one kernel per device ----------------------------------------------------------


class SlotRecorder(FakeExecutor):
    """The fake page, run in a pool process: notes the device its kernel would get and when it
    ran (one JSON file per execution in ``log``), long enough for executions to overlap."""

    def __init__(self, log: Path):
        super().__init__()
        self.log = log

    def __call__(self, execution, cwd, env):
        start = time.time()
        time.sleep(0.3)
        super().__call__(execution, cwd, env)
        record = {"name": execution.name, "device": env.get("CUDA_VISIBLE_DEVICES")}
        record |= {"start": start, "end": time.time(), "params": env.get("COLLAPSE_PARAMS_DIR")}
        (self.log / f"{execution.name.replace('/', '__')}.json").write_text(json.dumps(record))
        return None


def test_gpu_slots_run_one_model_page_per_device_and_the_rest_on_cpu_slots(tmp_path):
    (tmp_path / "book").mkdir()
    paths = make_book(tmp_path / "book", experiments=("E2", "E4", "A1_lr1e-4", "A1_lr1e-6"))
    log = tmp_path / "log"
    log.mkdir()
    environ = dict(os.environ)

    report = run_book("smoke", paths, build=False, executor=SlotRecorder(log), gpus="0,1")

    assert report.ok and len(report.executed) == len(build_plan("smoke", paths))
    assert dict(os.environ) == environ  # the runner's own environment never changes
    attempts = {a["name"]: a for a in (json.loads(p.read_text()) for p in log.iterdir())}
    model_pages = {e.name for e in build_plan("smoke", paths) if e.phase == "config"}
    model_pages |= set(GPU_NOTEBOOKS)
    assert {n for n, a in attempts.items() if a["device"] is not None} == model_pages
    assert_running_executions_had_distinct_devices(list(attempts.values()), {"0", "1"})
    assert {a["params"] for a in attempts.values()} == {str(paths.params.resolve())}


def test_runs_per_gpu_makes_k_slots_per_device_after_a_memory_check(tmp_path, monkeypatch):
    # The slots run as every GPU slot does (test_gpu_slots_run_one_model_page_per_device…).
    assert dispatch.LocalSlots(1, ("0", "1"), runs_per_gpu=2).devices == ("0", "0", "1", "1")
    paths = make_book(tmp_path, experiments=("E2",))
    monkeypatch.setattr(dispatch, "gpu_free_memory_gb", lambda device: 30.0)
    # 30 GB free holds two runs of RUN_GPU_MEMORY_GB, not three: refused before anything runs.
    with pytest.raises(DispatchError, match=r"--runs-per-gpu 3 needs about 36 GB .*GPU 0 has 30"):
        run_book("smoke", paths, build=False, executor=FakeExecutor(), gpus="0,", runs_per_gpu=3)
    assert not paths.executed.exists() or not any(paths.executed.rglob("*.ipynb"))
    assert dispatch.check_gpu_memory(("0",), 2) == []  # two fit


def test_runs_per_gpu_needs_gpus_or_ray_and_kernels_share_one_inductor_cache(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["run", "--profile", "smoke", "--runs-per-gpu", "2", "--no-build"])
    assert "--runs-per-gpu: needs --gpus or --ray" in capsys.readouterr().err
    paths = make_book(tmp_path, experiments=("E2",))
    env = kernel_environment(paths, 1, tmp_path / "outputs" / "smoke")
    assert env[INDUCTOR_CACHE_ENV] == str((tmp_path / "outputs/smoke/.inductor-cache").resolve())


DEVICE_PAGE = [
    ("code", 'profile = "smoke"', ["parameters"]),
    ("code", "import json, os, time\n\nstart = time.time()\ntime.sleep(1.5)", []),
    ("code", 'print(json.dumps({"device": os.environ.get("CUDA_VISIBLE_DEVICES"), '
     '"start": start, "end": time.time()}))', []),
]  # fmt: skip


def test_each_kernel_starts_with_its_own_device_and_the_runner_environment_is_untouched(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    source = tmp_path / "device.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Py"}
    nb.cells = [
        nbformat.v4.new_code_cell(text, metadata={"tags": tags}) for _, text, tags in DEVICE_PAGE
    ]
    nbformat.write(nb, source)
    pages = [
        Execution("config", source, tmp_path / "out" / f"run{i}.ipynb", {"profile": "smoke"},
                  key=f"k{i}", title=f"run {i}", family="f", config_id=f"run{i}")
        for i in range(4)
    ]  # fmt: skip
    environ = dict(os.environ)

    report = execute_plan(pages, tmp_path, gpus=("0", "1"), env={"TQDM_DISABLE": "1"})

    assert report.ok and dict(os.environ) == environ
    attempts = []
    for page in pages:
        executed = nbformat.read(page.output, as_version=4)
        attempts.append(json.loads(executed.cells[-1].outputs[0]["text"]))
        assert executed.metadata[METADATA_KEY]["status"] == "ok"
    assert {a["device"] for a in attempts} == {"0", "1"}
    assert_running_executions_had_distinct_devices(attempts, {"0", "1"})
    assert not list((tmp_path / "out").glob(".*"))  # no partial page left


def test_a_training_page_waits_while_an_exiting_kernel_holds_its_run_folder(tmp_path):
    # A retried page can start while the killed attempt's kernel is still exiting.
    paths = make_book(tmp_path)
    page = next(e for e in build_plan("smoke", paths) if e.config_id == "E2")
    run = RunFiles(load_config("smoke", "E2", paths.params).run_dir)
    held, seen_free = threading.Event(), []

    def exiting_kernel():
        with run.locked():
            held.set()
            time.sleep(1.0)

    def executor(execution, cwd, env):
        try:
            with run.locked():
                seen_free.append(True)
        except LockedError:
            seen_free.append(False)
        return FakeExecutor()(execution, cwd, env)

    kernel = threading.Thread(target=exiting_kernel)
    kernel.start()
    held.wait()
    page.output.parent.mkdir(parents=True)
    env = {PARAMS_ENV: str(paths.params)}
    assert execute_and_stamp(page, env, tmp_path, executor) is None
    kernel.join()
    assert seen_free == [True] and stamp_of(page.output)["status"] == "ok"


def test_gpus_auto_without_a_gpu_falls_back_to_jobs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dispatch, "visible_gpus", lambda: ())
    paths = make_book(tmp_path)
    report = run_book("smoke", paths, build=False, executor=FakeExecutor(), gpus="auto")
    assert report.ok
    assert "no GPU found; running 1 notebook(s) at a time (--jobs)" in capsys.readouterr().out


# --- --ray ---------------------------------------------------------------------------------

TWO_SEEDS = {
    "E2": "id: E2\nfamily: full_vs_lora\ndescription: Full FT EuroSAT\n"
    "data: {dataset: eurosat}\ntrain: {method: full, epochs: 1}\nseeds: [1, 2]\n",
    "E4": "id: E4\nfamily: full_vs_lora\ndescription: LoRA r=4 EuroSAT\n"
    "data: {dataset: eurosat}\ntrain: {method: lora, epochs: 1}\nlora: {rank: 4, alpha: 8}\n"
    "seeds: [1]\n",
}
RUNS = [("E2", 1), ("E2", 2), ("E4", 1)]  # three training pages share two GPUs
# Trained here too, as the reference: one seed of each method (what differs between seeds is
# only the seed, which the config carries to the worker like any other setting).
REFERENCE_RUNS = [("E2", 2), ("E4", 1)]


def study_book(root: Path) -> BookPaths:
    """The real notebooks on two configurations × two seeds of the smoke profile."""
    params = root / "params"
    shutil.copytree(PARAMS_DIR / "profiles", params / "profiles")
    shutil.copy(PARAMS_DIR / FAMILIES_FILE, params / FAMILIES_FILE)
    (params / "experiments").mkdir()
    for i, text in TWO_SEEDS.items():
        (params / "experiments" / f"{i}.yaml").write_text(text)
    shutil.copytree(REPO / "book", root / "book", ignore=shutil.ignore_patterns("executed"))
    shutil.copy(REPO / "_config.yml", root / "_config.yml")
    return BookPaths(root=root, notebooks=REPO / "notebooks", params=params, book=root / "book")


class AttemptRecorder:
    """papermill, after noting each attempt (page, worker pid, the worker's
    ``CUDA_VISIBLE_DEVICES``, start and end) in ``log``: the pid is how the test finds the worker
    to kill."""

    def __init__(self, log: Path):
        self.log = log

    def __call__(self, execution, cwd, env):
        record = {"name": execution.output.stem, "pid": os.getpid(), "start": time.time()}
        record["device"] = os.environ.get("CUDA_VISIBLE_DEVICES") if execution.config_id else None
        attempt = self.log / f"{execution.output.stem}.{os.getpid()}.json"
        _write_whole(attempt, record)
        error = papermill_execute(execution, cwd, env)
        _write_whole(attempt, record | {"end": time.time()})
        return error


def _write_whole(path: Path, record: dict) -> None:
    # Replaced at once: the killer thread reads these files while workers write them.
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)


def kill_one_training_worker(paths: BookPaths, log: Path, stop: threading.Event) -> dict:
    """SIGKILL the Ray worker of the first training page seen mid-training (its run folder
    locked: the kernel is inside run_experiment); returns that attempt, ``end`` the kill time."""
    runs = paths.root / "outputs" / "smoke" / "runs"
    while not stop.is_set():
        for attempt in log.glob("E*.json"):
            record = json.loads(attempt.read_text())
            run_id, _, seed = record["name"].partition("_s")  # E4: its one seed's folder
            lock = (runs / run_id).glob(f"seed{seed or '*'}/.lock")
            if next(lock, None) is not None and "end" not in record:
                os.kill(record["pid"], signal.SIGKILL)
                return record | {"end": time.time()}
        time.sleep(0.1)
    raise AssertionError("no training page was seen running")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # The test module's executors travel to the workers by value (workers cannot import tests).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(
        num_cpus=2, num_gpus=2, object_store_memory=80 * 1024**2, include_dashboard=False,
        log_to_driver=False, logging_level="WARNING",
    )  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def studies(ray_cluster, tmp_path_factory):
    """:data:`REFERENCE_RUNS` trained here, one thread as a Ray worker's kernel has, and the plan
    (E2 × seeds 1, 2 and E4, with their family page) through Ray, one Ray worker killed
    mid-training: (local, ray paths, ray report, attempts, killed)."""
    local = study_book(tmp_path_factory.mktemp("local"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for run_id, seed in REFERENCE_RUNS:
            run_experiment(load_config("smoke", run_id, local.params, seed=seed), progress=False)
    finally:
        torch.set_num_threads(threads)

    paths = study_book(tmp_path_factory.mktemp("ray"))
    log = paths.root / "attempts"
    log.mkdir()
    result: dict = {}
    driver = threading.Thread(
        target=lambda: result.update(
            report=run_book(
                "smoke",
                paths,
                only=["E2", "E4"],
                build=False,
                ray="local",
                executor=AttemptRecorder(log),
            )  # fmt: skip
        )
    )
    driver.start()
    stop = threading.Event()
    try:
        killed = kill_one_training_worker(paths, log, stop)
    finally:
        stop.set()
        driver.join()
    attempts = [json.loads(p.read_text()) for p in log.iterdir()]
    return local, paths, result["report"], attempts, killed


def measured(history) -> dict[str, float | None]:
    """What a run measured, without timings: every number by its place in the history."""
    values = {
        "evals": [e.__dict__ for e in history.evals],
        "epochs": [(e.epoch, e.step, e.train_loss, e.val_acc) for e in history.epochs],
        "accuracy": (history.best_val_acc, history.final_val_acc, history.test_acc),
        "zeroshot": {n: z.accuracy for n, z in history.zeroshot.items()},
    }
    flat = {}

    def walk(value, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}")
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")
        else:
            flat[where] = value

    walk(values, "")
    return flat


@needs_ray
def test_ray_runs_give_the_same_histories_as_training_here(studies):
    local, paths, report, _, _ = studies
    assert report.ok, report.failed
    ours = load_histories(paths.root / "outputs" / "smoke")
    theirs = load_histories(local.root / "outputs" / "smoke")
    assert [(h.id, h.seed) for h in ours] == RUNS
    assert [(h.id, h.seed) for h in theirs] == REFERENCE_RUNS
    ours = [h for h in ours if (h.id, h.seed) in REFERENCE_RUNS]
    for a, b in zip(ours, theirs, strict=True):
        ray_values, local_values = measured(a), measured(b)
        assert ray_values.keys() == local_values.keys()
        for where, value in ray_values.items():
            expected = local_values[where]
            close = expected if expected is None else pytest.approx(expected, rel=1e-6, abs=1e-9)
            assert value == close, where


@needs_ray
def test_each_gpu_task_saw_a_distinct_cuda_visible_devices(studies):
    _, _, _, attempts, killed = studies
    finished = [a for a in attempts if "end" in a]
    on_gpu = [*finished, killed]
    assert_running_executions_had_distinct_devices(on_gpu, {"0", "1"})
    assert len({a["device"] for a in finished if a["device"]}) == 2


@needs_ray
def test_a_killed_worker_is_retried_and_leaves_every_run_complete_once(studies):
    _, paths, report, attempts, killed = studies
    assert sorted(e.name for e in report.executed) == sorted(
        f"02_full_ft_vs_lora/{name}" for name in ("E2_s1", "E2_s2", "E4", "summary")
    )
    names = sorted(a["name"] for a in attempts)  # the killed page twice, every other once
    assert names == sorted([killed["name"], "E2_s1", "E2_s2", "E4", "summary"])
    assert len(load_histories(paths.root / "outputs" / "smoke")) == 3  # each (id, seed) once
    leftovers = [*paths.executed.rglob(".*partial*"), *(paths.root / "outputs").rglob("*.tmp")]
    assert leftovers == []
    for page in report.executed:
        assert stamp_of(page.output)["status"] == "ok"


@needs_ray
def test_a_node_that_cannot_see_the_output_folders_is_refused(ray_cluster, tmp_path):
    shared = tmp_path / "outputs"
    with dispatch.RayCluster("local", [shared]) as cluster:  # this node sees it: no error
        [(marker, _)] = cluster._markers
        assert Path(marker).parent == shared.resolve()
        cluster._markers = [(marker, "a token another driver wrote")]
        with pytest.raises(
            DispatchError, match=rf"cannot see the driver.s {shared}: .*every Ray node mounts"
        ):
            cluster._check_nodes(ray_cluster)
