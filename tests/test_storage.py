from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from collapse_utils.analysis.results import load_histories
from collapse_utils.run_record import RecordError
from collapse_utils.storage import (
    DamagedFileError,
    LockedError,
    StorageError,
    cached,
    checksum_path,
    read_json,
    read_torch,
    remove_stale_temp_files,
    verify,
    write_json,
    write_torch,
)
from collapse_utils.training.experiment import run_experiment
from tests.test_train import small


def flip_a_bit(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_written_files_verify_and_a_flipped_bit_is_named(tmp_path):
    path = tmp_path / "weights.pt"
    write_torch(path, torch.arange(100.0))
    assert verify(path) and checksum_path(path).exists()
    assert torch.equal(read_torch(path), torch.arange(100.0))
    flip_a_bit(path)
    assert not verify(path)
    with pytest.raises(DamagedFileError, match=r"weights\.pt: damaged"):
        read_torch(path)


def test_a_file_without_its_checksum_is_not_trusted(tmp_path):
    path = tmp_path / "value.json"
    path.write_text('{"accuracy": 0.5}')  # e.g. written by hand or by an older version
    with pytest.raises(DamagedFileError, match="value.json"):
        read_json(path)
    write_json(path, {"accuracy": 0.5})
    assert read_json(path) == {"accuracy": 0.5}


def test_damaged_cache_is_recomputed_with_a_warning(tmp_path):
    path, calls = tmp_path / "cache.pt", []

    def compute():
        calls.append(1)
        return torch.ones(3)

    assert torch.equal(cached(path, compute), torch.ones(3))
    assert torch.equal(cached(path, compute), torch.ones(3)) and len(calls) == 1
    flip_a_bit(path)
    with pytest.warns(UserWarning, match="cache.pt: damaged.*recomputing"):
        assert torch.equal(cached(path, compute), torch.ones(3))
    assert len(calls) == 2 and verify(path)


def test_stale_temp_files_are_removed(tmp_path):
    (tmp_path / "history.json.123.tmp").write_text("partial")
    assert [p.name for p in remove_stale_temp_files(tmp_path)] == ["history.json.123.tmp"]


def test_complete_run_with_a_damaged_checkpoint_is_trained_again(tmp_path):
    config = small(tmp_path, train={"epochs": 1})
    first = run_experiment(config, progress=False).history
    final = config.run_dir / "final.safetensors"
    final.write_bytes(final.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="final.safetensors: missing or damaged"):
        again = run_experiment(config, progress=False).history
    assert verify(final)
    assert [e.metrics for e in again.evals] == [e.metrics for e in first.evals]


def test_garbage_history_is_named_and_the_run_trained_again(tmp_path):
    config = small(tmp_path, train={"epochs": 1})
    run_experiment(config, progress=False)
    (config.run_dir / "history.json").write_text('{"id": "E2", "evals": [')
    with pytest.warns(UserWarning, match="history.json: damaged or altered"):
        assert run_experiment(config, progress=False).history.status == "complete"


def test_one_changed_character_in_a_history_is_never_read_as_a_result(tmp_path):
    config = small(tmp_path, train={"epochs": 1})
    first = run_experiment(config, progress=False).history
    history = config.run_dir / "history.json"
    text = history.read_text()
    digit = next(i for i, c in enumerate(text) if c.isdigit() and text[i - 1] == ".")
    history.write_text(text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1 :])
    with pytest.raises(RecordError, match="history.json: damaged or altered"):
        load_histories(config.output_root)  # a page fails naming the file
    with pytest.warns(UserWarning, match="history.json: damaged or altered.*training this run"):
        again = run_experiment(config, progress=False).history  # the run retrains
    assert [e.metrics for e in again.evals] == [e.metrics for e in first.evals]
    history.unlink()  # a deleted history: the run is not complete, and trains again
    assert run_experiment(config, progress=False).history.status == "complete"


def test_damaged_resume_state_restarts_the_run_from_the_start(tmp_path):
    config = small(tmp_path, train={"epochs": 1})
    straight = run_experiment(small(tmp_path / "straight", train={"epochs": 1}), progress=False)
    config.run_dir.mkdir(parents=True)
    write_torch(config.run_dir / "resume.pt", {"config_hash": config.config_hash()})
    flip_a_bit(config.run_dir / "resume.pt")
    with pytest.warns(UserWarning, match="resume.pt: damaged.*from the start"):
        resumed = run_experiment(config, progress=False).history
    assert [e.metrics for e in resumed.evals] == [e.metrics for e in straight.history.evals]


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from collapse_utils.run_record import RunFiles
with RunFiles(Path(sys.argv[1])).locked():
    print("locked", flush=True)
    time.sleep(30)
"""


def test_a_second_process_on_the_same_run_is_refused_with_a_clear_message(tmp_path):
    config = small(tmp_path, train={"epochs": 1})
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(config.run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        (config.run_dir / "history.json.999.tmp").write_text("a live writer's temp file")
        with pytest.raises(LockedError, match=rf"seed42 is in use by .*pid {holder.pid}"):
            run_experiment(config, progress=False)
        assert (config.run_dir / "history.json.999.tmp").exists()  # not cleaned up
    finally:
        holder.kill()
        holder.wait()
    assert run_experiment(config, progress=False).history.status == "complete"


def test_a_full_disk_is_named_with_the_folder_and_leaves_no_temp_file(tmp_path, monkeypatch):
    def full_disk(payload, file):
        Path(file).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(StorageError, match=f"{tmp_path}: could not write resume.pt .*GiB free"):
        write_torch(tmp_path / "resume.pt", {"step": 1})
    assert list(tmp_path.iterdir()) == []  # no temp file, no half-written result
