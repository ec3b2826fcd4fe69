"""One optimisation step and its arithmetic: loss (+ attention regularizer), gradients, the
steps and tracking points of a run. The benchmark times exactly these functions."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import get_cosine_schedule_with_warmup

from collapse_utils.config import RegSpec, TrainSpec
from collapse_utils.measurement.attention import capture_cls_attention
from collapse_utils.measurement.regularizers import apr_penalty, entropy_floor_penalty
from collapse_utils.training.data import normalize, random_flip
from collapse_utils.training.environment import autocast
from collapse_utils.training.evaluation import cls_attention


@dataclass(frozen=True)
class StepPlan:
    """How many optimizer steps a run takes and after which ones it tracks attention.

    ``train.eval_cadence``: ``epoch`` tracks after the in-epoch steps round(k·S/n), k = 1..n
    (n = ``evals_per_epoch``, S steps per epoch: the last is every epoch's end); ``global``
    is the report's code: after global step g (1-based) when (g − 1) is a multiple of
    floor(S / n), and after the last step, not aligned to epochs."""

    steps_per_epoch: int
    epochs: int
    eval_points: frozenset[int]  # epoch cadence: 1-based in-epoch steps after which to track
    interval: int = 0  # global cadence: steps between tracking points (0: epoch cadence)

    @classmethod
    def of(cls, n_train: int, train: TrainSpec) -> StepPlan:
        steps = math.ceil(n_train / train.batch_size)
        count = min(train.evals_per_epoch, steps)
        points = frozenset(round(k * steps / count) for k in range(1, count + 1))
        interval = max(1, steps // train.evals_per_epoch) if train.eval_cadence == "global" else 0
        return cls(steps, train.epochs or 0, points, interval)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def tracks(self, step: int) -> bool:
        """Whether the run tracks attention after global optimizer step ``step`` (1-based)."""
        if self.interval:
            return (step - 1) % self.interval == 0 or step == self.total_steps
        local = (step - 1) % self.steps_per_epoch + 1
        return local in self.eval_points

    @property
    def n_evals(self) -> int:
        """Tracking points of the whole run, the pre-trained one not counted."""
        if self.interval:
            return sum(self.tracks(step) for step in range(1, self.total_steps + 1))
        return self.epochs * len(self.eval_points)


@dataclass(frozen=True)
class Batch:
    """One training batch: uint8 ``images`` (B, 3, S, S) as the model sees them (flipped where
    ``flips``), ``labels`` (B,), and ``index`` (B,), its rows in the training set."""

    images: Tensor
    labels: Tensor
    index: Tensor
    flips: Tensor | None = None  # (B,) bool; None: no augmentation

    @classmethod
    def take(cls, images: Tensor, labels: Tensor, index: Tensor, flips: Tensor | None) -> Batch:
        """Rows ``index`` of the training set; ``flips`` (N,) bool for every training image."""
        if flips is None:
            return cls(images[index], labels[index], index)
        return cls(random_flip(images[index], flips[index]), labels[index], index, flips[index])


@dataclass(frozen=True)
class RegularizerInputs:
    """What the attention regularizer needs besides the current batch: the entropy floor per
    layer (layers,), APR's pre-trained rows of every training image when cached — (2, train,
    layers, heads, tokens): as stored and flipped — or a frozen pre-trained copy run on each
    batch."""

    spec: RegSpec
    floor: Tensor | None = None
    reference: Tensor | None = None
    frozen: nn.Module | None = None

    @classmethod
    def prepare(
        cls, spec: RegSpec, model: nn.Module, floor: Tensor, train_images: Tensor, dtype=None
    ) -> RegularizerInputs:
        """Before training: ``floor`` is the pre-trained layer-mean entropy (layers,)."""
        if spec.kind == "entropy_floor":
            return cls(spec, floor=floor)
        if spec.kind == "apr" and spec.reference == "cache":
            # Both orientations, so the cache stays exact under a random horizontal flip.
            upright = cls_attention(model, train_images, dtype)
            flipped = cls_attention(model, train_images.flip(-1), dtype)
            return cls(spec, reference=torch.stack([upright, flipped]))
        if spec.kind == "apr":
            return cls(spec, frozen=copy.deepcopy(model).eval().requires_grad_(False))
        return cls(spec)

    def penalty(self, attn: Tensor, batch: Batch, dtype=None) -> Tensor:
        """The regularizer on the batch's [CLS] attention ``attn`` (B, layers, heads, tokens)."""
        spec = self.spec
        if spec.kind == "entropy_floor":
            return entropy_floor_penalty(
                attn, self.floor, spec.lam, spec.floor_ratio, spec.floor_reduction
            )
        if self.reference is None:
            initial = cls_attention(self.frozen, batch.images, dtype)
        elif batch.flips is None:
            initial = self.reference[0, batch.index]
        else:
            initial = self.reference[batch.flips.long(), batch.index]
        return apr_penalty(attn, initial, spec.lam, spec.kl_direction)


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), labels)


def batch_loss(
    model: nn.Module, forward: nn.Module, batch: Batch, reg: RegularizerInputs, dtype=None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Classification loss (+ regularizer) of one batch; returns (loss, logits (B, classes),
    the regularizer term or None). ``forward`` is ``model`` or its compiled version, used only
    without a regularizer (the capture hooks need ``model``)."""
    pixels = normalize(batch.images)
    with autocast(pixels.device, dtype):
        if reg.spec.kind == "none":
            logits = forward(pixels)
            return classification_loss(logits, batch.labels), logits, None
        with capture_cls_attention(model) as cap:
            logits = model(pixels)
        penalty = reg.penalty(cap.tensor, batch, dtype)
        return classification_loss(logits, batch.labels) + penalty, logits, penalty.detach()


@dataclass(frozen=True)
class Optimization:
    """AdamW on the trainable parameters, warmup + cosine per step, GradScaler for fp16."""

    params: list[Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    grad_clip: float

    @classmethod
    def of(cls, model: nn.Module, train: TrainSpec, total_steps: int, dtype) -> Optimization:
        device = next(model.parameters()).device
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=train.lr, weight_decay=train.weight_decay, fused=device.type == "cuda"
        )
        warmup = round(train.warmup_fraction * total_steps)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        return cls(params, optimizer, scheduler, scaler, train.grad_clip)

    def step(self, loss: Tensor) -> None:
        """Backward (scaled for fp16), gradient-norm clip, optimizer and scheduler step."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
