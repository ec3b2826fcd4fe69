from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import nbformat
import pytest
import yaml

from collapse_utils.__main__ import main
from collapse_utils.book import runner
from collapse_utils.book.runner import (
    AFTER_METHOD,
    METADATA_KEY,
    PROFILE_NOTEBOOKS,
    RUN_NOTEBOOK,
    BookPaths,
    RunnerError,
    build_plan,
    dress_page,
    longest_first,
    run_book,
    stamp_of,
    write_build_config,
)
from collapse_utils.code_hash import PACKAGE_ROOT, RETRAIN_STALE, TRAINING_CODE, training_code_hash
from collapse_utils.config import (
    PARAMS_DIR,
    ConfigError,
    available_experiments,
    config_seeds,
    load_config,
    profile_experiments,
    profile_output_root,
)
from collapse_utils.families import FAMILIES_FILE, load_families
from collapse_utils.storage import LockedError, locked
from tests.fake_records import LAYERS, record, write_records

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = load_families()
FAMILY_NOTEBOOKS = {name: family.notebook for name, family in FAMILIES.items()}
NOTEBOOK_STEMS = [RUN_NOTEBOOK, *FAMILY_NOTEBOOKS.values(), *PROFILE_NOTEBOOKS]


def make_book(
    root: Path, experiments: tuple[str, ...] | None = ("E2", "E4", "A1_lr1e-4"), failing=()
) -> BookPaths:
    """A book in ``root``: fixture notebooks under every planned name (09_explore with a widget,
    ``failing`` ones raising), the real profiles, families and ``experiments`` (``None``: the
    real params folder), the real _config.yml and pages."""
    notebooks = root / "notebooks"
    notebooks.mkdir()
    for stem in NOTEBOOK_STEMS:
        fixture = "widget_page.ipynb" if stem == "09_explore" else "glue_page.ipynb"
        fixture = "raises.ipynb" if stem in failing else fixture
        shutil.copy(FIXTURES / fixture, notebooks / f"{stem}.ipynb")
    params = PARAMS_DIR
    if experiments is not None:
        params = root / "params"
        (params / "experiments").mkdir(parents=True)
        shutil.copytree(PARAMS_DIR / "profiles", params / "profiles")
        shutil.copy(PARAMS_DIR / FAMILIES_FILE, params / FAMILIES_FILE)
        for i in experiments:
            shutil.copy(PARAMS_DIR / "experiments" / f"{i}.yaml", params / "experiments")
    book = root / "book"
    (book / "_static").mkdir(parents=True)
    for page in (
        "intro.md",
        "method.md",
        "_static/widgets-requirejs-config.js",
        "_static/book.css",
    ):
        shutil.copy(REPO / "book" / page, book / page)
    shutil.copy(REPO / "_config.yml", root / "_config.yml")
    return BookPaths(root=root, notebooks=notebooks, params=params, book=book)


class FakeExecutor:
    """Stands in for papermill: copies the source to the output and records the call."""

    def __init__(self):
        self.calls: list[str] = []
        self.envs: list[dict] = []

    def __call__(self, execution, cwd, env):
        nbformat.write(nbformat.read(execution.source, as_version=4), execution.output)
        self.calls.append(execution.name)
        self.envs.append(dict(env))
        return None


def fake_run(paths: BookPaths, **kwargs) -> tuple[runner.Report, list[str]]:
    fake = FakeExecutor()
    report = run_book("smoke", paths, build=False, executor=fake, **kwargs)
    return report, fake.calls


# --- plan -------------------------------------------------------------------------------------


def test_every_family_has_a_notebook_and_every_experiment_a_family():
    for stem in FAMILY_NOTEBOOKS.values():
        assert (REPO / "notebooks" / f"{stem}.ipynb").is_file(), stem
    families = {load_config("smoke", i).family for i in available_experiments()}
    assert families == set(FAMILIES)


