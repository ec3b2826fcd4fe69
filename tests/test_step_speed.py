"""The training step's speed mechanisms change how a step runs, never what it computes: hooks
registered once, nothing read back per step, torch.compile, cached frozen work."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import small
from torch import nn

import collapse_utils
import collapse_utils.training.experiment as experiment
import collapse_utils.training.step as step_module
from collapse_utils.training.experiment import run_experiment
from collapse_utils.training.step import StepPlan


def _histories_agree(a, b, tol: float) -> None:
    """Same tracking points; losses, every metric and val accuracy within ``tol``."""
    assert [e.step for e in a.evals] == [e.step for e in b.evals]
    for x, y in zip(a.evals[1:], b.evals[1:], strict=True):
        assert x.train_loss == pytest.approx(y.train_loss, abs=tol)
        for name in x.metrics:
            np.testing.assert_allclose(x.metrics[name], y.metrics[name], atol=tol)
    assert [e.val_acc for e in a.epochs] == pytest.approx([e.val_acc for e in b.epochs], abs=tol)


def test_a_regularized_run_hooks_once_and_reads_nothing_back_between_tracking_points(
    tmp_path, monkeypatch
):
    """APR with a frozen copy: two captures (model and copy) registered before the first step;
    no step registers a hook or calls .item()/.tolist()/.cpu(); reads happen only after the
    steps that track (and at epoch ends)."""
    events: list[str] = []
    real_hook, real_item = nn.Module.register_forward_hook, torch.Tensor.item
    real_tolist, real_cpu = torch.Tensor.tolist, torch.Tensor.cpu
    monkeypatch.setattr(nn.Module, "register_forward_hook",
                        lambda *a, **k: events.append("hook") or real_hook(*a, **k))  # fmt: skip
    project = str(Path(collapse_utils.__file__).parent)

    def reading(real):
        def read(*args, **kwargs):
            # Only our code's reads: CPU AdamW reads its CPU step counter, no device sync.
            if sys._getframe(1).f_code.co_filename.startswith(project):
                events.append("read")
            return real(*args, **kwargs)

        return read

    for name, real in (("item", real_item), ("tolist", real_tolist), ("cpu", real_cpu)):
        monkeypatch.setattr(torch.Tensor, name, reading(real))
    real_call = step_module.TrainingLoss.__call__

    def step(self, batch):
        events.append("step")
        return real_call(self, batch)

    monkeypatch.setattr(step_module.TrainingLoss, "__call__", step)
    train = {"epochs": 2, "batch_size": 8, "evals_per_epoch": 1}  # tracks every 5th step
    config = small(tmp_path, "R1_apr1.0", reg={"reference": "frozen"}, train=train)
    history = run_experiment(config, progress=False).history
    assert history.status == "complete"

    first = events.index("step")
    plan = StepPlan(history.steps_per_epoch, 2, frozenset(), history.steps_per_epoch)
    assert sum(map(plan.tracks, range(1, plan.total_steps + 1))) < plan.total_steps / 2
    n_layers = len(history.evals[0].metrics["entropy"])
    assert events[:first].count("hook") >= 2 * 2 * n_layers  # model + frozen copy, q and k
    steps = [i for i, e in enumerate(events) if e == "step"]
    assert len(steps) == history.total_steps
    for g, (here, after) in enumerate(zip(steps, steps[1:] + [len(events)], strict=True), 1):
        between = events[here + 1 : after]
        reads_allowed = plan.tracks(g) or g % history.steps_per_epoch == 0
        assert reads_allowed or "read" not in between, f"step {g} read a value back"
        # Hooks after a step only from a snapshot's own short-lived capture at tracking points.
        assert reads_allowed or "hook" not in between, f"step {g} registered a hook"


def test_compiled_and_eager_runs_agree_with_a_regularizer(tmp_path):
    """torch.compile (Inductor, on CPU here) of the whole loss, capture hooks included."""
    # One vision layer and APR's cached reference: Inductor's cold compile is most of the cost.
    common = {"reg": {"reference": "cache"}, "model": {"vision_layers": 1, "tiny_hidden": 32}}
    eager = run_experiment(
        small(tmp_path / "eager", "R1_apr1.0", train={"lr": 1e-3}, **common), progress=False
    )
    compiled_config = small(
        tmp_path / "compiled", "R1_apr1.0", train={"lr": 1e-3, "compile": "default"}, **common
    )
    assert compiled_config.config_hash() == eager.config.config_hash()  # how, not what
    compiled = run_experiment(compiled_config, progress=False)
    # Inductor reorders float32 sums: the histories agree to ~1e-5 here; 1e-3 is the bound.
    _histories_agree(compiled.history, eager.history, tol=1e-3)
    assert compiled.history.evals[-1].metrics != eager.history.evals[0].metrics  # it trained


@pytest.mark.parametrize("method", ["linear_probe", "last_block"])
def test_cached_frozen_work_gives_the_history_of_training_through_the_frozen_tower(
    tmp_path, method, monkeypatch
):
    prepared = []
    real = experiment.FrozenInputs.prepare

    def spy(*args, **kwargs):
        prepared.append(real(*args, **kwargs))
        return prepared[-1]

    monkeypatch.setattr(experiment.FrozenInputs, "prepare", spy)
    train = {"method": method, "lr": 1e-2}
    live = run_experiment(
        small(tmp_path / "live", train=train | {"cache_frozen": False}, data={"flip": True}),
        progress=False,
    ).history
    assert not prepared
    cached = run_experiment(small(tmp_path / "cached", train=train, data={"flip": True}),
                            progress=False).history  # fmt: skip
    (frozen,) = prepared
    n_train = live.steps_per_epoch * 16  # batch 16, no short batch in SMALL
    assert frozen.cached.shape[:2] == (2, pytest.approx(n_train, abs=16))  # both orientations
    _histories_agree(cached, live, tol=1e-5)
    assert cached.final_val_acc == live.final_val_acc
    assert cached.evals[-1].train_loss != live.evals[1].train_loss  # the head trained
