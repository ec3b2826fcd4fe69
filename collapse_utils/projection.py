"""The study end to end, down-scaled: what the user waits for, measured rather than multiplied.

Every trained run of a profile is rehearsed with the training code's own step
(:class:`~collapse_utils.training.step.TrainingLoss` + ``Optimization``, the run's method,
regularizer, batch size, patch size and ``train.compile``) on a random model and synthetic
images: its real optimizer steps, tracking points and evaluation images × ``scale``, with the
frozen caches and APR's reference built over ``scale`` of its training set. The runs go through
``runs_per_gpu`` worker processes at once, as ``run --gpus 0, --runs-per-gpu K`` packs them.

Each run reports its fixed cost (model, first two steps: compilation) and its scaled work; its
projected duration is ``fixed + scaled / scale``, and the study's wall time is those durations
packed longest first on ``runs_per_gpu`` slots. Not included: kernel start and imports (warm
kernels pay them once per slot), reading the decoded image caches, the pre-trained zero-shot
text features (cached per dataset), and the book build.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPConfig, CLIPModel

from collapse_utils.config import RunConfig, plan_runs, profile_model
from collapse_utils.measurement.metrics import layer_metrics
from collapse_utils.training.data import synthetic_images
from collapse_utils.training.environment import autocast_dtype
from collapse_utils.training.evaluation import accuracy, cls_attention, snapshot
from collapse_utils.training.frozen import FrozenInputs
from collapse_utils.training.labels import CLASS_NAMES
from collapse_utils.training.model import CLIPClassifier, load_clip, prepare_for_training
from collapse_utils.training.step import (
    Batch,
    Optimization,
    RegularizerInputs,
    StepPlan,
    StepSums,
    TrainingLoss,
)

# Dense 16-bit tensor-core peak FLOP/s (no sparsity), from the vendors' data sheets. Matched
# against torch.cuda.get_device_name(); more specific names first.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A40", 149.7e12),
)
# Images a study trains on where the split is not fixed per class: EuroSAT has no official
# split (train/val are cut from all 27 000 images); Pets uses its 3 680-image trainval split.
POOL_SIZES = {"eurosat": 27000, "pets": 3680}
TEST_SIZES = {"cifar100": 10000, "cifar10": 10000, "flowers102": 6149, "pets": 3669}
METRIC_IMAGES = 200
FIXED_STEPS = 2  # steps timed as the fixed cost: the first compiles (each batch shape once)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def split_sizes(config: RunConfig) -> tuple[int, int]:
    """(train, val) images of a run: study2's fixed images per class, or the pool less val."""
    dataset = config.data.dataset
    if config.data.split == "fixed":
        train, val, _ = config.data.fixed_per_class[dataset]
        return train * len(CLASS_NAMES[dataset]), val * len(CLASS_NAMES[dataset])
    pool = POOL_SIZES[dataset]
    n_val = round(pool * config.data.val_fraction)
    return pool - n_val, n_val


@dataclass(frozen=True)
class RunWork:
    """One trained run's full-study work: optimizer ``steps`` at its batch size, tracking
    ``snapshots`` (of the metric subset), ``eval_images`` (val each epoch + zero-shot)."""

    name: str
    config: RunConfig
    n_train: int
    steps: int
    snapshots: int
    eval_images: int


def study_work(profile: str = "full", params_dir=None) -> list[RunWork]:
    """Every trained run of ``profile`` (each configuration × seed) and its work."""
    kwargs = {} if params_dir is None else {"params_dir": params_dir}
    works = []
    for c in plan_runs(profile, **kwargs):
        if c.train.method == "none":
            continue
        n_train, n_val = split_sizes(c)
        plan = StepPlan.of(n_train, c.train)
        cap = c.eval.zeroshot_max_images or math.inf
        zeroshot = sum(min(TEST_SIZES.get(d, n_val), cap) for d in c.eval.zeroshot_datasets)
        works.append(
            RunWork(
                f"{c.id}/seed{c.seed}",
                c,
                n_train,
                plan.total_steps,
                plan.n_evals + 1,
                plan.epochs * n_val + zeroshot,
            )  # fmt: skip
        )
    return works


