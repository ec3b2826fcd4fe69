"""``run_experiment(config)``: train one configuration, track attention, evaluate, checkpoint.

The loop follows the report (§2.3): AdamW on the trainable parameters, cosine schedule with
linear warmup, gradient-norm clip, mixed precision, and the four attention metrics on the fixed
metric subset at step 0 and ``evals_per_epoch`` times per epoch. Everything a run produces lives
in ``config.run_dir`` and is written atomically; a killed run resumes from its last epoch.
"""

from __future__ import annotations

import copy
import math
import platform
import random
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from collapse_utils.config import RegSpec, RunConfig, TrainSpec
from collapse_utils.measurement.attention import capture_cls_attention
from collapse_utils.measurement.metrics import METRICS, layer_metrics
from collapse_utils.measurement.regularizers import apr_penalty, attention_kl, entropy_floor_penalty
from collapse_utils.storage import (
    cache_key,
    read_json,
    remove_stale_temp_files,
    write_json,
    write_safetensors,
    write_torch,
)
from collapse_utils.training.data import ImageSet, load_splits, load_test_set, normalize
from collapse_utils.training.model import (
    CLIPClassifier,
    load_clip,
    merged_clip,
    prepare_for_training,
)
from collapse_utils.training.zeroshot import cached_text_classifier, zeroshot_accuracy

EVAL_BATCH = 256


class TrainingFailedError(RuntimeError):
    """The run stopped (non-finite loss); ``history.json`` says where and why."""


@dataclass(frozen=True)
class RunResult:
    config: RunConfig
    history: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    @property
    def status(self) -> str:
        return self.history["status"]

    @property
    def maps_path(self) -> Path:
        return self.run_dir / "attention_maps.safetensors"

    def layer_metric(self, metric: str, eval_index: int = -1) -> list[float]:
        """Per-layer values of ``metric`` at one eval (default: the last)."""
        return self.history["evals"][eval_index]["metrics"][metric]


# --- environment ----------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {name!r} but CUDA is not available")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. 'auto': bf16 on CUDA where supported, else fp16
    (with GradScaler); fp32 on CPU."""
    if device.type != "cuda":
        if precision in ("fp16", "bf16"):
            raise RuntimeError(f"train.precision {precision!r} needs CUDA; use fp32 or auto on CPU")
        return None
    if precision == "auto":
        # bf16 needs no loss scaling; GPUs without it get the report's fp16 + GradScaler.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def package_versions() -> dict[str, str]:
    names = ("torch", "torchvision", "transformers", "peft", "collapse_utils")
    return {name: version(name) for name in names} | {"python": platform.python_version()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# --- evaluation -----------------------------------------------------------------------------


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@torch.no_grad()
def cls_attention(model: nn.Module, images: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Eval-mode [CLS] attention of ``images`` (N, 3, S, S) uint8 → (N, layers, heads, tokens)."""
    was_training = model.training
    model.eval()
    rows = []
    for start in range(0, len(images), EVAL_BATCH):
        with capture_cls_attention(model) as cap, _autocast(images.device, dtype):
            model(normalize(images[start : start + EVAL_BATCH]))
        rows.append(cap.tensor)
    model.train(was_training)
    return torch.cat(rows)


@dataclass(frozen=True)
class Snapshot:
    """One tracking point: per-layer metrics, per-layer KL(initial ‖ current) in nats, and the
    [CLS] maps (map_images, layers, heads, tokens) of the first metric images, float16."""

    metrics: dict[str, list[float]]
    kl_to_initial: list[float]
    maps: Tensor


