"""``run_experiment(config)``: train one configuration, track attention, evaluate, checkpoint.

The method (report §2.3), in the order the code runs it:

1. **setup** — load the data, the zero-shot test sets and CLIP before anything trains;
2. **references** — the pre-trained [CLS] attention on the fixed metric subset (step 0) and,
   with ``eval.representation``, its [CLS] tokens per layer, image embeddings and vision-tower
   weights; the entropy floor and APR's reference; a baseline run stops here and only evaluates
   zero-shot;
3. **resume or start** — continue after the last checkpointed epoch of the same config hash;
4. **epochs** — AdamW steps (cosine schedule, warmup, clip, mixed precision), the four metrics
   (and CKA, embedding and weight drift) ``evals_per_epoch`` times per epoch, validation
   accuracy and checkpoints after each epoch;
5. **finish** — final weights, zero-shot transfer, the record marked complete.

Everything lives in ``config.run_dir`` (:class:`~collapse_utils.run_record.RunFiles`) and is
written atomically; a killed run resumes bit-identically from its last checkpoint.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from collapse_utils.code_hash import RETRAIN_STALE, is_stale
from collapse_utils.config import ConfigError, RunConfig
from collapse_utils.run_record import (
    EpochRecord,
    EvalRecord,
    Failure,
    RecordError,
    RunFiles,
    RunRecord,
    ZeroShotRecord,
    read_record,
)
from collapse_utils.storage import (
    DamagedFileError,
    read_safetensors,
    read_torch,
    remove,
    remove_stale_temp_files,
    verify,
    write_safetensors,
    write_torch,
)
from collapse_utils.training.data import (
    ImageSet,
    load_corruption_sets,
    load_splits,
    load_test_set,
)
from collapse_utils.training.environment import (
    autocast_dtype,
    device_name,
    package_versions,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from collapse_utils.training.evaluation import (
    Reference,
    Snapshot,
    accuracy,
    evaluate_zeroshot,
    snapshot,
)
from collapse_utils.training.frozen import FrozenInputs
from collapse_utils.training.model import CLIPClassifier, load_clip, prepare_for_training
from collapse_utils.training.step import (
    Batch,
    Optimization,
    RegularizerInputs,
    StepPlan,
    StepSums,
    TrainingLoss,
    Window,
)


class TrainingFailedError(RuntimeError):
    """The run stopped (non-finite loss); ``history.json`` says where and why."""


@dataclass(frozen=True)
class RunResult:
    config: RunConfig
    history: RunRecord

    @property
    def files(self) -> RunFiles:
        return RunFiles(self.config.run_dir)

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir


@dataclass
class Setup:
    """What a run loads before it trains; image tensors are uint8 on ``device``."""

    config: RunConfig
    files: RunFiles
    device: torch.device
    dtype: torch.dtype | None  # autocast while training; None: fp32
    eval_dtype: torch.dtype | None  # for metrics, accuracies, references (eval.precision)
    train: tuple[Tensor, Tensor]  # images (N, 3, S, S), labels (N,)
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor] | None  # scored once at the selected epoch ('heldout' split)
    metric_images: Tensor  # (M, 3, S, S), the fixed metric subset
    metric_images_cpu: Tensor
    class_names: tuple[str, ...]  # of the task, in label order
    test_sets: dict[str, ImageSet]
    corruption: dict[str, ImageSet]  # EuroSAT's corrupted test splits (eval.corruption_images)
    base_clip: nn.Module
    model: nn.Module
    plan: StepPlan


# --- 1. setup -------------------------------------------------------------------------------


def load_setup(config: RunConfig) -> Setup:
    """Everything that can be missing offline is loaded here, before any training."""
    files = RunFiles(config.run_dir)
    remove_stale_temp_files(files.run_dir)  # safe: this process holds the run's lock
    device = resolve_device(config.train.device)
    dtype = autocast_dtype(config.train.precision, device)
    eval_dtype = None if config.eval.precision == "fp32" else dtype
    seed_everything(config.seed)
    splits = load_splits(config.data, config.seed)
    test_sets = {
        name: load_test_set(config.data, name, config.seed, config.eval.zeroshot_max_images)
        for name in config.eval.zeroshot_datasets
    }
    per_split = config.eval.corruption_images
    corruption = load_corruption_sets(config.data, per_split, config.seed) if per_split else {}
    base_clip = load_clip(config.model, seed=config.seed).to(device)
    model_size = base_clip.config.vision_config.image_size
    if model_size != config.data.image_size:
        raise ConfigError(f"field 'data.image_size' is {config.data.image_size} but "
                          f"{config.model.name} takes {model_size} px images")  # fmt: skip
    classifier = CLIPClassifier(base_clip, len(splits.train.class_names), seed=config.seed)
    model = prepare_for_training(classifier, config.train, config.lora).to(device)
    return Setup(
        config, files, device, dtype, eval_dtype,
        train=(splits.train.images.to(device), splits.train.labels.to(device)),
        val=(splits.val.images.to(device), splits.val.labels.to(device)),
        test=None if splits.test is None else (splits.test.images.to(device),
                                               splits.test.labels.to(device)),
        metric_images=splits.metric.images.to(device),
        metric_images_cpu=splits.metric.images,
        class_names=splits.train.class_names,
        test_sets=test_sets,
        corruption=corruption, base_clip=base_clip, model=model,
        plan=StepPlan.of(len(splits.train.images), config.train),
    )  # fmt: skip


def new_record(setup: Setup) -> RunRecord:
    config = setup.config
    return RunRecord(
        id=config.id, family=config.family, description=config.description,
        profile=config.profile, seed=config.seed, config=config.to_dict(),
        config_hash=config.config_hash(), versions=package_versions(),
        device=device_name(setup.device), steps_per_epoch=setup.plan.steps_per_epoch,
        total_steps=setup.plan.total_steps,
    )  # fmt: skip


def eval_record(plan: StepPlan, step: int, train_loss: float | None, snap: Snapshot) -> EvalRecord:
    return EvalRecord(
        step=step,
        epoch=step / max(plan.steps_per_epoch, 1),
        fraction=step / max(plan.total_steps, 1),
        train_loss=train_loss,
        metrics=snap.metrics,
        kl_to_initial=snap.kl_to_initial,
        cka=snap.cka,
        embedding_drift=snap.embedding_drift,
        weight_drift=snap.weight_drift,
    )


class MapLog:
    """[CLS] maps of the first metric images at every eval, for the exploration notebook."""

    def __init__(self, images: Tensor):
        self.images = images.cpu()
        self.steps: list[int] = []
        self.maps: list[Tensor] = []

    def add(self, step: int, maps: Tensor) -> None:
        self.steps.append(step)
        self.maps.append(maps)

    def write(self, path: Path) -> None:
        """safetensors: maps (evals, images, layers, heads, tokens) float16, steps (evals,),
        images (images, 3, S, S) uint8."""
        tensors = {
            "maps": torch.stack(self.maps),
            "steps": torch.tensor(self.steps),
            "images": self.images,
        }
        write_safetensors(path, tensors, {})


# --- the run --------------------------------------------------------------------------------


def run_experiment(config: RunConfig, progress: bool = True) -> RunResult:
    """Run one configuration end to end and return its record.

    A complete run with the same config hash is not retrained (unless the environment sets
    :data:`RETRAIN_STALE` and other training code made it: ``run --stale``); a run with a
    ``resume.pt`` of the same hash continues after its last finished epoch; a changed config
    starts fresh.
    Raises ``TrainingFailedError`` on a non-finite loss (the record says step and reason),
    and fails before training if a dataset or the model cannot be loaded.
    """
    resolve_device(config.train.device)  # an unusable device fails before anything is written
    with RunFiles(config.run_dir).locked():
        done = completed_record(config)
        if done is not None:
            _log(progress, f"{config.id}: complete with hash {done.config_hash}, not retrained")
            return RunResult(config, done)
        return _train(config, progress)


def _train(config: RunConfig, progress: bool) -> RunResult:
    """Steps 1–5 of the module docstring, under the run folder's lock."""
    started = time.perf_counter()
    setup = load_setup(config)
    # 2. references, before any resume so they are never the trained model's
    reference = Reference.of(setup.model, setup.metric_images, setup.eval_dtype,
                             config.eval.representation)  # fmt: skip
    first = _snapshot(setup, reference)
    if config.train.method == "none":
        return _evaluate_baseline(setup, first, started)
    floor = torch.tensor(first.metrics["entropy"], device=setup.device)
    reg = RegularizerInputs.prepare(
        config.reg, setup.model, floor, setup.train[0], setup.eval_dtype
    )
    frozen = None
    if config.train.cache_frozen and config.reg.kind == "none":
        frozen = FrozenInputs.prepare(setup.model, config.train.method, setup.train[0],
                                      config.data.flip, setup.dtype)  # fmt: skip
    loss = TrainingLoss(setup.model, reg, setup.dtype, config.train.compile, frozen)
    opt = Optimization.of(setup.model, config.train, setup.plan.total_steps, setup.dtype)
    # 3. resume or start
    record, maps, start_epoch = _resume(setup, opt, progress)
    if start_epoch == 0:
        record.evals.append(eval_record(setup.plan, 0, None, first))
        maps.add(0, first.maps)
        record.write(setup.files.history)
    # 4. epochs
    loop = _Loop(setup, opt, loss, record, maps, reference, progress)
    for epoch in range(start_epoch, setup.plan.epochs):
        started = loop.train_epoch(epoch, started)
    # 5. finish
    _save_weights(setup.files.final, setup, loop.step)
    record.zeroshot, record.test_acc, record.corruption_acc = final_evaluation(setup)
    loop.close(record)
    return _finish(setup, record, started)