def test_plan_runs_each_family_notebook_per_run_then_summaries_then_study_notebooks(tmp_path):
    paths = make_book(tmp_path, experiments=None)
    plan = build_plan("smoke", paths)
    runs = [(i, seed) for i in profile_experiments("smoke") for seed in config_seeds("smoke", i)]
    assert len(runs) == 23 + 16 * 2  # the report's configurations; Study B's corner × 2 seeds
    n = len(runs)
    assert len(plan) == n + len(FAMILIES) + len(PROFILE_NOTEBOOKS)
    assert [e.phase for e in plan] == (
        ["config"] * n + ["summary"] * len(FAMILIES) + ["profile"] * len(PROFILE_NOTEBOOKS)
    )

    configs = [e for e in plan if e.phase == "config"]
    assert sorted((e.config_id, e.parameters.get("seed", 42)) for e in configs) == sorted(runs)
    for e in configs:
        stem = FAMILY_NOTEBOOKS[load_config("smoke", e.config_id).family]
        assert e.source == paths.notebooks / "run.ipynb"  # one run notebook, the family's folder
        several = "seed" in e.parameters
        name = f"{e.config_id}_s{e.parameters['seed']}" if several else e.config_id
        assert e.output == paths.book / "executed" / stem / f"{name}.ipynb"
        assert e.parameters == {"profile": "smoke", "config_id": e.config_id} | (
            {"seed": e.parameters["seed"]} if several else {}
        )
        assert e.grouped == (stem == "13_study_b")
    assert len({e.key for e in configs}) == n

    summaries = [e for e in plan if e.phase == "summary"]
    assert [e.family for e in summaries] == list(FAMILIES)
    assert all(e.parameters == {"profile": "smoke"} for e in summaries)
    for e in summaries:
        assert e.source == paths.notebooks / f"{FAMILY_NOTEBOOKS[e.family]}.ipynb"
    assert all(e.output.name == "summary.ipynb" for e in summaries)

    study = [e for e in plan if e.phase == "profile"]
    assert [e.source.stem for e in study] == list(PROFILE_NOTEBOOKS)
    assert all(e.parameters == {"profile": "smoke"} for e in study)
    assert study[0].output == paths.book / "executed" / "00_findings.ipynb"

    full = build_plan("full", paths)
    assert not {e.key for e in plan} & {e.key for e in full}


def test_missing_notebook_source_is_named(tmp_path):
    paths = make_book(tmp_path)
    (paths.notebooks / "04_layer_freezing.ipynb").unlink()
    with pytest.raises(RunnerError, match="04_layer_freezing"):
        build_plan("smoke", paths)


# --- skip logic -------------------------------------------------------------------------------


def test_second_run_skips_every_current_execution(tmp_path):
    paths = make_book(tmp_path)
    first, calls = fake_run(paths)
    # E2, E4, A1 + 2 family summaries + 4 study notebooks
    assert len(calls) == 3 + 2 + len(PROFILE_NOTEBOOKS) and first.ok
    stamp = stamp_of(paths.executed / "02_full_ft_vs_lora" / "E2.ipynb")
    assert stamp["status"] == "ok" and stamp["parameters"]["config_id"] == "E2"

    second, calls = fake_run(paths)
    assert calls == [] and len(second.skipped) == 3 + 2 + len(PROFILE_NOTEBOOKS)


def test_an_edit_to_a_pages_module_reruns_that_page_and_no_other(tmp_path):
    library = tmp_path / "collapse_utils"
    shutil.copytree(PACKAGE_ROOT, library, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "book").mkdir()
    paths = dataclasses.replace(make_book(tmp_path / "book"), library=library)
    for stem in NOTEBOOK_STEMS:  # the real notebooks: their imports name the page modules
        shutil.copy(REPO / "notebooks" / f"{stem}.ipynb", paths.notebooks)
    fake_run(paths)
    page = library / "book" / "interpolation_page.py"
    page.write_text(page.read_text().replace("frontier(runs.paths),", "frontier(runs.paths),  # x"))
    _, calls = fake_run(paths)
    assert calls == ["11_interpolation"]
    metrics = library / "measurement" / "metrics.py"  # training code: its runs go stale instead
    metrics.write_text(metrics.read_text() + "\n# edited\n")
    assert fake_run(paths)[1] == []
    tables = library / "book" / "tables.py"  # the one formatter of every page with tables
    tables.write_text(tables.read_text() + "\n# edited\n")
    calls = fake_run(paths)[1]
    assert len(calls) == 3 + 2 + len(PROFILE_NOTEBOOKS)  # every page, the explorer's too