def snapshot(
    model: nn.Module, images: Tensor, initial: Tensor, map_images: int, dtype=None
) -> Snapshot:
    """Track attention on the metric subset ``images``; ``initial`` is its pre-trained attention."""
    attn = cls_attention(model, images, dtype)
    metrics = layer_metrics(attn)
    kl = attention_kl(attn, initial, reduce_dims=(0, 2))
    return Snapshot(
        metrics={name: metrics[name].tolist() for name in METRICS},
        kl_to_initial=kl.tolist(),
        maps=attn[:map_images].to(torch.float16).cpu(),
    )


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, dtype=None) -> float:
    """Top-1 accuracy of the classifier on uint8 ``images`` (N, 3, S, S), ``labels`` (N,)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), EVAL_BATCH):
        with _autocast(images.device, dtype):
            logits = model(normalize(images[start : start + EVAL_BATCH]))
        correct += (logits.argmax(-1) == labels[start : start + EVAL_BATCH]).sum().item()
    model.train(was_training)
    return correct / len(images)


def evaluate_zeroshot(
    model: nn.Module, base_clip, config: RunConfig, test_sets: dict[str, ImageSet]
) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy of the fine-tuned vision tower (LoRA merged) with the original text
    tower, and of the pre-trained CLIP, per dataset."""
    clip = merged_clip(model, base_clip)
    cache = Path(config.output_root) / "cache"
    results = {}
    for name, images in test_sets.items():
        weights = cached_text_classifier(
            base_clip, config.model, images.class_names, config.eval.templates,
            cache / "text", config.seed,
        )  # fmt: skip
        pretrained = _cached_pretrained_zeroshot(base_clip, config, name, images, weights, cache)
        results[name] = {
            "accuracy": zeroshot_accuracy(clip, images, weights, desc=f"zero-shot {name}"),
            "pretrained_accuracy": pretrained,
            "templates": config.eval.templates,
            "n_images": len(images),
        }
    return results


def _cached_pretrained_zeroshot(base_clip, config, name, images, weights, cache: Path) -> float:
    # The pre-trained model's accuracy is the same for every run that shares these inputs.
    key = cache_key(config.model, config.seed, name, config.data, images.class_names,
                    config.eval.templates, len(images))  # fmt: skip
    path = cache / "zeroshot_pretrained" / f"{key}.json"
    if path.exists():
        return read_json(path)["accuracy"]
    value = zeroshot_accuracy(base_clip, images, weights, desc=f"zero-shot {name} (pre-trained)")
    write_json(path, {"accuracy": value})
    return value


# --- checkpoints ----------------------------------------------------------------------------


def trainable_state(model: nn.Module, method: str) -> dict[str, Tensor]:
    """LoRA: the trainable tensors (adapters + head). Full FT: the whole classifier state."""
    if method == "lora":
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(model.state_dict())


def _save_weights(path: Path, model: nn.Module, config: RunConfig, step: int) -> None:
    meta = {"config_hash": config.config_hash(), "step": str(step), "method": config.train.method}
    write_safetensors(path, trainable_state(model, config.train.method), meta)


def _load_resume(path: Path, config_hash: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    return state if state["config_hash"] == config_hash else None


def _completed_history(config: RunConfig) -> dict[str, Any] | None:
    path = config.run_dir / "history.json"
    if not path.exists():
        return None
    history = read_json(path)
    if history.get("status") == "complete" and history.get("config_hash") == config.config_hash():
        return history
    return None


# --- the run --------------------------------------------------------------------------------


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), labels)


def make_optimizer(params: list[Tensor], train: TrainSpec, device: torch.device):
    """AdamW with the run's rate and weight decay; fused kernels on CUDA."""
    return torch.optim.AdamW(
        params, lr=train.lr, weight_decay=train.weight_decay, fused=device.type == "cuda"
    )