def final_evaluation(
    setup: Setup,
) -> tuple[dict[str, ZeroShotRecord], float | None, dict[str, float]]:
    """Zero-shot transfer of the final or the best epoch's weights (``eval.zeroshot_checkpoint``)
    and, at the epoch val selected, the test accuracy (with a held-out test split) and the
    accuracy per EuroSAT corruption split (``eval.corruption_images``). Leaves the model at the
    best epoch's weights when any of them needs them."""
    config = setup.config
    zeroshot = None
    if config.eval.zeroshot_checkpoint == "final":
        zeroshot = evaluate_zeroshot(setup.model, setup.base_clip, config, setup.test_sets)
    if zeroshot is None or setup.test is not None or setup.corruption:
        load_weights(setup.files.best, setup)
    test_acc = None if setup.test is None else accuracy(setup.model, *setup.test, setup.eval_dtype)
    corruption = {
        name: accuracy(setup.model, images.images.to(setup.device),
                       images.labels.to(setup.device), setup.eval_dtype)
        for name, images in setup.corruption.items()
    }  # fmt: skip
    if zeroshot is None:
        zeroshot = evaluate_zeroshot(setup.model, setup.base_clip, config, setup.test_sets)
    return zeroshot, test_acc, corruption


def _snapshot(setup: Setup, reference: Reference) -> Snapshot:
    spec = setup.config.eval
    return snapshot(setup.model, setup.metric_images, reference, spec.map_images,
                    setup.eval_dtype, spec)  # fmt: skip


