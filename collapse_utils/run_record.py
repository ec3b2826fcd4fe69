"""A run's folder and its record: the one owner of ``history.json`` and of the run's file names.

Every run lives in ``<output_root>/runs/<id>/seed<k>/`` (:class:`RunFiles`). Its
``history.json`` is a :class:`RunRecord`: written by the experiment loop, read by the analysis
and the book, always through this module. No torch import, so analysis code stays light.

Schema (``schema_version`` 1). Layers are 1-based in tables, lists here are per layer in order.

- run: id, family, description, profile, seed, config (``RunConfig.to_dict()``), config_hash,
  status (``running`` | ``complete`` | ``failed``), failure ({step, reason} or null), versions,
  device, steps_per_epoch, total_steps, best_val_acc, final_val_acc (accuracy on the per-epoch
  evaluation split: val, or test in the 'original' split protocol), test_acc (held-out test
  accuracy at the best-val epoch, or null), wall_time_s (s);
- evals: :class:`EvalRecord` at step 0 and ``evals_per_epoch`` times per epoch: step, epoch,
  fraction, train_loss, metrics (metric → per layer), kl_to_initial (per layer, nats) and the
  representation signals against the pre-trained tower (null when not measured): cka (per
  layer), embedding_drift, weight_drift;
- epochs: :class:`EpochRecord` after each epoch;
- zeroshot: dataset → :class:`ZeroShotRecord` after training.

Histories written before the version field have the same fields and load as version 1; fields
added later with a default (test_acc, zero-shot checkpoint, the evals' representation signals)
take it when absent.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from collapse_utils.storage import locked, verify, write_json

SCHEMA_VERSION = 1
STATUSES = ("running", "complete", "failed")


class RecordError(ValueError):
    """A ``history.json`` cannot be read as a run record; the message names the file."""


@dataclass(frozen=True)
class RunFiles:
    """The files of one run folder (seeds never share a folder)."""

    run_dir: Path

    @classmethod
    def of(cls, output_root: Path | str, run_id: str, seed: int) -> RunFiles:
        return cls(Path(output_root) / "runs" / run_id / f"seed{seed}")

    @property
    def history(self) -> Path:
        return self.run_dir / "history.json"

    @property
    def resume(self) -> Path:
        """Optimizer, scheduler, RNG and record after the last checkpointed epoch (torch)."""
        return self.run_dir / "resume.pt"

    @property
    def maps(self) -> Path:
        """[CLS] maps of the first metric images at every eval (safetensors)."""
        return self.run_dir / "attention_maps.safetensors"

    @property
    def best(self) -> Path:
        return self.run_dir / "best.safetensors"

    @property
    def final(self) -> Path:
        return self.run_dir / "final.safetensors"

    def results(self, method: str) -> list[Path]:
        """The files a complete run of ``method`` leaves beside its history (the pre-trained
        baseline saves no weights)."""
        return [self.maps] if method == "none" else [self.maps, self.best, self.final]

    @property
    def tensorboard(self) -> Path:
        return self.run_dir / "tensorboard"

    @property
    def interpolation(self) -> Path:
        """The WiSE-FT path's measurements (``training.interpolation``), JSON."""
        return self.run_dir / "interpolation.json"

    def locked(self) -> AbstractContextManager[None]:
        """Hold this run folder's lock (creating the folder); a second process that asks for it
        gets :class:`~collapse_utils.storage.LockedError` at once, naming folder and pid."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return locked(self.run_dir / ".lock", str(self.run_dir.resolve()))


def find_runs(root: Path | str) -> list[RunFiles]:
    """Every run folder with a ``history.json`` below ``root`` (at any depth), sorted; a missing
    ``root`` gives an empty list."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [RunFiles(p.parent) for p in sorted(root.glob("**/runs/*/seed*/history.json"))]


@dataclass(frozen=True)
class EvalRecord:
    """One tracking point. ``metrics``: metric → per-layer values; ``kl_to_initial``: per-layer
    KL(pre-trained ‖ current) of the [CLS] rows in nats; ``fraction`` of training (0..1);
    ``train_loss``: mean loss since the previous eval (None at step 0).

    Against the pre-trained vision tower, None when not measured: ``cka`` per layer, linear CKA
    of the [CLS] token after each layer (1 = same up to rotation and scale); ``embedding_drift``
    = 1 − mean cosine of the image embeddings; ``weight_drift`` = ‖θ − θ₀‖ / ‖θ₀‖ (LoRA
    merged)."""

    step: int
    epoch: float
    fraction: float
    train_loss: float | None
    metrics: dict[str, list[float]]
    kl_to_initial: list[float]
    cka: list[float] | None = None
    embedding_drift: float | None = None
    weight_drift: float | None = None

    def layer_mean(self, metric: str) -> float:
        """Unweighted mean over layers of ``metric``."""
        return float(np.mean(self.metrics[metric]))


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    step: int
    train_loss: float
    val_acc: float
    samples_per_s: float


