"""``python bench.py`` (``make bench``): speed of preprocessing, a training step and tracking.

Two paths, side by side in one process, on the same synthetic images and weights:

* **report** — the report's pipeline: JPEG-encoded PIL images decoded and run through
  ``transformers.CLIPImageProcessor`` per sample in a torch ``DataLoader``; an eager-attention
  model called with ``output_attentions=True`` every step (fp16 + GradScaler on CUDA, unfused
  AdamW), each batch copied host → device.
* **ours** — each split decoded once into a uint8 tensor on the device; per batch only indexing
  and :func:`~collapse_utils.training.data.normalize`; sdpa attention; the training step is
  ``training.step.TrainingLoss`` (eager or compiled, ``--compile``) + ``Optimization.step``,
  with nothing read back per step; the capture hooks run only for regularizers and in
  ``training.evaluation.snapshot``.

Measured: images/s of preprocessing and of a training step; the overhead of tracking (five
``snapshot`` calls per epoch on the 200-image metric subset, amortised over the epoch); the
per-step cost of the regularizers (entropy floor; APR with its reference cached vs from a frozen
copy); MFU from model FLOPs counted by ``FlopCounterMode``; and, from these, the implied time of
the whole study (``params/experiments`` × the ``full`` profile). Writes
``outputs/bench/<timestamp>.json`` and ``outputs/bench/latest.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPImageProcessor, get_cosine_schedule_with_warmup

from collapse_utils.config import (
    COMPILE_MODES,
    REPO_ROOT,
    RegSpec,
    TrainSpec,
    load_config,
    plan_runs,
)
from collapse_utils.measurement.metrics import layer_metrics
from collapse_utils.projection import (
    POOL_SIZES,
    TEST_SIZES,
    peak_flops,
    project_study,
    random_clip,
    sample_by_kind,
    split_sizes,
    study_work,
    sync,
    timed,
)
from collapse_utils.storage import write_json
from collapse_utils.training.data import image_to_uint8, normalize, synthetic_images
from collapse_utils.training.environment import autocast_dtype, device_name, package_versions
from collapse_utils.training.evaluation import accuracy, cls_attention, snapshot
from collapse_utils.training.model import CLIPClassifier
from collapse_utils.training.step import (
    Batch,
    Optimization,
    RegularizerInputs,
    StepPlan,
    StepSums,
    TrainingLoss,
    classification_loss,
)

# Training-step variants of our path: (name, regularizer).
OUR_STEPS = (
    ("ours", RegSpec()),
    ("ours_entropy_floor", RegSpec(kind="entropy_floor", lam=0.1)),
    ("ours_apr_cache", RegSpec(kind="apr", lam=0.1, reference="cache")),
    ("ours_apr_frozen", RegSpec(kind="apr", lam=0.1, reference="frozen")),
)
PREP_IMAGES = {"eurosat_64x64": (64, 64), "pets_500x375": (500, 375)}
N_CLASSES = 10
MAP_IMAGES = 8


# --- study workload ---------------------------------------------------------------------------


def study_workload(profile: str = "full") -> dict[str, Any]:
    """What the study computes, from ``params/experiments`` under ``profile``: training images
    and optimizer steps per step kind (epochs × train split, at each run's batch size),
    snapshots, evaluation forwards (val accuracy each epoch, zero-shot test sets; the
    pre-trained model's zero-shot once per dataset) and the images APR's cached reference is
    computed for. Splits: :func:`~collapse_utils.projection.split_sizes`."""
    train = {name: 0 for name, _ in OUR_STEPS}
    steps = {name: 0 for name, _ in OUR_STEPS}
    work = {"profile": profile, "runs": 0, "trained_runs": 0, "train_images": train}
    work |= {"train_steps": steps, "snapshots": 0, "eval_images": 0, "reference_images": 0}
    zeroshot_sets: dict[str, int] = {}
    for c in plan_runs(profile):  # every configuration once per seed
        n_train, n_val = split_sizes(c)
        tests = {n: TEST_SIZES[n] if n in TEST_SIZES else n_val for n in c.eval.zeroshot_datasets}
        zeroshot_sets |= tests
        work["runs"] += 1
        work["snapshots"] += 2  # the initial attention and the step-0 snapshot
        work["eval_images"] += sum(tests.values())
        if c.train.method == "none":
            continue
        plan = StepPlan.of(n_train, c.train)
        kind = {"none": "ours", "entropy_floor": "ours_entropy_floor"}.get(
            c.reg.kind, f"ours_apr_{c.reg.reference}"
        )
        work["trained_runs"] += 1
        train[kind] += plan.epochs * n_train
        steps[kind] += plan.total_steps
        work["snapshots"] += plan.n_evals
        work["eval_images"] += plan.epochs * n_val
        if c.reg.kind == "apr" and c.reg.reference == "cache":
            work["reference_images"] += n_train
    work["eval_images"] += sum(zeroshot_sets.values())
    work["total_train_images"] = sum(train.values())
    work["total_train_steps"] = sum(steps.values())
    return work


def implied_study_s(
    work: dict[str, Any],
    step_ips: dict[str, float],
    snapshot_s: float,
    eval_ips: float,
    capture_ips: float,
) -> dict[str, float]:
    """Seconds the study would take at the measured rates, by part. LoRA and frozen-layer runs
    are costed as full fine-tuning (they are cheaper), so training time is an upper estimate."""
    parts = {
        "train": sum(n / step_ips[kind] for kind, n in work["train_images"].items() if n),
        "tracking": work["snapshots"] * snapshot_s,
        "evaluation": work["eval_images"] / eval_ips,
        "apr_reference": work["reference_images"] / capture_ips,
    }
    return parts | {"total": sum(parts.values())}


# --- models -----------------------------------------------------------------------------------


def report_logits(classifier: CLIPClassifier, pixels: Tensor) -> Tensor:
    """The report's forward: every layer's full attention returned (and kept) every step."""
    out = classifier.vision_model(pixel_values=pixels, output_attentions=True)
    if len(out.attentions) != classifier.vision_model.config.num_hidden_layers:
        raise RuntimeError("the eager model returned no attention maps")
    return classifier.head(classifier.visual_projection(out.pooler_output))


# --- timing -----------------------------------------------------------------------------------


def time_round_robin(
    fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each function; calls alternate between functions so that drift on a
    shared machine hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def profile_step(step: Callable[[], Any], device: torch.device, steps: int = 3) -> dict:
    """Where a step's time goes (``torch.profiler``, after one warm-up step): device kernels
    launched per step and the share of the wall time the device is busy (the union of its
    kernels' intervals); on CPU only the operator count."""
    from torch.profiler import ProfilerActivity, profile

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    tick = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    wall_us = (time.perf_counter() - tick) * 1e6
    events = prof.events()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    busy, end = 0.0, -math.inf
    for e in sorted(kernels, key=lambda e: e.time_range.start):
        start, stop = e.time_range.start, e.time_range.end
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    top_level = [e for e in events if e.device_type.name == "CPU" and e.cpu_parent is None]
    return {
        "ops_per_step": len(top_level) / steps,
        "kernels_per_step": len(kernels) / steps if device.type == "cuda" else None,
        "device_busy_share": busy / wall_us if device.type == "cuda" else None,
    }


def _stats(seconds: list[float], images: int) -> dict[str, float]:
    """Rates use the best time (as ``timeit`` does): on a shared machine other work only ever
    adds time. The median is kept alongside."""
    best = min(seconds)
    return {"s_best": best, "s_median": statistics.median(seconds), "images_per_s": images / best}


# --- preprocessing ----------------------------------------------------------------------------


def jpeg_blobs(width: int, height: int, count: int = 16, seed: int = 0) -> list[bytes]:
    """``count`` synthetic images of ``width``×``height`` encoded as JPEG (quality 90)."""
    images, _ = synthetic_images(n_classes=count, per_class=1, seed=seed, size=max(width, height))
    blobs = []
    for image in images[:, :, :height, :width]:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


class _ProcessorDataset(Dataset):
    """The report's dataset: decode one JPEG, run the CLIP image processor on it."""

    def __init__(self, blobs: list[bytes], length: int, processor):
        self.blobs, self.length, self.processor = blobs, length, processor

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image = Image.open(io.BytesIO(self.blobs[i % len(self.blobs)])).convert("RGB")
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0], i % N_CLASSES


def bench_preprocessing(
    blobs: list[bytes], n_images: int, batch: int, workers: int, passes: int, device: torch.device
) -> dict[str, float]:
    """Images/s (best of ``passes`` passes over ``n_images``, after one untimed pass) of: the
    report's DataLoader (to the device); the report-era PIL processor; our one-time cache build
    (decode, resize to uint8); our per-epoch path (index the device-resident cache, normalize)."""
    loaders = {
        name: DataLoader(
            _ProcessorDataset(blobs, n_images, processor),
            batch_size=batch,
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
        for name, processor in (("report", CLIPImageProcessor()), ("report_pil", _pil_processor()))
    }

    def report_pass(loader: DataLoader) -> None:
        for pixels, _ in loader:
            pixels.to(device)

    def cache_build() -> Tensor:
        images = (Image.open(io.BytesIO(blobs[i % len(blobs)])) for i in range(n_images))
        return torch.stack([image_to_uint8(image) for image in images])

    cached = cache_build().to(device)

    def ours_pass() -> None:
        order = torch.randperm(n_images, device=device)
        for start in range(0, n_images, batch):
            normalize(cached[order[start : start + batch]])

    fns = {name: partial(report_pass, loader) for name, loader in loaders.items()}
    fns |= {"cache_build": cache_build, "ours": ours_pass}
    times = time_round_robin(fns, warmup=1, repeats=passes, device=device)
    result = {f"{name}_images_per_s": n_images / min(seconds) for name, seconds in times.items()}
    result["speedup"] = result["ours_images_per_s"] / result["report_images_per_s"]
    result["speedup_vs_pil"] = result["ours_images_per_s"] / result["report_pil_images_per_s"]
    return result


def _pil_processor():
    # transformers 5's CLIPImageProcessor is the torchvision backend; the report's transformers 4
    # default was the PIL/NumPy one, kept in 5 as CLIPImageProcessorPil.
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil()


# --- training steps, tracking -----------------------------------------------------------------


@dataclass
class _Rig:
    """The models, images and step-0 references one model size is timed on."""

    model: CLIPClassifier
    report_model: CLIPClassifier
    dtype: torch.dtype | None
    report_dtype: torch.dtype | None
    pool: tuple[Tensor, Tensor]  # training images (N, 3, 224, 224) uint8, labels (N,)
    metric: tuple[Tensor, Tensor]  # the metric subset
    batches: list[Tensor]  # index tensors of one batch each
    report_batches: list[Tensor]  # the report loader's CPU float batches
    initial: Tensor  # pre-trained [CLS] attention of the metric subset


def _rig(size: str, args: argparse.Namespace, device: torch.device) -> _Rig:
    batch = args.batch_size
    dtype = autocast_dtype("auto", device)
    model = CLIPClassifier(random_clip(size, attn="sdpa"), N_CLASSES).to(device).train()
    report_model = CLIPClassifier(random_clip(size, attn="eager"), N_CLASSES).to(device).train()
    # Training images and the metric subset: synthetic, 224 px, uint8 on the device.
    pool = synthetic_images(N_CLASSES, math.ceil(4 * batch / N_CLASSES), seed=1, size=224)
    pool = tuple(t.to(device) for t in pool)
    per_class = math.ceil(args.metric_images / N_CLASSES)
    metric = synthetic_images(N_CLASSES, per_class, seed=2, size=224)
    metric = tuple(t[: args.metric_images].to(device) for t in metric)
    n_batches = len(pool[0]) // batch
    batches = [torch.arange(i * batch, (i + 1) * batch, device=device) for i in range(n_batches)]
    return _Rig(
        model, report_model, dtype,
        report_dtype=torch.float16 if device.type == "cuda" else None,
        pool=pool, metric=metric, batches=batches,
        # The report's loader hands over CPU float batches; the copy to the device is its step's.
        report_batches=[normalize(pool[0][b]).cpu() for b in batches],
        initial=cls_attention(model, metric[0], dtype),
    )  # fmt: skip


def _step_functions(rig: _Rig, args: argparse.Namespace, device) -> dict[str, Callable]:
    """One training step of the report's path and of ours with each regularizer, each on the
    next batch; ours is what ``run_experiment`` runs per step: ``TrainingLoss`` (compiled per
    ``--compile``), the device-side sums, ``Optimization.step``; nothing read back."""
    train = TrainSpec(lr=1e-5, warmup_fraction=0.0)
    images, labels = rig.pool
    # Step-0 references, as run_experiment prepares them.
    floor = layer_metrics(rig.initial)["entropy"].to(device)
    ours = Optimization.of(rig.model, train, 10**6, rig.dtype)
    report = _report_optimization(rig, train, device)
    counter = itertools.count(1)
    sums = StepSums(device)

    def report_step() -> None:
        k = next(counter) % len(rig.batches)
        pixels = rig.report_batches[k].to(device)
        half = rig.report_dtype is not None
        with torch.autocast(device.type, dtype=torch.float16, enabled=half):
            logits = report_logits(rig.report_model, pixels)
            loss = classification_loss(logits, labels[rig.batches[k]])
        loss.item()  # the report's loop reads its loss every step
        report.step(loss)

    def our_step(spec: RegSpec) -> Callable[[], None]:
        reg = RegularizerInputs.prepare(spec, rig.model, floor, images, rig.dtype)
        loss_fn = TrainingLoss(rig.model, reg, rig.dtype, args.compile)

        def step() -> None:
            index = rig.batches[next(counter) % len(rig.batches)]
            batch = Batch.take(images, labels, index, flips=None)
            loss, logits, penalty = loss_fn(batch)
            sums.add(1, loss, logits, batch.labels, penalty)
            ours.step(loss)

        return step

    return {"report": report_step} | {name: our_step(reg) for name, reg in OUR_STEPS}


def _report_optimization(rig: _Rig, train: TrainSpec, device) -> Optimization:
    """The report's optimizer: unfused AdamW, same schedule, clip 1.0, fp16 GradScaler."""
    params = list(rig.report_model.parameters())
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, 10**6)
    scaler = torch.amp.GradScaler(device.type, enabled=rig.report_dtype == torch.float16)
    return Optimization(params, optimizer, scheduler, scaler, 1.0)


def _flops_per_image(rig: _Rig) -> float:
    """Model FLOPs of one training step (forward + backward) per image, counted on the eager
    model: the same arithmetic as sdpa, and FlopCounterMode does not see the CPU sdpa kernel."""
    pixels = rig.report_batches[0].to(rig.pool[0].device)
    with FlopCounterMode(display=False) as flops:
        logits = rig.report_model(pixels)
        classification_loss(logits, rig.pool[1][rig.batches[0]]).backward()
    rig.report_model.zero_grad(set_to_none=True)
    return flops.get_total_flops() / len(pixels)


def bench_size(size: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Step, tracking and regularizer timings of one model size."""
    rig = _rig(size, args, device)
    steps = _step_functions(rig, args, device)
    step_times = time_round_robin(steps, args.warmup, args.steps, device)
    model, (metric_images, metric_labels) = rig.model, rig.metric
    evals = time_round_robin(
        {
            "snapshot": lambda: snapshot(model, metric_images, rig.initial, MAP_IMAGES, rig.dtype),
            "eval": lambda: accuracy(model, metric_images, metric_labels, rig.dtype),
        },
        warmup=1,
        repeats=args.evals,
        device=device,
    )
    flops_per_image = _flops_per_image(rig)
    peak = peak_flops(device, args.peak_tflops)
    step = {}
    for name, seconds in step_times.items():
        stats = _stats(seconds, args.batch_size)
        achieved = flops_per_image * stats["images_per_s"]
        stats |= {"flops_per_s": achieved, "mfu": achieved / peak if peak else None}
        step[name] = stats
    snapshot_s = min(evals["snapshot"])
    eval_ips = len(metric_images) / min(evals["eval"])
    vision = model.vision_model.config
    profile = {name: profile_step(steps[name], device) for name in ("report", "ours")}
    return {
        "step_profile": profile,
        "model": {
            "size": size,
            "vision_hidden": vision.hidden_size,
            "vision_layers": vision.num_hidden_layers,
            "vision_heads": vision.num_attention_heads,
            "classifier_params": sum(p.numel() for p in model.parameters()),
        },
        "precision": {
            "ours": str(rig.dtype or torch.float32),
            "report": str(rig.report_dtype or torch.float32),
        },
        "flops_per_image": flops_per_image,
        "peak_flops": peak,
        "step": step,
        "step_speedup": step["ours"]["images_per_s"] / step["report"]["images_per_s"],
        "snapshot_s": snapshot_s,
        "eval_images_per_s": eval_ips,
    } | _implied(step, snapshot_s, eval_ips, len(metric_images))


def _implied(step: dict, snapshot_s: float, eval_ips: float, n_metric: int) -> dict[str, Any]:
    """Tracking and regularizer overheads and the study time the measured rates imply."""
    # APR's cache is built by the same capture forward as a snapshot (less the metrics).
    capture_ips = n_metric / snapshot_s
    step_ips = {name: step[name]["images_per_s"] for name, _ in OUR_STEPS}
    # Tracking: evals_per_epoch snapshots per epoch, over an epoch's training time.
    work = study_workload()
    full_profile = load_config("full", "E2")
    per_epoch = full_profile.train.evals_per_epoch
    tracking = {}
    for dataset, pool in POOL_SIZES.items():
        epoch_s = pool * (1 - full_profile.data.val_fraction) / step_ips["ours"]
        tracking[dataset] = 100 * per_epoch * snapshot_s / epoch_s
    study = implied_study_s(work, step_ips, snapshot_s, eval_ips, capture_ips)
    tracking["study"] = 100 * study["tracking"] / study["train"]
    regularizers = {
        name: 100 * (step[name]["s_best"] / step["ours"]["s_best"] - 1) for name, _ in OUR_STEPS[1:]
    }
    return {
        "capture_images_per_s": capture_ips,
        "tracking_overhead_pct": tracking,
        "regularizer_overhead_pct": regularizers,
        "implied_study_s": study,
        "implied_report_train_s": work["total_train_images"] / step["report"]["images_per_s"],
    }


# --- the study end to end ---------------------------------------------------------------------


def bench_study(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The down-scaled real study (:mod:`collapse_utils.projection`) once per ``--runs-per-gpu``
    value: every trained run of the profile, ``--study-scale`` of its work, packed K at a time."""
    works, stands_for = study_work(args.study_profile), None
    if args.study_runs:
        works = works[: args.study_runs]
    if args.study_sample:
        works, stands_for = sample_by_kind(works)
    # The profile's own train.compile on CUDA; eager on CPU, where compiling costs minutes a run.
    mode = args.study_compile or (None if device.type == "cuda" else "off")
    if mode is not None:
        train = {"compile": mode}
        works = [replace(w, config=w.config.with_overrides(train=train)) for w in works]
    size = "full" if device.type == "cuda" else "smoke"
    peak = peak_flops(device, args.peak_tflops)
    return {
        str(k): project_study(works, args.study_scale, k, size, str(device), peak, stands_for)
        for k in args.runs_per_gpu
    }


# Issue 24's targets: (what, limit, which side is met).
TRACKING_MAX_PCT, REGULARIZER_MAX_PCT = 3.0, 10.0
STUDY_MAX_S, STUDY_MIN_MFU = 20 * 60, 0.35


def targets(result: dict[str, Any]) -> dict[str, bool]:
    """Which targets this run meets: tracking ≤ 3 % of the study and each regularizer ≤ 10 % of
    a step (per model size); with ``--study``, the projected study ≤ 20 min and ≥ 35 % MFU
    (the best runs-per-GPU value). Only meaningful on the GPU the study targets."""
    met = {}
    for size, s in result["sizes"].items():
        met[f"{size}: tracking <= 3% of the study"] = (
            s["tracking_overhead_pct"]["study"] <= TRACKING_MAX_PCT
        )
        for name, pct in s["regularizer_overhead_pct"].items():
            met[f"{size}: {name} <= 10% of a step"] = pct <= REGULARIZER_MAX_PCT
    for k, study in result.get("study", {}).items():
        met[f"study, {k} per GPU: <= 20 min"] = study["projected_study_s"] <= STUDY_MAX_S
        met[f"study, {k} per GPU: >= 35% MFU"] = (study["mfu"] or 0) >= STUDY_MIN_MFU
    return met


# --- the program ------------------------------------------------------------------------------


def hardware(device: torch.device) -> dict[str, Any]:
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available_cpus(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu_memory_gb": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    return info


def _cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds this process and its children used, CPU seconds the whole machine was busy)
    so far; None where /proc/stat is missing."""
    stat = Path("/proc/stat")
    if not stat.exists():
        return None
    user, nice, system, _idle, _iowait, irq, softirq = map(int, stat.read_text().split()[1:8])
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    return own, (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark per ``args`` (see :func:`parser`); returns what it writes."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available")
    sizes = args.size or ("both" if device.type == "cuda" else "smoke")
    sizes = ["smoke", "full"] if sizes == "both" else [sizes]
    torch.manual_seed(0)
    cpu_before = _cpu_seconds()
    preprocessing = {
        name: bench_preprocessing(
            jpeg_blobs(w, h),
            args.prep_images,
            args.batch_size,
            args.workers,
            args.prep_passes,
            device,
        )
        for name, (w, h) in PREP_IMAGES.items()
    }
    created = datetime.now(timezone.utc)
    result = {
        "created": created.isoformat(timespec="seconds"),
        "hardware": hardware(device),
        "versions": package_versions(),
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
        "workload": study_workload(),
        "preprocessing": preprocessing,
        "sizes": {size: bench_size(size, args, device) for size in sizes},
    }
    if args.study:
        result["study"] = bench_study(args, device)
    result["targets"] = targets(result)
    if cpu_before is not None:
        own, busy = (
            after - before for after, before in zip(_cpu_seconds(), cpu_before, strict=True)
        )
        # Well above 0: other processes shared the CPUs during the run; its times are inflated.
        result["hardware"]["cpu_busy_by_others"] = max(0.0, 1 - own / busy) if busy else 0.0
    out = Path(args.out)
    write_json(out / f"bench-{created:%Y%m%dT%H%M%SZ}.json", result)
    write_json(out / "latest.json", result)
    return result


def format_table(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    lines = [f"{hw['device_name']}, torch {result['versions']['torch']}"]
    if "cpu_busy_by_others" in hw:
        lines[0] += f"; CPU time used by other processes {100 * hw['cpu_busy_by_others']:.0f}%"
    lines.append(
        f"{'preprocessing (images/s)':<28}{'report':>10}{'report_pil':>12}{'ours':>12}"
        f"{'speedup':>9}{'cache build':>13}"
    )
    for name, p in result["preprocessing"].items():
        lines.append(
            f"{name:<28}{p['report_images_per_s']:>10.0f}{p['report_pil_images_per_s']:>12.0f}"
            f"{p['ours_images_per_s']:>12.0f}{p['speedup']:>8.0f}×"
            f"{p['cache_build_images_per_s']:>13.0f}"
        )
    for size, s in result["sizes"].items():
        lines.append(
            f"\n{size} model ({s['model']['classifier_params'] / 1e6:.1f} M params, "
            f"{s['flops_per_image'] / 1e9:.2f} GFLOP/image per step)"
        )
        lines.append(f"{'training step':<28}{'images/s':>10}{'TFLOP/s':>10}{'MFU':>8}")
        for name, st in s["step"].items():
            mfu = "-" if st["mfu"] is None else f"{100 * st['mfu']:.1f}%"
            tflops = st["flops_per_s"] / 1e12
            lines.append(f"{name:<28}{st['images_per_s']:>10.1f}{tflops:>10.3f}{mfu:>8}")
        t, r = s["tracking_overhead_pct"], s["regularizer_overhead_pct"]
        lines.append(
            f"step speed-up ours/report {s['step_speedup']:.2f}×; snapshot {s['snapshot_s']:.3f} s"
        )
        for name, prof in s["step_profile"].items():
            busy = prof["device_busy_share"]
            lines.append(
                f"{name} step: {prof['ops_per_step']:.0f} top-level ops"
                + ("" if busy is None else f", {prof['kernels_per_step']:.0f} kernels, "
                   f"device busy {100 * busy:.0f}%")
            )  # fmt: skip
        lines.append("tracking overhead " + ", ".join(f"{k} {v:.2f}%" for k, v in t.items()))
        lines.append("regularizer overhead " + ", ".join(f"{k} {v:+.1f}%" for k, v in r.items()))
        study = s["implied_study_s"]
        lines.append(
            f"implied study ({result['workload']['total_train_images'] / 1e6:.2f} M training "
            f"images, estimate): {study['total'] / 60:.1f} min ours ("
            + ", ".join(f"{k} {v / 60:.1f}" for k, v in study.items() if k != "total")
            + f"); report-path training alone {s['implied_report_train_s'] / 60:.1f} min"
        )
    unmet = [name for name, ok in result.get("targets", {}).items() if not ok]
    lines.append("targets not met: " + ("; ".join(unmet) if unmet else "none"))
    for k, study in result.get("study", {}).items():
        mfu = "-" if study["mfu"] is None else f"{100 * study['mfu']:.1f}%"
        lines.append(
            f"study projection, {k} run(s) per device, scale {study['scale']}: "
            f"{study['projected_study_s'] / 60:.1f} min projected ({len(study['runs'])} runs, "
            f"measured {study['measured_wall_s']:.0f} s), MFU {mfu}; "
            + ", ".join(
                f"{b} {v / 60:.1f} min" for b, v in study["projected_by_backbone_s"].items()
            )
        )
    return "\n".join(lines)


QUICK = {"steps": 2, "warmup": 1, "evals": 1, "batch_size": 8, "prep_images": 16, "prep_passes": 1}


def available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parser() -> argparse.ArgumentParser:
    summary = __doc__.split("\n\n")[0]
    p = argparse.ArgumentParser(prog="python -m collapse_utils.bench", description=summary)
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument(
        "--size",
        choices=("smoke", "full", "both"),
        help="model size (default: both with CUDA, smoke on CPU)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--evals", type=int, default=5, help="timed snapshot / eval calls")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--metric-images", type=int, default=200)
    p.add_argument("--prep-images", type=int, default=512, help="images per preprocessing run")
    p.add_argument("--prep-passes", type=int, default=3, help="timed preprocessing passes")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (report path)")
    p.add_argument("--threads", type=int, default=available_cpus(), help="torch CPU threads")
    p.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="off",
        help="train.compile for our steps: off (eager), or a torch.compile mode",
    )
    p.add_argument(
        "--study",
        action="store_true",
        help="also rehearse the whole study down-scaled and project its wall time",
    )
    p.add_argument("--study-profile", default="full", help="the profile whose runs --study takes")
    p.add_argument("--study-scale", type=float, default=0.02, help="share of each run's work")
    p.add_argument("--study-runs", type=int, help="only the first N runs (a quick check)")
    p.add_argument(
        "--study-sample",
        action="store_true",
        help="rehearse one run per kind of step, weighted by how many runs it stands for",
    )
    p.add_argument(
        "--study-compile",
        choices=COMPILE_MODES,
        help="train.compile of every --study run (default: the profile's on CUDA, off on CPU)",
    )
    p.add_argument(
        "--runs-per-gpu",
        type=int,
        nargs="+",
        default=[1],
        metavar="K",
        help="--study once per value: K runs at once on the device",
    )
    p.add_argument("--peak-tflops", type=float, help="override the GPU peak (TFLOP/s) for MFU")
    p.add_argument(
        "--quick", action="store_true", help=f"tiny counts (defaults {QUICK}), for tests"
    )
    p.add_argument("--out", default=str(REPO_ROOT / "outputs" / "bench"))
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    if p.parse_args(argv).quick:
        p.set_defaults(**QUICK)  # flags given explicitly still win
    result = run(p.parse_args(argv))
    print(format_table(result))
    return result


if __name__ == "__main__":
    main()