def test_stale_retrains_only_the_runs_other_training_code_made(tmp_path):
    paths = make_book(tmp_path)
    made = {"E2": "0ld", "E4": training_code_hash()}  # E2 by other training code
    records = [
        dataclasses.replace(record(load_config("smoke", i, paths.params), [0.0] * LAYERS),
                            versions={TRAINING_CODE: code})
        for i, code in made.items()
    ]  # fmt: skip
    write_records(profile_output_root("smoke", paths.params), records)
    fake_run(paths)
    assert runner.stale_pages(build_plan("smoke", paths), paths) == {"02_full_ft_vs_lora/E2"}
    fake = FakeExecutor()
    run_book("smoke", paths, build=False, executor=fake, force=runner.STALE)
    assert fake.calls == ["02_full_ft_vs_lora/E2"]  # its readers follow once it is retrained
    assert fake.envs[0][RETRAIN_STALE] == "1"  # the kernel's run_experiment trains it again
    assert fake_run(paths)[1] == []  # plain runs leave stale runs as they are


def test_pages_run_longest_first_by_their_last_time_else_by_their_work(tmp_path):
    paths = make_book(tmp_path, experiments=None)  # the real params: every configuration
    plan = build_plan("smoke", paths)
    runs = longest_first([e for e in plan if e.phase == "config"], str(paths.params))
    assert runs[0].config_id.startswith("B_b16")  # 196 patches × 3 epochs: the most work
    assert runs[-1].config_id.startswith("E1_")  # the baselines train nothing
    later = [e for e in plan if e.phase != "config"]
    assert longest_first(later)[0].source.stem == "11_interpolation"  # the one model page
    fake_run(paths, only=["E2"])
    e2 = next(e for e in plan if e.config_id == "E2")
    assert longest_first(plan[-3:] + [e2], str(paths.params))[0] is e2  # stamped seconds first


def test_the_run_prints_its_wall_time_and_its_slowest_pages(tmp_path, capsys):
    paths = make_book(tmp_path)
    report, _ = fake_run(paths)
    seconds = stamp_of(paths.executed / "02_full_ft_vs_lora" / "E2.ipynb")["seconds"]
    assert isinstance(seconds, float) and 0 <= seconds < 60
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("wall time"))
    assert line.split("slowest pages: ")[1].count(" s") == 5  # five pages, slowest first
    assert runner.timing(report, 200.4, 70).startswith(
        "wall time 4 min 30 s (pages 200 s, book 70 s)"
    )


def test_changed_config_reruns_its_page_every_summary_and_the_study_notebooks(tmp_path):
    # Summaries compare against other families' runs (E2, E5), so every summary depends on all.
    paths = make_book(tmp_path)
    fake_run(paths)
    experiment = paths.params / "experiments" / "E4.yaml"
    experiment.write_text(experiment.read_text().replace("rank: 4", "rank: 2"))

    _, calls = fake_run(paths)
    # The run page first; then the pages that read runs, together, the model page first.
    assert calls[:2] == ["02_full_ft_vs_lora/E4", "11_interpolation"]
    assert sorted(calls[1:]) == sorted(
        ["02_full_ft_vs_lora/summary", "03_lr_sweep/summary", *PROFILE_NOTEBOOKS]
    )