def batch_loss(
    model: nn.Module,
    forward: nn.Module,
    images: Tensor,
    labels: Tensor,
    reg: RegSpec,
    dtype: torch.dtype | None,
    floor: Tensor | None = None,
    reference: Tensor | None = None,
    frozen: nn.Module | None = None,
) -> tuple[Tensor, Tensor]:
    """Classification loss (+ regularizer) of one uint8 batch (B, 3, S, S); returns
    (loss, logits). ``forward`` is ``model`` or its compiled version, used only without a
    regularizer (the capture hooks need ``model``). ``floor``: the entropy floor per layer.
    APR's pre-trained rows are ``reference`` (this batch's rows of the cache) or, when None,
    computed by the ``frozen`` copy."""
    pixels = normalize(images)
    with _autocast(images.device, dtype):
        if reg.kind == "none":
            logits = forward(pixels)
            return classification_loss(logits, labels), logits
        with capture_cls_attention(model) as cap:
            logits = model(pixels)
        loss = classification_loss(logits, labels)
        if reg.kind == "entropy_floor":
            return loss + entropy_floor_penalty(cap.tensor, floor, reg.lam), logits
        initial = reference if reference is not None else cls_attention(frozen, images, dtype)
        return loss + apr_penalty(cap.tensor, initial, reg.lam), logits


