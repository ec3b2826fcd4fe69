"""Attention structure along the WiSE-FT path of a finished run (issue 15).

WiSE-FT (Wortsman et al. 2022) averages the weights of the pre-trained and the fine-tuned image
encoder, θ_α = (1 − α)·θ₀ + α·θ₁. :func:`interpolation_path` builds θ_α for a list of α and
measures at each:

- the four metrics per layer on the metric subset, pooled as the run's ``eval`` says (the
  tracking points' own :func:`~collapse_utils.training.evaluation.snapshot`), and KL to the
  pre-trained attention;
- ``task_acc``: accuracy on the run's evaluation split with the run's trained head;
- ``task_acc_zeroshot_head``: the same images classified by CLIP's text tower from the task's
  class names (so α = 0 is a working classifier);
- ``zs_<dataset>``: zero-shot accuracy on every zero-shot dataset of the profile.

θ_α (:meth:`Endpoints.at`). Full fine-tuning: every weight of the vision tower and the visual
projection, :func:`wise_ft`. LoRA: the adapters scaled by α (``peft.helpers.
rescale_adapter_scale``), then merged — W₀ + α·s·BA is (1 − α)·W₀ + α·(W₀ + s·BA) — and the
visual projection interpolated when it trained. The head is the run's trained head at every α:
its initial weights are random, there is no pre-trained head to move towards.

Results go to ``interpolation.json`` in the run folder (``RunFiles.interpolation``), written
atomically with its checksum and reused while the config hash, the α list, the checkpoint and
that checkpoint's checksum are the same.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
from peft import PeftModel
from peft.helpers import rescale_adapter_scale
from torch import Tensor, nn

from collapse_utils.config import METRICS, RunConfig
from collapse_utils.run_record import RunFiles
from collapse_utils.storage import DamagedFileError, checksum_path, read_json, write_json
from collapse_utils.training.data import ImageSet
from collapse_utils.training.evaluation import (
    accuracy,
    cls_attention,
    evaluate_zeroshot,
    snapshot,
)
from collapse_utils.training.experiment import (
    Setup,
    completed_record,
    load_setup,
    load_weights,
    trainable_state,
)
from collapse_utils.training.model import unwrap_classifier

SCHEMA_VERSION = 1
DEFAULT_ALPHAS = tuple(k / 10 for k in range(11))
CHECKPOINTS = ("best", "final")
TASK = "task"  # the task's evaluation split, scored as one more zero-shot set
_PEFT_PREFIX = "base_model.model."


class RunNotReadyError(RuntimeError):
    """The run has no complete record of this config (not trained, failed, or trained with
    another config); the message names the run folder."""


# --- θ_α ----------------------------------------------------------------------------------


def wise_ft(theta_0: dict[str, Tensor], theta_1: dict[str, Tensor], alpha: float):
    """θ_α = (1 − α)·θ₀ + α·θ₁ for every tensor of θ₀ (both hold the same names). Exact at the
    ends: α = 0 gives θ₀ and α = 1 gives θ₁ bit for bit."""
    assert set(theta_0) == set(theta_1), sorted(set(theta_0) ^ set(theta_1))
    return {name: (1 - alpha) * theta_0[name] + alpha * theta_1[name] for name in theta_0}


def pretrained_state(base_clip: nn.Module) -> dict[str, Tensor]:
    """θ₀: the pre-trained vision tower and visual projection, named as in the classifier."""
    return {
        f"{part}.{name}": value
        for part in ("vision_model", "visual_projection")
        for name, value in getattr(base_clip, part).state_dict().items()
    }


@dataclass
class Endpoints:
    """A run at both ends of the path: ``setup.model`` holds the checkpoint (LoRA: its adapters,
    scaled by :meth:`at`); ``theta_0`` and ``theta_1`` hold the pre-trained and trained values of
    every other tensor the run trained except the head (classifier names), which :meth:`at`
    interpolates."""

    setup: Setup
    theta_0: dict[str, Tensor]
    theta_1: dict[str, Tensor]

    @property
    def lora(self) -> bool:
        return isinstance(self.setup.model, PeftModel)

    def at(self, alpha: float) -> nn.Module:
        """The plain classifier (LoRA merged) at α. Full FT: ``setup.model`` itself, loaded
        with θ_α; LoRA: a merged copy with the adapters scaled by α."""
        model = self.setup.model
        if self.lora:
            with rescale_adapter_scale(model, float(alpha)):
                model = unwrap_classifier(model)  # a copy, adapters merged at α
        model.load_state_dict(wise_ft(self.theta_0, self.theta_1, alpha), strict=False)
        return model


def load_endpoints(config: RunConfig, checkpoint: str = "best") -> tuple[Endpoints, Tensor]:
    """The run's setup with ``checkpoint`` loaded, and the pre-trained [CLS] attention on the
    metric subset (the reference of KL). Raises :class:`RunNotReadyError` unless the run is
    complete with this config."""
    _check(config, checkpoint)
    if completed_record(config) is None:
        raise _not_ready(config)
    setup = load_setup(config)
    initial = cls_attention(setup.model, setup.metric_images, setup.eval_dtype)
    load_weights(getattr(setup.files, checkpoint), setup)
    trained = trainable_state(setup.model, config.train.method)
    # Every trained tensor but the adapters (scaled instead) and the head, classifier names.
    plain = {n.removeprefix(_PEFT_PREFIX): v for n, v in trained.items() if "lora_" not in n}
    moving = {n: v.detach().clone() for n, v in plain.items() if not n.startswith("head.")}
    pretrained = pretrained_state(setup.base_clip)  # never modified: merged_clip copies it
    theta_0 = {n: pretrained[n] for n in moving}
    return Endpoints(setup, theta_0, moving), initial


def _check(config: RunConfig, checkpoint: str) -> None:
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {CHECKPOINTS}, got {checkpoint!r}")
    if config.train.method == "none":
        raise ValueError(f"{config.id} trains nothing (method none): there is no path")


def _not_ready(config: RunConfig) -> RunNotReadyError:
    return RunNotReadyError(
        f"{config.run_dir.resolve()}: no complete run of {config.id} with config hash "
        f"{config.config_hash()}; train it first (run_experiment)"
    )


# --- the record -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PathPoint:
    """What one α measured: per-layer metrics and KL(pre-trained ‖ θ_α) of the [CLS] rows
    (nats), accuracies as fractions, and the seconds it took."""

    alpha: float
    metrics: dict[str, list[float]]
    kl_to_initial: list[float]
    task_acc: float
    task_acc_zeroshot_head: float
    zeroshot: dict[str, float]
    seconds: float


@dataclass(frozen=True)
class InterpolationRecord:
    """``interpolation.json``: which run, checkpoint and α, and one :class:`PathPoint` per α."""

    run: str
    seed: int
    method: str
    dataset: str
    config_hash: str
    checkpoint: str
    weights_sha256: str
    eval_split: str  # what task accuracy is measured on: test ('original' split) or validation
    alphas: list[float]
    points: list[PathPoint]
    schema_version: int = SCHEMA_VERSION

    def table(self) -> pd.DataFrame:
        """One row per α: ``alpha``, the layer means of the metrics and of ``kl_to_initial``,
        ``task_acc``, ``task_acc_zeroshot_head``, ``zs_<dataset>``."""
        rows = []
        for p in self.points:
            row: dict[str, float] = {"alpha": p.alpha}
            row.update({m: _mean(p.metrics[m]) for m in METRICS})
            row["kl_to_initial"] = _mean(p.kl_to_initial)
            row["task_acc"] = p.task_acc
            row["task_acc_zeroshot_head"] = p.task_acc_zeroshot_head
            row.update({f"zs_{name}": acc for name, acc in p.zeroshot.items()})
            rows.append(row)
        return pd.DataFrame(rows)

    def layers(self, metric: str = "entropy") -> pd.DataFrame:
        """``metric`` per layer: index ``alpha``, columns the layers (1-based)."""
        values = [p.metrics[metric] for p in self.points]
        frame = pd.DataFrame(values, index=pd.Index(self.alphas, name="alpha"))
        frame.columns = pd.RangeIndex(1, frame.shape[1] + 1, name="layer")
        return frame

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InterpolationRecord:
        points = [PathPoint(**p) for p in data["points"]]
        return cls(**{**data, "points": points})


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _key(config: RunConfig, alphas: tuple[float, ...], checkpoint: str) -> dict[str, Any]:
    """What a stored path must match to be reused."""
    weights = checksum_path(getattr(RunFiles(config.run_dir), checkpoint))
    return {
        "schema_version": SCHEMA_VERSION,
        "config_hash": config.config_hash(),
        "alphas": list(alphas),
        "checkpoint": checkpoint,
        "weights_sha256": weights.read_text().strip() if weights.exists() else "",
    }


def stored_path(config: RunConfig, alphas=None, checkpoint: str = "best"):
    """The stored :class:`InterpolationRecord` of these inputs, or None (absent, another
    config's, α list's or checkpoint's, or damaged: named in a warning)."""
    _check(config, checkpoint)
    path = RunFiles(config.run_dir).interpolation
    if not path.exists():
        return None
    try:
        data = read_json(path)
    except DamagedFileError as err:
        warnings.warn(f"{err}; measuring the path again", stacklevel=2)
        return None
    key = _key(config, _alphas(alphas, config), checkpoint)
    if any(data.get(field) != value for field, value in key.items()):
        return None
    return InterpolationRecord.from_dict(data)


def _alphas(alphas, config: RunConfig) -> tuple[float, ...]:
    """``alphas``, or (None) ``eval.interpolation_points`` evenly spaced from 0 to 1."""
    if alphas is None:
        n = config.eval.interpolation_points
        alphas = DEFAULT_ALPHAS if n == len(DEFAULT_ALPHAS) else [k / (n - 1) for k in range(n)]
    values = tuple(round(float(a), 10) for a in alphas)
    if not values or not all(math.isfinite(a) for a in values):
        raise ValueError(f"alphas must be a non-empty list of finite numbers, got {alphas!r}")
    return values


# --- measuring ------------------------------------------------------------------------------


def interpolation_path(
    config: RunConfig, alphas=None, checkpoint: str = "best", progress: bool = False
) -> pd.DataFrame:
    """The WiSE-FT path of a complete run (module docstring): one row per α (default:
    ``eval.interpolation_points`` from 0 to 1), see :meth:`InterpolationRecord.table`."""
    return measure_path(config, alphas, checkpoint, progress).table()


def measure_path(
    config: RunConfig, alphas=None, checkpoint: str = "best", progress: bool = False
) -> InterpolationRecord:
    """The stored path of these inputs, else measured under the run folder's lock and
    written to ``interpolation.json``."""
    alphas = _alphas(alphas, config)
    record = stored_path(config, alphas, checkpoint)  # checks the checkpoint name too
    if record is not None:
        return record
    files = RunFiles(config.run_dir)
    if not files.history.exists():
        raise _not_ready(config)  # before the lock, which would create the folder
    with files.locked():
        record = stored_path(config, alphas, checkpoint)  # another process may have written it
        if record is None:
            record = _measure(config, alphas, checkpoint, progress)
            write_json(files.interpolation, record.to_dict())
    return record


def _measure(config, alphas, checkpoint, progress) -> InterpolationRecord:
    key = _key(config, alphas, checkpoint)
    ends, initial = load_endpoints(config, checkpoint)
    setup = ends.setup
    # The task's evaluation split with its class names, for the zero-shot text head.
    task = ImageSet(config.data.dataset, setup.val[0], setup.val[1].cpu(), setup.class_names)
    sets = {**setup.test_sets, TASK: task}
    points = []
    for alpha in alphas:
        started = time.perf_counter()
        model = ends.at(alpha)
        snap = snapshot(model, setup.metric_images, initial, 0, setup.eval_dtype, config.eval)
        # The path is scored as the run's zero-shot was (eval.zeroshot_weights), once.
        scored = evaluate_zeroshot(model, setup.base_clip, config, sets, trained_too=False)
        zeroshot = {n: r.accuracy for n, r in scored.items()}
        points.append(
            PathPoint(
                alpha=alpha,
                metrics=snap.metrics,
                kl_to_initial=snap.kl_to_initial,
                task_acc=accuracy(model, *setup.val, setup.eval_dtype),
                task_acc_zeroshot_head=zeroshot.pop(TASK),
                zeroshot=zeroshot,
                seconds=time.perf_counter() - started,
            )
        )
        if progress:
            print(f"{config.id} α={alpha:g}: {points[-1].seconds:.1f} s")
    return InterpolationRecord(
        run=config.id,
        seed=config.seed,
        method=config.train.method,
        dataset=config.data.dataset,
        config_hash=key["config_hash"],
        checkpoint=checkpoint,
        weights_sha256=key["weights_sha256"],
        eval_split="test" if config.data.split == "original" else "validation",
        alphas=list(alphas),
        points=points,
    )