def _evaluate_baseline(setup: Setup, first: Snapshot, started: float) -> RunResult:
    """A pre-trained model (method ``none``): its step-0 metrics and zero-shot accuracy."""
    record = new_record(setup)
    record.evals.append(eval_record(setup.plan, 0, None, first))
    maps = MapLog(setup.metric_images_cpu[: setup.config.eval.map_images])
    maps.add(0, first.maps)
    record.zeroshot = evaluate_zeroshot(setup.model, setup.base_clip, setup.config, setup.test_sets)
    maps.write(setup.files.maps)
    return _finish(setup, record, started)


class _Loop:
    """The epoch loop's state: the step counter, the progress bar and TensorBoard.

    A step reads nothing back from the device: loss, accuracy and the regularizer are summed
    there (:class:`StepSums`) and read once per tracking point and at each epoch's end, where
    a non-finite loss is also noticed (the record names the step it first appeared)."""

    def __init__(self, setup, opt, loss, record, maps, reference, progress):
        self.setup, self.opt, self.loss = setup, opt, loss
        self.record, self.maps, self.reference = record, maps, reference
        self.progress = progress
        plan = setup.plan
        self.step = len(record.epochs) * plan.steps_per_epoch
        self.writer = SummaryWriter(setup.files.tensorboard, purge_step=self.step)
        self.bar = tqdm(total=plan.total_steps, initial=self.step, desc=setup.config.id,
                        disable=not progress, unit="step")  # fmt: skip
        if self.step == 0:  # the pre-trained model's point
            write_eval_scalars(self.writer, record.evals[0])

    def train_epoch(self, epoch: int, started: float) -> float:
        """One epoch: steps, tracking points, validation, checkpoint. Returns the time from
        which the next stretch of wall time is counted."""
        setup, plan = self.setup, self.setup.plan
        images, labels = setup.train
        order, flips = epoch_order(len(images), setup.config.seed, epoch, setup.config.data.flip)
        order = order.to(setup.device)
        flips = None if flips is None else flips.to(setup.device)
        sums, epoch_stats = StepSums(setup.device), Window()
        size = setup.config.train.batch_size
        setup.model.train()
        tick = time.perf_counter()
        for local in range(1, plan.steps_per_epoch + 1):
            index = order[(local - 1) * size : local * size]
            batch = Batch.take(images, labels, index, flips)
            loss, logits, penalty = self.loss(batch)
            self.step += 1
            sums.add(self.step, loss, logits, batch.labels, penalty)
            self.opt.step(loss)
            self.bar.update(1)
            if plan.tracks(self.step):
                window = self._read(sums, tick, started)
                epoch_stats.merge(window)
                self._track(window)
                tick = time.perf_counter()
        if sums.seen:  # steps after the epoch's last tracking point (global cadence)
            epoch_stats.merge(self._read(sums, tick, started))
        return self._end_epoch(epoch, epoch_stats, started)

    def _read(self, sums: StepSums, tick: float, started: float) -> Window:
        """The window's sums on the host (the one wait for the device), its training time, and
        TensorBoard's train scalars at this step; a non-finite loss ends the run here."""
        window, failure = sums.read()
        window.seconds = time.perf_counter() - tick
        if failure is not None:
            raise self._failure(*failure, started)
        self.writer.add_scalar("train/loss", window.mean_loss, self.step)
        self.writer.add_scalar("train/accuracy", window.accuracy, self.step)
        self.writer.add_scalar("train/lr", self.opt.lr, self.step)
        if window.penalty is not None:
            self.writer.add_scalar("train/regularizer", window.penalty / window.seen, self.step)
        return window

    def _track(self, window: Window) -> None:
        """A tracking point: the four metrics (and representation signals) on the metric subset,
        maps, TensorBoard."""
        snap = _snapshot(self.setup, self.reference)
        record = eval_record(self.setup.plan, self.step, window.mean_loss, snap)
        self.record.evals.append(record)
        self.maps.add(self.step, snap.maps)
        write_eval_scalars(self.writer, record)
        _log(
            self.progress,
            f"{self.setup.config.id} step {self.step}/{self.setup.plan.total_steps} "
            f"loss {record.train_loss:.4f} train acc {window.accuracy:.3f} "
            f"mean entropy {record.layer_mean('entropy'):.4f}",
        )
        self.record.write(self.setup.files.history)

    def _end_epoch(self, epoch: int, stats: Window, started: float) -> float:
        setup, record = self.setup, self.record
        val_acc = accuracy(setup.model, *setup.val, setup.eval_dtype)
        samples_per_s = stats.seen / stats.seconds
        record.epochs.append(EpochRecord(epoch + 1, self.step, stats.mean_loss, val_acc,
                                         samples_per_s))  # fmt: skip
        self.writer.add_scalar("val/acc", val_acc, self.step)
        self.writer.add_scalar("train/samples_per_s", samples_per_s, self.step)
        _log(self.progress, f"{setup.config.id} epoch {epoch + 1}/{setup.plan.epochs} val acc "
                            f"{val_acc:.4f} ({samples_per_s:.0f} samples/s)")  # fmt: skip
        if record.best_val_acc is None or val_acc > record.best_val_acc:
            record.best_val_acc = val_acc
            _save_weights(setup.files.best, setup, self.step)
        record.final_val_acc = val_acc
        record.wall_time_s = _elapsed(record, started)
        record.write(setup.files.history)
        self.maps.write(setup.files.maps)
        every = setup.config.train.checkpoint_every
        if (epoch + 1) % every == 0 or epoch + 1 == setup.plan.epochs:
            _write_resume(setup, self.opt, record, self.maps, epoch + 1)
        return time.perf_counter()

    def _failure(self, step: int, reason: str, started: float) -> TrainingFailedError:
        """Record the failure in ``history.json`` and return the error to raise."""
        record, path = self.record, self.setup.files.history
        record.status = "failed"
        record.failure = Failure(step, reason)
        record.wall_time_s = _elapsed(record, started)
        record.write(path)
        self.close_quietly()
        return TrainingFailedError(
            f"{record.id}: training stopped at step {step}: {reason}. Lower train.lr or "
            f"use precision fp32; details in {path}"
        )

    def close(self, record: RunRecord) -> None:
        """Log what the run measured after training (zero-shot, test), then close."""
        for name, result in record.zeroshot.items():
            self.writer.add_scalar(f"zeroshot/{name}", result.accuracy, self.step)
            self.writer.add_scalar(f"zeroshot/{name}_pretrained", result.pretrained_accuracy,
                                   self.step)  # fmt: skip
        if record.test_acc is not None:
            self.writer.add_scalar("test/acc", record.test_acc, self.step)
        self.close_quietly()

    def close_quietly(self) -> None:
        self.loss.close()
        self.bar.close()
        self.writer.close()