def test_a_run_that_changed_on_disk_reruns_the_pages_that_read_it(tmp_path):
    # E.g. a failed configuration fixed and re-run: its summary must stop saying it is missing.
    paths = make_book(tmp_path)
    fake_run(paths)
    config = load_config("smoke", "E2", paths.params)
    config.run_dir.mkdir(parents=True)
    (config.run_dir / "history.json").write_text('{"status": "complete"}')

    _, calls = fake_run(paths)
    assert sorted(calls) == sorted(
        ["02_full_ft_vs_lora/summary", "03_lr_sweep/summary", *PROFILE_NOTEBOOKS]
    )
    _, calls = fake_run(paths)
    assert calls == []


def test_a_second_runner_on_the_same_profile_is_refused(tmp_path):
    paths = make_book(tmp_path)
    output_root = load_config("smoke", "E2", paths.params).output_root
    Path(output_root).mkdir(parents=True)
    with locked(Path(output_root) / ".runner.lock", "held by this test"):
        with pytest.raises(
            LockedError, match=r"the smoke book runner .* is in use by another process \(pid \d+\)"
        ):
            fake_run(paths)
    assert fake_run(paths)[0].ok


def test_changed_notebook_reruns_only_its_executions(tmp_path):
    paths = make_book(tmp_path)
    fake_run(paths)
    for stem, expected in (
        ("03_lr_sweep", ["03_lr_sweep/summary"]),  # the family's analysis only
        ("run", ["02_full_ft_vs_lora/E2", "02_full_ft_vs_lora/E4", "03_lr_sweep/A1_lr1e-4"]),
    ):
        source = paths.notebooks / f"{stem}.ipynb"
        nb = nbformat.read(source, as_version=4)
        nb.cells.append(nbformat.v4.new_markdown_cell("One more paragraph."))
        nbformat.write(nb, source)
        _, calls = fake_run(paths)
        assert sorted(calls) == expected, stem


def test_failed_deleted_or_unstamped_outputs_rerun(tmp_path):
    paths = make_book(tmp_path)
    fake_run(paths)
    failed = paths.executed / "02_full_ft_vs_lora" / "E2.ipynb"
    nb = nbformat.read(failed, as_version=4)
    nb.metadata[METADATA_KEY]["status"] = "failed"
    nbformat.write(nb, failed)
    (paths.executed / "02_full_ft_vs_lora" / "E4.ipynb").unlink()
    unstamped = paths.executed / "08_statistics.ipynb"
    nb = nbformat.read(unstamped, as_version=4)
    del nb.metadata[METADATA_KEY]
    nbformat.write(nb, unstamped)

    _, calls = fake_run(paths)
    assert calls == ["02_full_ft_vs_lora/E2", "02_full_ft_vs_lora/E4", "08_statistics"]
    _, calls = fake_run(paths, force=True)
    assert len(calls) == 3 + 2 + len(PROFILE_NOTEBOOKS)


def test_only_runs_those_configurations_and_their_family_summaries(tmp_path):
    paths = make_book(tmp_path)
    _, calls = fake_run(paths, only=["A1_lr1e-4"])
    assert calls == ["03_lr_sweep/A1_lr1e-4", "03_lr_sweep/summary"]
    toc = yaml.safe_load(paths.toc.read_text())
    assert [p["caption"] for p in toc["parts"]] == ["The study", FAMILIES["lr_sweep"].title]


def test_unknown_only_id_is_an_error_listing_the_available_ids(tmp_path, capsys):
    paths = make_book(tmp_path)
    with pytest.raises(RunnerError, match=r"\['E99'\].*available: A1_lr1e-4, E2, E4"):
        fake_run(paths, only=["E2", "E99"])
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--profile", "smoke", "--only", "E2,nope", "--no-build"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown experiment id(s) ['nope']" in err and "R3_wd0.1" in err


# --- toc and build config ---------------------------------------------------------------------