def apply_gradients(loss: Tensor, optimizer, scaler, scheduler, params, grad_clip: float) -> None:
    """Backward (scaled for fp16), gradient-norm clip, optimizer and scheduler step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def _eval_points(steps_per_epoch: int, evals_per_epoch: int) -> set[int]:
    """1-based in-epoch steps after which metrics are tracked (always includes the last)."""
    count = min(evals_per_epoch, steps_per_epoch)
    return {round(k * steps_per_epoch / count) for k in range(1, count + 1)}


def _new_history(config: RunConfig, device: torch.device, steps_per_epoch: int) -> dict:
    return {
        "id": config.id,
        "family": config.family,
        "description": config.description,
        "profile": config.profile,
        "seed": config.seed,
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "status": "running",
        "failure": None,
        "versions": package_versions(),
        "device": device_name(device),
        "steps_per_epoch": steps_per_epoch,
        "total_steps": steps_per_epoch * (config.train.epochs or 0),
        "evals": [],
        "epochs": [],
        "best_val_acc": None,
        "final_val_acc": None,
        "zeroshot": {},
        "wall_time_s": 0.0,
    }


def run_experiment(config: RunConfig, progress: bool = True) -> RunResult:
    """Run one configuration end to end and return its history.

    A complete run with the same config hash is not retrained; a run with a ``resume.pt`` of the
    same hash continues after its last finished epoch; a changed config starts fresh.
    Raises ``TrainingFailedError`` on a non-finite loss (the history records step and reason),
    and fails before training if a dataset or the model cannot be loaded.
    """
    done = _completed_history(config)
    if done is not None:
        _log(progress, f"{config.id}: complete with hash {done['config_hash']}, not retrained")
        return RunResult(config, done)
    started = time.perf_counter()
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(run_dir)
    device = resolve_device(config.train.device)
    dtype = autocast_dtype(config.train.precision, device)
    seed_everything(config.seed)

    # Everything that can be missing offline is loaded before any training.
    splits = load_splits(config.data, config.seed)
    test_sets = {
        name: load_test_set(config.data, name, config.seed, config.eval.zeroshot_max_images)
        for name in config.eval.zeroshot_datasets
    }
    base_clip = load_clip(config.model, seed=config.seed).to(device)
    classifier = CLIPClassifier(base_clip, len(splits.train.class_names), seed=config.seed)
    model = prepare_for_training(classifier, config.train, config.lora).to(device)

    train_images = splits.train.images.to(device)
    train_labels = splits.train.labels.to(device)
    metric_images = splits.metric.images.to(device)
    val_images, val_labels = splits.val.images.to(device), splits.val.labels.to(device)
    batch = config.train.batch_size
    steps_per_epoch = math.ceil(len(train_images) / batch)
    total_steps = steps_per_epoch * (config.train.epochs or 0)
    history = _new_history(config, device, steps_per_epoch)
    paths = _Paths(run_dir)
    n_maps = config.eval.map_images

    # Pre-trained references, computed before any resume so they are never the trained model's.
    initial_attn = cls_attention(model, metric_images, dtype)
    first = snapshot(model, metric_images, initial_attn, n_maps, dtype)
    maps = _MapLog(splits.metric.images[:n_maps])
    if config.train.method == "none":
        history["evals"].append(_eval_record(0, steps_per_epoch, total_steps, None, first))
        maps.add(0, first.maps)
        history["zeroshot"] = evaluate_zeroshot(model, base_clip, config, test_sets)
        maps.write(paths.maps)
        return _finish(config, history, paths, started)
    floor = torch.tensor(first.metrics["entropy"], device=device)
    # APR's reference: the pre-trained attention of every training image, computed once
    # (inputs are not augmented, so it never changes) — or a frozen copy run each step.
    reference = frozen = None
    if config.reg.kind == "apr" and config.reg.reference == "cache":
        reference = cls_attention(model, train_images, dtype)
    elif config.reg.kind == "apr":
        frozen = copy.deepcopy(model).eval().requires_grad_(False)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, config.train, device)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, round(config.train.warmup_fraction * total_steps), total_steps
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    forward = torch.compile(model) if config.train.compile else model

    state = _load_resume(paths.resume, config.config_hash())
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        history = state["history"] | {"status": "running"}
        maps = state["maps"]
        start_epoch = state["epoch"]
        _log(progress, f"{config.id}: resuming after epoch {start_epoch}")
    else:
        history["evals"].append(_eval_record(0, steps_per_epoch, total_steps, None, first))
        maps.add(0, first.maps)
        write_json(paths.history, history)

    def step_loss(index: Tensor) -> tuple[Tensor, Tensor]:
        rows = None if reference is None else reference[index]
        images, labels = train_images[index], train_labels[index]
        return batch_loss(model, forward, images, labels, config.reg, dtype, floor, rows, frozen)

    step = start_epoch * steps_per_epoch
    writer = SummaryWriter(run_dir / "tensorboard", purge_step=step)
    eval_points = _eval_points(steps_per_epoch, config.train.evals_per_epoch)
    bar = tqdm(total=total_steps, initial=step, desc=config.id, disable=not progress, unit="step")
    model.train()
    for epoch in range(start_epoch, config.train.epochs):
        # The order depends only on (seed, epoch), so a resumed epoch sees the same batches.
        order = torch.randperm(
            len(train_images), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)
        ).to(device)
        window_loss, window_correct, window_seen, epoch_time = 0.0, 0, 0, 0.0
        epoch_loss = 0.0
        for local in range(1, steps_per_epoch + 1):
            tick = time.perf_counter()
            index = order[(local - 1) * batch : local * batch]
            loss, logits = step_loss(index)
            loss_value = loss.item()
            step += 1
            if not math.isfinite(loss_value):
                _fail(config, history, paths, step, f"non-finite loss {loss_value}", started)
            apply_gradients(loss, optimizer, scaler, scheduler, trainable, config.train.grad_clip)
            epoch_time += time.perf_counter() - tick
            window_loss += loss_value * len(index)
            epoch_loss += loss_value * len(index)
            window_correct += (logits.argmax(-1) == train_labels[index]).sum().item()
            window_seen += len(index)
            bar.update(1)
            writer.add_scalar("train/loss", loss_value, step)
            writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
            if local in eval_points:
                snap = snapshot(model, metric_images, initial_attn, n_maps, dtype)
                record = _eval_record(
                    step, steps_per_epoch, total_steps, window_loss / window_seen, snap
                )
                history["evals"].append(record)
                maps.add(step, snap.maps)
                _write_eval_scalars(writer, record)
                _log(
                    progress,
                    f"{config.id} step {step}/{total_steps} loss {record['train_loss']:.4f} "
                    f"train acc {window_correct / window_seen:.3f} "
                    f"mean entropy {np.mean(snap.metrics['entropy']):.4f}",
                )
                window_loss, window_correct, window_seen = 0.0, 0, 0
                write_json(paths.history, history)

        val_acc = accuracy(model, val_images, val_labels, dtype)
        samples_per_s = len(train_images) / epoch_time
        history["epochs"].append(
            {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": epoch_loss / len(train_images),
                "val_acc": val_acc,
                "samples_per_s": samples_per_s,
            }
        )
        writer.add_scalar("val/acc", val_acc, step)
        writer.add_scalar("train/samples_per_s", samples_per_s, step)
        _log(
            progress,
            f"{config.id} epoch {epoch + 1}/{config.train.epochs} val acc {val_acc:.4f} "
            f"({samples_per_s:.0f} samples/s)",
        )
        if history["best_val_acc"] is None or val_acc > history["best_val_acc"]:
            history["best_val_acc"] = val_acc
            _save_weights(paths.best, model, config, step)
        history["final_val_acc"] = val_acc
        history["wall_time_s"] = _elapsed(history, started)
        started = time.perf_counter()
        write_json(paths.history, history)
        maps.write(paths.maps)
        if (epoch + 1) % config.train.checkpoint_every == 0 or epoch + 1 == config.train.epochs:
            write_torch(paths.resume, {
                "config_hash": config.config_hash(), "epoch": epoch + 1,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "rng": _rng_state(), "history": history, "maps": maps,
            })  # fmt: skip
    bar.close()
    writer.close()
    _save_weights(paths.final, model, config, step)
    history["zeroshot"] = evaluate_zeroshot(model, base_clip, config, test_sets)
    return _finish(config, history, paths, started)


@dataclass(frozen=True)
class _Paths:
    run_dir: Path

    @property
    def history(self) -> Path:
        return self.run_dir / "history.json"

    @property
    def resume(self) -> Path:
        return self.run_dir / "resume.pt"

    @property
    def maps(self) -> Path:
        return self.run_dir / "attention_maps.safetensors"

    @property
    def best(self) -> Path:
        return self.run_dir / "best.safetensors"

    @property
    def final(self) -> Path:
        return self.run_dir / "final.safetensors"


class _MapLog:
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


def _eval_record(
    step: int, steps_per_epoch: int, total_steps: int, train_loss: float | None, snap: Snapshot
) -> dict:
    return {
        "step": step,
        "epoch": step / max(steps_per_epoch, 1),
        "fraction": step / max(total_steps, 1),
        "train_loss": train_loss,
        "metrics": snap.metrics,
        "kl_to_initial": snap.kl_to_initial,
    }


def _write_eval_scalars(writer: SummaryWriter, record: dict) -> None:
    for name, values in record["metrics"].items():
        writer.add_scalar(f"attention/{name}_mean", float(np.mean(values)), record["step"])
        for layer, value in enumerate(values, start=1):
            writer.add_scalar(f"attention_layers/{name}_L{layer:02d}", value, record["step"])


def _finish(config: RunConfig, history: dict, paths: _Paths, started: float) -> RunResult:
    history["status"] = "complete"
    history["wall_time_s"] = _elapsed(history, started)
    write_json(paths.history, history)
    # A complete run is never resumed; its optimizer state is only disk (≈1.8 GB for ViT-B/32).
    paths.resume.unlink(missing_ok=True)
    # Return what is on disk, so a fresh run and a skipped rerun give equal histories.
    return RunResult(config, read_json(paths.history))


def _fail(config: RunConfig, history: dict, paths: _Paths, step: int, reason: str, started):
    history["status"] = "failed"
    history["failure"] = {"step": step, "reason": reason}
    history["wall_time_s"] = _elapsed(history, started)
    write_json(paths.history, history)
    raise TrainingFailedError(
        f"{config.id}: training stopped at step {step}: {reason}. Lower train.lr or use "
        f"precision fp32; details in {paths.history}"
    )


def _elapsed(history: dict, since: float) -> float:
    """Wall time so far: what the history already holds (earlier sessions) plus this stretch."""
    return history["wall_time_s"] + time.perf_counter() - since


def _log(enabled: bool, message: str) -> None:
    if enabled:
        tqdm.write(message)