def epoch_order(n: int, seed: int, epoch: int, flip: bool = False) -> tuple[Tensor, Tensor | None]:
    """The shuffle (n,) of epoch ``epoch`` and, with ``flip``, which images it flips (n,) bool.
    Both depend only on (seed, epoch), so a resumed epoch sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(n, generator=generator)
    return order, (torch.rand(n, generator=generator) < 0.5) if flip else None


def write_eval_scalars(writer: SummaryWriter, record: EvalRecord) -> None:
    """The layer means and per-layer values of the metrics and of KL to the pre-trained, and
    the representation signals when measured (CKA: layer mean and per layer)."""
    mean_kl = sum(record.kl_to_initial) / len(record.kl_to_initial)
    writer.add_scalar("attention/kl_to_initial_mean", mean_kl, record.step)
    for name, values in record.metrics.items():
        writer.add_scalar(f"attention/{name}_mean", record.layer_mean(name), record.step)
        for layer, value in enumerate(values, start=1):
            writer.add_scalar(f"attention_layers/{name}_L{layer:02d}", value, record.step)
    if record.cka is None:
        return
    writer.add_scalar("representation/cka_mean", sum(record.cka) / len(record.cka), record.step)
    writer.add_scalar("representation/embedding_drift", record.embedding_drift, record.step)
    writer.add_scalar("representation/weight_drift", record.weight_drift, record.step)
    for layer, value in enumerate(record.cka, start=1):
        writer.add_scalar(f"representation_layers/cka_L{layer:02d}", value, record.step)


# --- checkpoints and the record -------------------------------------------------------------


def trainable_state(model: nn.Module, method: str) -> dict[str, Tensor]:
    """LoRA: the trainable tensors (adapters + head). Full FT: the whole classifier state."""
    if method == "lora":
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(model.state_dict())


def _save_weights(path: Path, setup: Setup, step: int) -> None:
    config = setup.config
    meta = {"config_hash": config.config_hash(), "step": str(step), "method": config.train.method}
    write_safetensors(path, trainable_state(setup.model, config.train.method), meta)


def load_weights(path: Path, setup: Setup) -> None:
    """Load weights written by :func:`_save_weights` (LoRA: only the trainable tensors)."""
    state = read_safetensors(path, device=str(setup.device))
    setup.model.load_state_dict(state, strict=setup.config.train.method != "lora")


def _write_resume(setup: Setup, opt: Optimization, record, maps: MapLog, epoch: int) -> None:
    write_torch(setup.files.resume, {
        "config_hash": setup.config.config_hash(), "epoch": epoch,
        "model": setup.model.state_dict(), "optimization": opt.state_dict(),
        "rng": rng_state(), "record": record, "maps": maps,
    })  # fmt: skip


def _resume(setup: Setup, opt: Optimization, progress: bool) -> tuple[RunRecord, MapLog, int]:
    """(record, map log, first epoch to run): from ``resume.pt`` of the same config hash, else
    a fresh record starting at epoch 0."""
    state = _load_resume(setup.files.resume, setup.config.config_hash())
    if state is None:
        images = setup.metric_images_cpu[: setup.config.eval.map_images]
        return new_record(setup), MapLog(images), 0
    setup.model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimization"])
    set_rng_state(state["rng"])
    state["record"].status = "running"
    _log(progress, f"{setup.config.id}: resuming after epoch {state['epoch']}")
    return state["record"], state["maps"], state["epoch"]


def _load_resume(path: Path, config_hash: str) -> dict[str, Any] | None:
    """The resume state of this config, or None: absent, another config's, or damaged (then
    the run starts again from epoch 0, the last state known good)."""
    if not path.exists():
        return None
    try:
        state = read_torch(path, weights_only=False)
    except DamagedFileError as err:
        warnings.warn(f"{err}; training this run again from the start", stacklevel=2)
        return None
    return state if state["config_hash"] == config_hash else None


def completed_record(config: RunConfig) -> RunRecord | None:
    """The record of a complete run of this exact config whose files are intact, if any. A
    damaged history or checkpoint is named in a warning and the run is trained again; so is,
    with :data:`RETRAIN_STALE` set, a run that other training code made."""
    files = RunFiles(config.run_dir)
    if not files.history.exists():
        return None
    try:
        record = read_record(files.history)
    except RecordError as err:
        warnings.warn(f"{err}; training this run again", stacklevel=2)
        return None
    if record.status != "complete" or record.config_hash != config.config_hash():
        return None
    if os.environ.get(RETRAIN_STALE) and is_stale(record):
        warnings.warn(
            f"{config.run_dir}: made by other training code; training it again", stacklevel=2
        )
        return None
    damaged = [path for path in files.results(record.method) if not verify(path)]
    if damaged:
        names = ", ".join(str(p.resolve()) for p in damaged)
        warnings.warn(f"{names}: missing or damaged; training this run again", stacklevel=2)
        return None
    return record


def _finish(setup: Setup, record: RunRecord, started: float) -> RunResult:
    record.status = "complete"
    record.wall_time_s = _elapsed(record, started)
    record.write(setup.files.history)
    # A complete run is never resumed; its optimizer state is only disk (≈1.8 GB for ViT-B/32).
    remove(setup.files.resume)
    # Return what is on disk, so a fresh run and a skipped rerun give equal records.
    return RunResult(setup.config, read_record(setup.files.history))


def _elapsed(record: RunRecord, since: float) -> float:
    """Wall time so far: what the record already holds (earlier sessions) plus this stretch."""
    return record.wall_time_s + time.perf_counter() - since


def _log(enabled: bool, message: str) -> None:
    if enabled:
        tqdm.write(message)