def test_toc_lists_every_page_with_summaries_first(tmp_path):
    paths = make_book(tmp_path)
    fake_run(paths)
    toc = yaml.safe_load(paths.toc.read_text())
    assert toc["format"] == "jb-book" and toc["root"] == "book/intro"
    files = [[c["file"] for c in part["chapters"]] for part in toc["parts"]]
    assert files == [
        ["book/method", *(f"book/executed/{stem}" for stem in AFTER_METHOD)],
        [
            "book/executed/02_full_ft_vs_lora/summary",
            "book/executed/02_full_ft_vs_lora/E2",
            "book/executed/02_full_ft_vs_lora/E4",
        ],
        ["book/executed/03_lr_sweep/summary", "book/executed/03_lr_sweep/A1_lr1e-4"],
        [f"book/executed/{stem}" for stem in PROFILE_NOTEBOOKS if stem not in AFTER_METHOD],
    ]
    titles = {c["file"]: c.get("title") for part in toc["parts"] for c in part["chapters"]}
    assert titles["book/executed/02_full_ft_vs_lora/E4"] == "E4: LoRA r=4 EuroSAT"


GRID = """id: G
family: study_b
description: a small grid
grid:
  train.lr: [1.0e-3, 1.0e-2]
  seed: [7, 11]
train: {method: full}
"""


def grid_book(tmp_path: Path) -> BookPaths:
    paths = make_book(tmp_path, experiments=("E2",))
    (paths.params / "experiments" / "G.yaml").write_text(GRID)
    return paths


def test_a_grid_runs_one_page_per_point_and_seed_grouped_under_its_comparison(tmp_path):
    paths = grid_book(tmp_path)
    report, calls = fake_run(paths)
    grid_pages = [c for c in calls if c.startswith("13_study_b/G")]
    assert grid_pages == [
        "13_study_b/G_lr1e-3_s7", "13_study_b/G_lr1e-3_s11",
        "13_study_b/G_lr1e-2_s7", "13_study_b/G_lr1e-2_s11",
    ]  # fmt: skip
    page = next(e for e in report.executed if e.output.stem == "G_lr1e-2_s11")
    assert page.parameters == {"profile": "smoke", "config_id": "G_lr1e-2", "seed": 11}
    assert page.title == "G_lr1e-2_s11: a small grid"

    toc = yaml.safe_load(paths.toc.read_text())
    part = next(p for p in toc["parts"] if p["caption"] == FAMILIES["study_b"].title)
    [chapter] = part["chapters"]  # the analysis alone: "Next" from it leaves the family
    assert chapter == {"file": "book/executed/13_study_b/summary",
                       "title": f"{FAMILIES['study_b'].title}: the runs compared"}  # fmt: skip
    assert toc["parts"][-1]["caption"] == "Run pages"  # the grid's pages, listed last
    [index] = toc["parts"][-1]["chapters"]
    assert index["file"] == "book/executed/13_study_b/runs"
    assert [s["file"].rsplit("/", 1)[1] for s in index["sections"]] == [
        "G_lr1e-3_s7", "G_lr1e-3_s11", "G_lr1e-2_s7", "G_lr1e-2_s11"
    ]  # fmt: skip
    listing = (paths.root / "book/executed/13_study_b/runs.md").read_text()
    assert "[G_lr1e-2_s11: a small grid](G_lr1e-2_s11.ipynb)" in listing
    assert "(summary.ipynb)" in listing


def test_only_takes_a_run_name_or_every_seed_of_an_id_and_seeds_override(tmp_path):
    paths = grid_book(tmp_path)
    _, calls = fake_run(paths, only=["G_lr1e-2_s11"])
    assert calls == ["13_study_b/G_lr1e-2_s11", "13_study_b/summary"]
    _, calls = fake_run(paths, only=["G_lr1e-3"])  # the summary is up to date by now
    assert calls == ["13_study_b/G_lr1e-3_s7", "13_study_b/G_lr1e-3_s11"]
    _, calls = fake_run(paths, only=["G_lr1e-3"], seeds=[1, 2, 3])
    assert calls[:3] == [f"13_study_b/G_lr1e-3_s{k}" for k in (1, 2, 3)]
    with pytest.raises(RunnerError, match=r"\['G_lr1e-3_s99'\]"):
        fake_run(paths, only=["G_lr1e-3_s99"])


