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
from collapse_utils.measurement.attention import ClsAttention
from collapse_utils.measurement.regularizers import apr_penalty, entropy_floor_penalty
from collapse_utils.training.data import normalize, random_flip
from collapse_utils.training.environment import autocast
from collapse_utils.training.evaluation import cls_attention
from collapse_utils.training.frozen import FrozenInputs


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
    batch (with its capture hooks, registered once)."""

    spec: RegSpec
    floor: Tensor | None = None
    reference: Tensor | None = None
    frozen: nn.Module | None = None
    frozen_capture: ClsAttention | None = None

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
            frozen = copy.deepcopy(model).eval().requires_grad_(False)
            return cls(spec, frozen=frozen, frozen_capture=ClsAttention(frozen, enabled=True))
        return cls(spec)

    def penalty(self, attn: Tensor, images: Tensor, index: Tensor, flips: Tensor | None) -> Tensor:
        """The regularizer on the batch's [CLS] attention ``attn`` (B, layers, heads, tokens);
        the batch is training rows ``index`` (B,), uint8 ``images`` (B, 3, S, S) as the model
        saw them (flipped where ``flips``). Call under the step's autocast."""
        spec = self.spec
        if spec.kind == "entropy_floor":
            return entropy_floor_penalty(
                attn, self.floor, spec.lam, spec.floor_ratio, spec.floor_reduction
            )
        if self.frozen is not None:
            with torch.no_grad():
                self.frozen(normalize(images))
            initial = self.frozen_capture.take()
        elif flips is None:
            initial = self.reference[0, index]
        else:
            initial = self.reference[flips.long(), index]
        return apr_penalty(attn, initial, spec.lam, spec.kl_direction)


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), labels)


class TrainingLoss:
    """A run's loss: uint8 :class:`Batch` → (loss, logits (B, classes), the regularizer term
    or None), computed eagerly or by ``torch.compile`` (``train.compile``: a mode, or off).

    Built once per run: with a regularizer the capture hooks are registered here and enabled
    only around this forward; with :class:`FrozenInputs` (linear probe, last block) only the
    trainable part of the model runs, on cached frozen outputs. Nothing in it reads a value
    back to the host, so a step never waits for the GPU."""

    def __init__(
        self,
        model: nn.Module,
        reg: RegularizerInputs,
        dtype=None,
        compile_mode: str = "off",
        frozen: FrozenInputs | None = None,
    ):
        self.model, self.reg, self.dtype, self.frozen = model, reg, dtype, frozen
        self.capture = None if reg.spec.kind == "none" else ClsAttention(model)
        self.compile_mode = compile_mode
        if compile_mode == "off":
            self._loss = self._eager
        else:
            # Static shapes: a run has at most two batch sizes (the epoch's last may be short),
            # each its own graph, rather than one slower dynamic-shape graph.
            mode = None if compile_mode == "default" else compile_mode
            self._loss = torch.compile(self._eager, mode=mode, dynamic=False)

    def __call__(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.compile_mode == "reduce-overhead":
            # CUDA graphs reuse their output memory: the last step's outputs are consumed.
            torch.compiler.cudagraph_mark_step_begin()
        if self.capture is not None:
            self.capture.enabled = True
        try:
            return self._loss(batch.images, batch.labels, batch.index, batch.flips)
        finally:
            if self.capture is not None:
                self.capture.enabled = False

    def _eager(
        self, images: Tensor, labels: Tensor, index: Tensor, flips: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        with autocast(images.device, self.dtype):
            if self.frozen is None:
                logits = self.model(normalize(images))
            else:
                logits = self.frozen.logits(self.model, index, flips)
            loss = classification_loss(logits, labels)
            if self.capture is None:
                return loss, logits, None
            penalty = self.reg.penalty(self.capture.take(), images, index, flips)
        return loss + penalty, logits, penalty.detach()

    def close(self) -> None:
        """Unregister the capture hooks (the model is then as it was built)."""
        for capture in (self.capture, self.reg.frozen_capture):
            if capture is not None:
                capture.remove()


class StepSums:
    """A window's running sums, kept on the device so that no step waits for it: loss × images,
    correct predictions, regularizer × images, and the first step whose loss was not finite
    (0: none) and its value. ``seen`` (images) is known on the host."""

    def __init__(self, device: torch.device):
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.sums = torch.zeros(3, device=self.device)  # loss × images, correct, penalty × images
        self.bad_step = torch.zeros((), dtype=torch.long, device=self.device)
        self.bad_loss = torch.zeros((), device=self.device)
        self.seen, self.regularized = 0, False

    def add(self, step: int, loss: Tensor, logits: Tensor, labels: Tensor, penalty) -> None:
        """After global step ``step`` (1-based): its loss (), logits (B, classes), labels (B,)
        and regularizer term () or None."""
        loss = loss.detach().float()
        n = len(labels)
        first_bad = ~torch.isfinite(loss) & (self.bad_step == 0)
        self.bad_step.masked_fill_(first_bad, step)
        self.bad_loss = torch.where(first_bad, loss, self.bad_loss)
        self.sums[0] += loss * n
        self.sums[1] += (logits.detach().argmax(-1) == labels).sum()
        if penalty is not None:
            self.sums[2] += penalty.float() * n
            self.regularized = True
        self.seen += n

    def read(self) -> tuple[Window, tuple[int, str] | None]:
        """(the window's sums on the host, why it failed: the first non-finite loss, its step
        and value, or None); then start again."""
        loss, correct, penalty = self.sums.double().cpu().tolist()
        window = Window(loss, round(correct), self.seen,
                         penalty=penalty if self.regularized else None)  # fmt: skip
        bad_step, bad_loss = int(self.bad_step.item()), self.bad_loss.item()
        self._reset()
        return window, (bad_step, f"non-finite loss {bad_loss}") if bad_step else None


@dataclass
class Window:
    """Host totals of a stretch of steps: loss (per image, summed), correct predictions, images
    seen, regularizer (per image, summed; None without one) and training seconds."""

    loss: float = 0.0
    correct: int = 0
    seen: int = 0
    penalty: float | None = None
    seconds: float = 0.0

    def merge(self, other: Window) -> None:
        self.loss += other.loss
        self.correct += other.correct
        self.seen += other.seen
        self.seconds += other.seconds

    @property
    def mean_loss(self) -> float:
        return self.loss / self.seen

    @property
    def accuracy(self) -> float:
        return self.correct / self.seen


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