def sample_by_kind(works: Sequence[RunWork]) -> tuple[list[RunWork], list[list[float]]]:
    """One run per kind of step (method, regularizer, batch and patch size, dataset, LoRA rank,
    frozen layers) and, per run of the study it stands for, that run's steps over its own: a
    projection that rehearses each kind once instead of every seed and learning rate."""
    kinds: dict[tuple, list[RunWork]] = {}
    for w in works:
        t, r = w.config.train, w.config.reg
        key = (t.method, r.kind, r.reference, t.batch_size, w.config.model.patch_size,
               w.config.data.dataset, w.config.lora.rank, t.freeze_layers)  # fmt: skip
        kinds.setdefault(key, []).append(w)
    groups = list(kinds.values())
    return [g[0] for g in groups], [[w.steps / g[0].steps for w in g] for g in groups]


def random_clip(size: str, patch_size: int = 32, attn: str = "sdpa", seed: int = 0) -> CLIPModel:
    """smoke: the smoke profile's tiny CLIP; full: a random-init ViT-B/``patch_size``
    (``CLIPConfig()`` is exactly ViT-B/32)."""
    if size == "smoke":
        spec = profile_model("smoke")
        spec = dataclasses.replace(spec, attn_implementation=attn, patch_size=patch_size)
        return load_clip(spec, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        config = CLIPConfig(vision_config={"patch_size": patch_size})
        return CLIPModel._from_config(config, attn_implementation=attn)


# --- one run, in a worker process --------------------------------------------------------------


def rehearse_run(
    work: RunWork, scale: float, size: str, device: str, threads: int | None = None
) -> dict[str, Any]:
    """Rehearse ``work`` × ``scale`` here; seconds of its fixed cost and of its scaled work,
    the steps and images it ran, its FLOPs per training image and its peak device memory.
    ``threads``: torch CPU threads (the runner gives each kernel its share of the cores)."""
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    c = work.config
    tick = time.perf_counter()
    n_classes = len(CLASS_NAMES[c.data.dataset])
    clip = random_clip(size, c.model.patch_size)
    model = prepare_for_training(CLIPClassifier(clip, n_classes), c.train, c.lora).to(dev)
    dtype = autocast_dtype(c.train.precision, dev)
    eval_dtype = None if c.eval.precision == "fp32" else dtype
    pool = max(c.train.batch_size, round(work.n_train * scale))
    images, labels = _images(n_classes, pool, dev, seed=1)
    metric, _ = _images(n_classes, METRIC_IMAGES, dev, seed=2)
    scaled_steps = max(1, round(work.steps * scale))
    fixed = time.perf_counter() - tick
    # Scaled: the references and caches over `pool` images, then the steps.
    tick = time.perf_counter()
    initial = cls_attention(model, metric, eval_dtype)
    floor = layer_metrics(initial)["entropy"].to(dev)
    reg = RegularizerInputs.prepare(c.reg, model, floor, images, eval_dtype)
    frozen = None
    if c.train.cache_frozen and c.reg.kind == "none":
        frozen = FrozenInputs.prepare(model, c.train.method, images, c.data.flip, dtype)
    loss_fn = TrainingLoss(model, reg, dtype, c.train.compile, frozen)
    opt = Optimization.of(model, c.train, max(scaled_steps, FIXED_STEPS + 1), dtype)
    flops = _flops_per_image(loss_fn, images, labels, c.data.flip)
    batches = _batches(pool, c.train.batch_size, dev, seed=3)
    flips = (torch.rand(pool, generator=torch.Generator().manual_seed(4)) < 0.5).to(dev)
    flips = flips if c.data.flip else None
    sums = StepSums(dev)

    def step(k: int) -> None:
        batch = Batch.take(images, labels, batches[k % len(batches)], flips)
        loss, logits, penalty = loss_fn(batch)
        sums.add(k + 1, loss, logits, batch.labels, penalty)
        opt.step(loss)

    scaled = time.perf_counter() - tick
    fixed += timed(lambda: [step(k) for k in range(FIXED_STEPS)], dev)
    tick = time.perf_counter()
    snapshots = max(1, round(work.snapshots * scale))
    every = max(1, scaled_steps // snapshots)
    for k in range(scaled_steps):
        step(FIXED_STEPS + k)
        if (k + 1) % every == 0:
            sums.read()
            snapshot(model, metric, initial, 8, eval_dtype)
    eval_images = max(1, round(work.eval_images * scale))
    eval_set = _images(n_classes, eval_images, dev, seed=5)
    accuracy(model, *eval_set, eval_dtype)
    sums.read()
    sync(dev)
    scaled += time.perf_counter() - tick
    loss_fn.close()
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return {
        "run": work.name, "patch_size": c.model.patch_size, "fixed_s": fixed,
        "scaled_s": scaled, "scaled_steps": scaled_steps,
        "train_images": work.steps * c.train.batch_size, "flops_per_image": flops,
        "peak_memory_gb": peak,
    }  # fmt: skip


def _images(n_classes: int, n: int, device, seed: int) -> tuple[Tensor, Tensor]:
    images, labels = synthetic_images(n_classes, math.ceil(n / n_classes), seed=seed, size=224)
    return images[:n].to(device), labels[:n].to(device)


def _batches(pool: int, size: int, device, seed: int) -> list[Tensor]:
    order = torch.randperm(pool, generator=torch.Generator().manual_seed(seed)).to(device)
    return [order[i : i + size] for i in range(0, pool - size + 1, size)]


def _flops_per_image(loss_fn: TrainingLoss, images: Tensor, labels: Tensor, flip: bool) -> float:
    """Forward + backward FLOPs of the run's step per image (2 images, eager, counted by
    ``FlopCounterMode``; the optimizer's elementwise work is not counted, as in MFU)."""
    index = torch.arange(2, device=images.device)
    flips = torch.zeros(2, dtype=torch.bool, device=images.device) if flip else None
    batch = Batch.take(images, labels, index, flips)
    eager = TrainingLoss(loss_fn.model, loss_fn.reg, loss_fn.dtype, "off", loss_fn.frozen)
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = eager(batch)
        if loss.requires_grad:
            loss.backward()
    eager.close()
    loss_fn.model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds ``fn()`` takes, the device's work included."""
    sync(device)
    tick = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - tick


# --- the study --------------------------------------------------------------------------------


def pack_longest_first(durations: Sequence[float], slots: int) -> float:
    """Wall time of ``durations`` on ``slots`` parallel slots, each job to the first free slot,
    longest first (the runner's order: ``longest_first``)."""
    free = [0.0] * slots
    for d in sorted(durations, reverse=True):
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def project_study(
    works: Sequence[RunWork],
    scale: float,
    runs_per_gpu: int = 1,
    size: str = "full",
    device: str = "cuda",
    peak: float | None = None,
    stands_for: Sequence[Sequence[float]] | None = None,
) -> dict[str, Any]:
    """Rehearse ``works`` × ``scale``, ``runs_per_gpu`` processes at once (spawned: each its
    own CUDA context, as the runner's kernels; one: in this process), and project the whole
    study; with
    ``stands_for`` (:func:`sample_by_kind`) each rehearsed run stands for runs of those
    multiples of its steps."""
    stands_for = list(stands_for or [[1.0]] * len(works))
    n, threads = len(works), max(1, (os.cpu_count() or 1) // runs_per_gpu)
    args = ([scale] * n, [size] * n, [device] * n, [threads] * n)
    tick = time.perf_counter()
    if runs_per_gpu == 1:  # one at a time: here, as a kernel runs its page
        runs = list(map(rehearse_run, works, *args))
    else:
        context = get_context("spawn")
        with ProcessPoolExecutor(max_workers=runs_per_gpu, mp_context=context) as pool:
            runs = list(pool.map(rehearse_run, works, *args))
    measured = time.perf_counter() - tick
    for r, multiples in zip(runs, stands_for, strict=True):
        r["projected_s"] = r["fixed_s"] + r["scaled_s"] / scale
        r["stands_for"] = list(multiples)

    def wall_of(selected: list[dict]) -> float:
        durations = [r["fixed_s"] + r["scaled_s"] / scale * q
                     for r in selected for q in r["stands_for"]]  # fmt: skip
        return pack_longest_first(durations, runs_per_gpu)

    wall = wall_of(runs)
    flops = sum(r["flops_per_image"] * r["train_images"] * sum(r["stands_for"]) for r in runs)
    # Each backbone's runs on their own (the ViT-B/16 arm is costed apart).
    patches = sorted({r["patch_size"] for r in runs}, reverse=True)
    backbones = {f"ViT-B/{p}": wall_of([r for r in runs if r["patch_size"] == p]) for p in patches}
    return {
        "scale": scale, "runs_per_gpu": runs_per_gpu, "size": size, "device": device,
        "runs": runs, "measured_wall_s": measured, "projected_study_s": wall,
        "projected_by_backbone_s": backbones,
        "train_flops": flops, "mfu": flops / (wall * peak) if peak else None,
    }  # fmt: skip