def test_a_bad_grid_point_fails_the_plan_before_anything_runs(tmp_path):
    paths = grid_book(tmp_path)
    (paths.params / "experiments" / "G.yaml").write_text(GRID.replace("1.0e-2]", "-1.0]"))
    fake = FakeExecutor()
    with pytest.raises(ConfigError, match="G.yaml: field 'train.lr' must be in"):
        run_book("smoke", paths, build=False, executor=fake)
    assert fake.calls == [] and not paths.executed.exists()


def test_toc_leaves_out_pages_executed_for_another_profile_or_config(tmp_path):
    paths = make_book(tmp_path)
    fake_run(paths)
    run_book("full", paths, build=False, executor=FakeExecutor(), only=["E2"])
    files = [
        c["file"] for p in yaml.safe_load(paths.toc.read_text())["parts"] for c in p["chapters"]
    ]
    assert files == [
        "book/method",
        "book/executed/02_full_ft_vs_lora/summary",
        "book/executed/02_full_ft_vs_lora/E2",
    ]


def test_smoke_build_says_numbers_are_not_findings_and_full_build_does_not(tmp_path):
    paths = make_book(tmp_path)
    smoke = yaml.safe_load(write_build_config("smoke", paths).read_text())
    full = yaml.safe_load(write_build_config("full", paths).read_text())
    assert "not findings" in smoke["html"]["announcement"]
    assert "tiny random" in smoke["html"]["announcement"]
    assert "not findings" not in full["html"]["announcement"]
    assert full["html"]["announcement"].startswith("Built with the <code>full</code> profile")
    assert smoke["execute"]["execute_notebooks"] == "off"
    assert full["title"] == yaml.safe_load((REPO / "_config.yml").read_text())["title"]


# --- page headings and order -------------------------------------------------------------------


def first_markdown(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return next(c.source for c in nb.cells if c.cell_type == "markdown")


def test_run_pages_are_headed_by_their_id_and_family_pages_keep_the_family_intro(tmp_path):
    paths = make_book(tmp_path)
    fake_run(paths)
    e4 = first_markdown(paths.executed / "02_full_ft_vs_lora" / "E4.ipynb")
    assert e4.startswith("# E4: LoRA r=4 EuroSAT\n")
    assert '{.built-with}\nBuilt with `profile = "smoke"`, `config_id = "E4"`' in e4
    assert "[Full fine-tuning vs LoRA (E2–E7)](summary.ipynb)" in e4
    assert "Fixture page" not in e4 and "A tiny notebook" not in e4
    summary = first_markdown(paths.executed / "02_full_ft_vs_lora" / "summary.ipynb")
    assert summary.startswith('# Fixture page\n\n{.built-with}\nBuilt with `profile = "smoke"`')
    assert summary.endswith("A tiny notebook the runner tests execute.")


def test_a_changed_description_reaches_the_heading_without_a_rerun(tmp_path):
    paths = make_book(tmp_path)
    fake_run(paths)
    experiment = paths.params / "experiments" / "E2.yaml"
    experiment.write_text(experiment.read_text().replace("Full FT EuroSAT", "Full FT, EuroSAT"))
    _, calls = fake_run(paths)
    assert calls == []
    heading = first_markdown(paths.executed / "02_full_ft_vs_lora" / "E2.ipynb")
    assert heading.startswith("# E2: Full FT, EuroSAT\n") and heading.count("Built with") == 1


def test_the_injected_parameters_cell_is_hidden_once_and_the_heading_rebuilt_from_the_source(
    tmp_path,
):
    paths = make_book(tmp_path)
    execution = next(e for e in build_plan("smoke", paths) if e.phase == "summary")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Family\n\nIntro."),
        nbformat.v4.new_code_cell('profile = "smoke"', metadata={"tags": ["injected-parameters"]}),
    ]
    assert dress_page(nb, execution, None)
    assert nb.cells[1].metadata["tags"] == ["injected-parameters", "remove-cell"]
    heading = nb.cells[0].source
    assert heading.startswith("# Family\n\n{.built-with}\n") and heading.endswith("\n\nIntro.")
    assert not dress_page(nb, execution, None)  # idempotent