@dataclass(frozen=True)
class ZeroShotRecord:
    """Zero-shot top-1 accuracy of the fine-tuned and of the pre-trained vision tower.
    ``weights``: which fine-tuned weights ``accuracy`` scored (``eval.zeroshot_weights``);
    where that is not the trained model (``vision_base``, the report's path),
    ``merged_accuracy`` is the trained model's (adapters merged, trained projection)."""

    accuracy: float
    pretrained_accuracy: float
    templates: str
    n_images: int
    checkpoint: str = "final"  # the fine-tuned weights measured: final or best epoch
    weights: str = "merged"
    merged_accuracy: float | None = None


@dataclass(frozen=True)
class Failure:
    step: int
    reason: str


@dataclass
class RunRecord:
    """What a run did and measured; mutable while the run is training, then written once more
    with ``status='complete'``."""

    id: str
    family: str
    description: str
    profile: str
    seed: int
    config: dict[str, Any]
    config_hash: str
    versions: dict[str, str]
    device: str
    steps_per_epoch: int
    total_steps: int
    status: str = "running"
    failure: Failure | None = None
    evals: list[EvalRecord] = field(default_factory=list)
    epochs: list[EpochRecord] = field(default_factory=list)
    best_val_acc: float | None = None
    final_val_acc: float | None = None
    test_acc: float | None = None  # test accuracy at the best-val epoch ('heldout' split only)
    # accuracy per EuroSAT corruption split at the epoch test is scored at (eval.corruption_images)
    corruption_acc: dict[str, float] = field(default_factory=dict)
    zeroshot: dict[str, ZeroShotRecord] = field(default_factory=dict)
    wall_time_s: float = 0.0
    schema_version: int = SCHEMA_VERSION

    @property
    def method(self) -> str:
        return self.config["train"]["method"]

    @property
    def dataset(self) -> str:
        return self.config["data"]["dataset"]

    @property
    def eval_split(self) -> str:
        """What the per-epoch accuracy is measured on: 'test' under the report's protocol
        (``data.split: original``), else 'validation'."""
        return "test" if self.config["data"].get("split") == "original" else "validation"

    @property
    def label(self) -> str:
        """``id: description`` for legends and captions."""
        return f"{self.id}: {self.description}" if self.description else self.id

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path | str = "<dict>") -> RunRecord:
        """Parse a history; raises :class:`RecordError` naming ``source`` and what is wrong."""
        version = data.get("schema_version", 1)
        if version != SCHEMA_VERSION:
            raise RecordError(
                f"{source}: history schema_version {version} is not {SCHEMA_VERSION}, the one "
                "this collapse_utils reads; re-run the run or use the matching version"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if _is_required(f)}
        missing = sorted(required - set(data))
        if missing:
            raise RecordError(f"{source}: history lacks {missing}")
        values = {k: v for k, v in data.items() if k in names}
        try:
            values["evals"] = [EvalRecord(**e) for e in data.get("evals", [])]
            values["epochs"] = [EpochRecord(**e) for e in data.get("epochs", [])]
            values["zeroshot"] = {
                name: ZeroShotRecord(**z) for name, z in (data.get("zeroshot") or {}).items()
            }
            values["failure"] = Failure(**data["failure"]) if data.get("failure") else None
        except TypeError as err:
            raise RecordError(f"{source}: malformed history record: {err}") from err
        record = cls(**values)
        if record.status not in STATUSES:
            raise RecordError(f"{source}: status {record.status!r} is not one of {STATUSES}")
        return record

    def write(self, path: Path) -> None:
        """Atomically write ``history.json`` (with its checksum)."""
        write_json(path, self.to_dict())


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def read_record(path: Path | str) -> RunRecord:
    """The record in ``path`` (a ``history.json``), after checking it against the checksum
    written with it: a changed, truncated or hand-written history is never read as a result
    (:class:`RecordError` names it; training retrains the run, a page fails naming it)."""
    path = Path(path)
    if not verify(path):
        what = "missing" if not path.exists() else "damaged or altered (checksum missing or wrong)"
        raise RecordError(f"{path.resolve()}: {what}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}: not valid JSON ({err})") from err
    return RunRecord.from_dict(data, path)
