"""A notebook finds the same runs wherever it is started: the repository root, notebooks/, any
other folder (papermill CLI), and a kernel started the way Jupyter starts one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from collapse_utils.config import PARAMS_DIR, PARAMS_ENV, REPO_ROOT
from tests.fake_records import histories, write_records

NOTEBOOK = REPO_ROOT / "notebooks" / "10_reproducibility.ipynb"


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> Path:
    """A params copy whose relative output root holds fake runs (beside it, not in any cwd)."""
    root = tmp_path_factory.mktemp("study")
    shutil.copytree(PARAMS_DIR, root / "params")
    write_records(root / "outputs" / "smoke", histories())
    return root / "params"


def _findings(output: Path) -> str:
    """The notebook's finding and conclusion, as Jupyter shows them (Markdown outputs)."""
    notebook = nbformat.read(output, as_version=4)
    texts = [o.get("data", {}).get("text/markdown", "") for c in notebook.cells
             for o in c.get("outputs", [])]  # fmt: skip
    return "".join(t for t in texts if "runs of the smoke profile" in t)


@pytest.mark.slow
# from notebooks/ (as a user runs it) and from an unrelated folder (the repository root is the
# runner's own cwd, exercised by every book test)
@pytest.mark.parametrize("where", ["notebooks", "elsewhere"])
def test_papermill_cli_reads_the_same_runs_from_any_folder(params, tmp_path, where):
    cwd = {"notebooks": NOTEBOOK.parent, "elsewhere": tmp_path}[where]
    output = tmp_path / "out.ipynb"
    env = {**os.environ, PARAMS_ENV: str(params)}
    papermill = [sys.executable, "-m", "papermill", str(NOTEBOOK), str(output)]
    subprocess.run([*papermill, "-p", "profile", "smoke", "--log-level", "ERROR"], cwd=cwd,
                   env=env, check=True, capture_output=True)  # fmt: skip
    findings = _findings(output)
    assert f"{len(histories())} runs of the smoke profile" in findings
    assert str(params.parent / "outputs" / "smoke") in findings


@pytest.mark.slow
def test_a_jupyter_kernel_started_in_notebooks_reads_the_same_runs(params):
    from jupyter_client.manager import start_new_kernel

    env = {**os.environ, PARAMS_ENV: str(params)}
    manager, client = start_new_kernel(kernel_name="python3", cwd=str(NOTEBOOK.parent), env=env)
    try:
        code = (
            "from collapse_utils.config import profile_output_root\n"
            "from collapse_utils.analysis.results import load_histories\n"
            "print(len(load_histories(profile_output_root('smoke'))))"
        )
        reply = client.execute_interactive(code, timeout=60, output_hook=_collect)
        assert reply["content"]["status"] == "ok"
        assert _collect.text.strip() == str(len(histories()))
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def _collect(message) -> None:
    if message["msg_type"] == "stream":
        _collect.text += message["content"]["text"]


_collect.text = ""