def test_a_failed_page_keeps_one_heading_above_papermills_error_banner(tmp_path):
    paths = make_book(tmp_path)
    execution = next(e for e in build_plan("smoke", paths) if e.config_id == "E4")
    banner = nbformat.v4.new_markdown_cell(
        "An Exception was encountered", metadata={"tags": ["papermill-error-cell-tag"]}
    )
    nb = nbformat.v4.new_notebook()
    nb.cells = [banner, nbformat.v4.new_markdown_cell("# Full fine-tuning vs LoRA\n\nIntro.")]
    dress_page(nb, execution, None)
    sources = [c.source for c in nb.cells]
    assert sources[0].startswith("# E4: LoRA r=4 EuroSAT\n") and sources[1] == banner.source
    assert not [s for s in sources if "Full fine-tuning vs LoRA" in s]


def test_learning_rate_pages_are_listed_by_rate(tmp_path):
    rates = ("A1_lr1e-4", "A1_lr1e-6", "A1_lr5e-5", "A1_lr5e-6")
    paths = make_book(tmp_path, experiments=("E2", *rates))
    fake_run(paths)
    pages = [e.config_id for e in build_plan("smoke", paths) if e.family == "lr_sweep"]
    assert pages == ["A1_lr1e-6", "A1_lr5e-6", "A1_lr5e-5", "A1_lr1e-4", None]
    toc = yaml.safe_load(paths.toc.read_text())
    part = next(p for p in toc["parts"] if p["caption"].startswith("Learning-rate"))
    assert [Path(c["file"]).name for c in part["chapters"]] == [
        "summary",
        "A1_lr1e-6",
        "A1_lr5e-6",
        "A1_lr5e-5",
        "A1_lr1e-4",
    ]


# --- end to end: papermill and Jupyter Book ---------------------------------------------------


@pytest.mark.slow
def test_failure_is_reported_others_run_and_the_book_shows_the_error_page(tmp_path, capsys):
    paths = make_book(tmp_path, experiments=("E2", "A1_lr1e-4"), failing=("03_lr_sweep",))
    report = run_book("smoke", paths, jobs=2)

    assert not report.ok
    assert [e.name for e, _ in report.failed] == ["03_lr_sweep/summary"]
    assert all("RuntimeError: fixture failure" in error for _, error in report.failed)
    # Both run pages (run.ipynb), E2's family summary, the study pages.
    assert len(report.executed) == 3 + len(PROFILE_NOTEBOOKS)
    out = capsys.readouterr().out
    assert "FAILED book/executed/03_lr_sweep/summary.ipynb: RuntimeError" in out

    failed = nbformat.read(paths.executed / "03_lr_sweep" / "summary.ipynb", as_version=4)
    assert failed.metadata[METADATA_KEY]["status"] == "failed"
    errors = [o for c in failed.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(o.output_type == "error" and o.ename == "RuntimeError" for o in errors)

    # The build itself is clean (-W -n): the failure page renders, glue keys resolve.
    assert report.build_returncode == 0
    html = paths.build / "html"
    page = (html / "book" / "executed" / "02_full_ft_vs_lora" / "E2.html").read_text()
    assert "smoke/E2" in page  # the glued value
    assert "not findings" in page  # the smoke banner
    assert (
        "fixture failure"
        in (html / "book" / "executed" / "03_lr_sweep" / "summary.html").read_text()
    )
    assert (html / "book" / "executed" / "10_reproducibility.html").is_file()

    # Widgets and math load from _static, never from a CDN.
    explore = (html / "book" / "executed" / "09_explore.html").read_text()
    assert "_static/npm/@jupyter-widgets/html-manager/dist/embed-amd.js" in explore
    assert "application/vnd.jupyter.widget-state+json" in explore
    method = (html / "book" / "method.html").read_text()
    assert "_static/npm/mathjax/tex-mml-chtml.js" in method
    for text in (explore, method, page):
        assert not re.search(r"""<(script|link)[^>]+(src|href)="https?://""", text)

    again = run_book("smoke", paths, build=False)
    assert len(again.skipped) == 3 + len(PROFILE_NOTEBOOKS)
    assert len(again.failed) == 1 and not again.executed


@pytest.mark.slow
def test_pages_share_a_warm_kernel_with_a_fresh_namespace_and_a_failure_replaces_it(tmp_path):
    def page(name: str, *sources: str) -> runner.Execution:
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "P"}
        nb.cells = [nbformat.v4.new_code_cell("profile = 'smoke'")]
        nb.cells[0].metadata["tags"] = ["parameters"]
        nb.cells += [nbformat.v4.new_code_cell(s) for s in sources]
        nbformat.write(nb, tmp_path / f"{name}.ipynb")
        source, output = tmp_path / f"{name}.ipynb", tmp_path / f"{name}.out.ipynb"
        return runner.Execution("profile", source, output, {"profile": "smoke"}, "k", name)

    pid = "import os\nprint(os.getpid())"
    first = page("first", "leftover = 1", pid)
    second = page("second", "assert 'leftover' not in dir()", pid)
    failing = page("failing", pid, "raise ValueError('boom')")
    try:
        assert runner.warm_execute(first, tmp_path, {}) is None
        assert runner.warm_execute(second, tmp_path, {}) is None
        assert "ValueError: boom" in runner.warm_execute(failing, tmp_path, {})
        assert runner.warm_execute(first, tmp_path, {}) is None
    finally:
        runner.shutdown_warm_kernels()

    def kernel_pid(execution) -> str:
        cells = nbformat.read(execution.output, as_version=4).cells
        code = [c for c in cells if c.cell_type == "code"]
        return next(o["text"] for c in code for o in c.outputs if o.get("name") == "stdout")

    assert kernel_pid(second) == kernel_pid(failing)  # one kernel for both pages
    assert kernel_pid(first) != kernel_pid(second)  # after the failure: a fresh one
    cells = nbformat.read(second.output, as_version=4).cells
    counts = [c.execution_count for c in cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1))  # numbered as in a fresh kernel


def test_every_list_flag_takes_spaces_commas_or_both_and_refuses_an_empty_item(capsys):
    from collapse_utils.__main__ import parser as cli

    parser = cli()
    for seeds in (["3"], ["1", "2"], ["1,2"], ["1,", "2"]):
        args = parser.parse_args(["run", "--profile", "smoke", "--seeds", *seeds])
        assert args.seeds == ((3,) if seeds == ["3"] else (1, 2))  # --seeds 3 runs seed 3
    args = parser.parse_args(["run", "--profile", "smoke", "--only", "E2", "E4,E5"])
    assert args.only == ["E2", "E4", "E5"]
    args = parser.parse_args(["run", "--profile", "smoke", "--gpus", "0", "1"])
    assert args.gpus == ("0", "1")
    assert parser.parse_args(["run", "--profile", "smoke", "--gpus", "3,"]).gpus == ("3",)
    assert parser.parse_args(["run", "--profile", "smoke", "--gpus", "3"]).gpus == ("#3",)
    for bad in (["--only", ""], ["--only", "E2,,E4"], ["--gpus", "-1,"], ["--seeds", "1", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(["run", "--profile", "smoke", *bad])
        assert exit_info.value.code == 2
        assert f"argument {bad[0]}" in capsys.readouterr().err


def test_one_seed_given_on_the_command_line_is_the_seed_its_pages_train_and_show(tmp_path):
    paths = make_book(tmp_path)
    pages = [e for e in build_plan("smoke", paths, seeds=[3]) if e.phase == "config"]
    assert pages and all(e.parameters["seed"] == 3 for e in pages)
    assert all(e.output.stem == e.config_id for e in pages)  # one seed: the page keeps its name
