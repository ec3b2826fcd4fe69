"""``python -m collapse_utils doctor --profile full``: can this machine run a profile? No training.

Every check is a function returning :class:`Check` items (one line each); :func:`run_doctor`
calls them all for every experiment of a profile and the CLI prints them. A problem line says
what to fetch or fix, with the exact command where there is one; any problem makes the CLI exit
non-zero. Checked:

- **model** — a hub id must be in the Hugging Face cache (looked up locally, never on the
  network); a local folder must hold ``config.json`` and weights. Same name rule as
  ``training.model.load_clip``: a name that exists as a folder (relative: from the repository
  root) is a folder, else a hub id.
- **data** — every split the runs decode (training dataset and zero-shot sets; the same list as
  ``training.data.prepare_datasets``) in the configured source: torchvision's folders under
  ``data.root`` or the Hugging Face builds under ``<data.root>/hf/``. A decoded cache
  ``<data.root>/cache/<source>_<name>_<split>_<size>_<interp>.pt`` (with its checksum) counts.
- **gpu** — when a run wants CUDA (``train.device`` auto/cuda, or fp16/bf16): a visible GPU, bf16
  support (``precision`` bf16 needs it; auto falls back to fp16), and total/free memory against
  :func:`gpu_need_bytes`.
- **disk** — free space on each filesystem written to against :func:`disk_needs`.
- **outputs** — ``output_root`` (and the decode cache folder when caches are to be written) can be
  written.
- **time** — the study's duration from ``outputs/bench/latest.json`` (``bench.py``'s
  ``implied_study_s`` at the measured rates), when present; never a problem.

Importing this module needs no torch; checks import it only where a profile needs it (real
datasets, a GPU).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collapse_utils.config import (
    PARAMS_DIR,
    REPO_ROOT,
    ModelSpec,
    RunConfig,
    plan_runs,
)
from collapse_utils.training.needs import EUROSAT_CORRUPTIONS, decoded_cache, splits_needed

BENCH_FILE = REPO_ROOT / "outputs" / "bench" / "latest.json"
GB = 1e9
# Images per split (ours: 'pool' = the training split, 'test'), per source; for the decode caches
# (N × 3 × S × S bytes) and the images a run keeps on the device. From the builds' cards and
# torchvision's datasets.
SPLIT_IMAGES: dict[tuple[str, str, str], int] = {
    ("torchvision", "eurosat", "pool"): 27000,
    ("torchvision", "pets", "pool"): 3680,
    ("torchvision", "pets", "test"): 3669,
    ("torchvision", "cifar100", "pool"): 50000,
    ("torchvision", "cifar100", "test"): 10000,
    ("torchvision", "cifar10", "pool"): 50000,
    ("torchvision", "cifar10", "test"): 10000,
    ("torchvision", "flowers102", "pool"): 1020,
    ("torchvision", "flowers102", "test"): 6149,
    ("hf", "eurosat", "pool"): 21600,
    ("hf", "eurosat", "test"): 2700,
    ("hf", "pets", "pool"): 3680,
    ("hf", "pets", "test"): 3669,
    ("hf", "cifar100", "pool"): 50000,
    ("hf", "cifar100", "test"): 10000,
    ("hf", "cifar10", "pool"): 50000,
    ("hf", "cifar10", "test"): 10000,
    ("hf", "flowers102", "pool"): 7169,
    ("hf", "flowers102", "test"): 1020,
    # the seven corrupted copies of EuroSAT's test split (Study B's corruption accuracy)
    **{("hf", "eurosat", corruption): 2700 for corruption in EUROSAT_CORRUPTIONS},
}
CLASSES = {"eurosat": 10, "pets": 37, "cifar100": 100, "cifar10": 10, "flowers102": 102}
CUDA_OVERHEAD_BYTES = 2**30  # CUDA context, cuBLAS/cuDNN workspaces, allocator slack
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@dataclass(frozen=True)
class Check:
    """One line of the report. ``ok`` False is a problem; ``info`` lines are never problems."""

    topic: str  # model, data, gpu, disk, outputs, time, plan
    ok: bool
    message: str
    info: bool = False

    def line(self) -> str:
        mark = "info" if self.info else ("ok" if self.ok else "FIX")
        return f"{mark:<5}{self.topic:<8}{self.message}"


def resolve(path: str | Path) -> Path:
    """A params path as an absolute path: relative ones are read from the repository root."""
    path = Path(path).expanduser()
    return (path if path.is_absolute() else REPO_ROOT / path).resolve()


def load_plan(profile: str, params_dir: Path | str = PARAMS_DIR) -> list[RunConfig]:
    """Every run of ``params_dir`` under ``profile``: each configuration once per seed."""
    return plan_runs(profile, params_dir)


# --- model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipSize:
    """The sizes that set parameter counts, activations and map sizes."""

    hidden: int = 768
    intermediate: int = 3072
    layers: int = 12
    heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    projection_dim: int = 512
    text_params: int = 63_428_096  # CLIP ViT-B/32's text tower and text projection

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layer_params(self) -> int:
        h, i = self.hidden, self.intermediate
        return 4 * (h * h + h) + 4 * h + (h * i + i) + (i * h + h)  # attention, 2 LN, MLP

    @property
    def embedding_params(self) -> int:  # patch conv (no bias), [CLS], positions, pre-LayerNorm
        h = self.hidden
        return 3 * self.patch_size**2 * h + h + (self.patches + 1) * h + 2 * h

    @property
    def vision_params(self) -> int:
        """Vision tower (embeddings, layers, post-LayerNorm) and the visual projection."""
        h = self.hidden
        return (
            self.embedding_params
            + self.layers * self.layer_params
            + 2 * h
            + h * self.projection_dim
        )

    @classmethod
    def of_config_json(cls, path: Path) -> ClipSize:
        """From a CLIP ``config.json`` (missing keys: transformers' ViT-B/32 defaults)."""
        raw = json.loads(path.read_text())
        vision, text = raw.get("vision_config") or {}, raw.get("text_config") or {}
        base = cls()
        th, ti = text.get("hidden_size", 512), text.get("intermediate_size", 2048)
        text_layer = 4 * (th * th + th) + 4 * th + (th * ti + ti) + (ti * th + th)
        projection = raw.get("projection_dim", base.projection_dim)
        text_params = (
            text.get("vocab_size", 49408) * th
            + text.get("max_position_embeddings", 77) * th
            + text.get("num_hidden_layers", 12) * text_layer
            + 2 * th
            + th * projection
        )
        return cls(
            hidden=vision.get("hidden_size", base.hidden),
            intermediate=vision.get("intermediate_size", base.intermediate),
            layers=vision.get("num_hidden_layers", base.layers),
            heads=vision.get("num_attention_heads", base.heads),
            image_size=vision.get("image_size", base.image_size),
            patch_size=vision.get("patch_size", base.patch_size),
            projection_dim=projection,
            text_params=text_params,
        )

    @classmethod
    def of_tiny(cls, spec: ModelSpec) -> ClipSize:
        """The smoke profile's tiny CLIP (``training.model.tiny_clip_config``)."""
        h = spec.tiny_hidden
        return cls(
            h, 2 * h, spec.vision_layers, spec.tiny_heads, 224, spec.patch_size, h, text_params=0
        )


def cached_model(name: str) -> Path | None:
    """The Hugging Face cache's snapshot folder of hub id ``name`` when it holds ``config.json``
    and weights, else None. Local lookup only (``HF_HUB_OFFLINE``-style, no network)."""
    import huggingface_hub
    import huggingface_hub.constants as hub

    def cached(filename: str) -> str | None:
        found = huggingface_hub.try_to_load_from_cache(name, filename, cache_dir=hub.HF_HUB_CACHE)
        return found if isinstance(found, str) else None

    config = cached("config.json")
    if config is None or not any(cached(f) for f in WEIGHT_FILES):
        return None
    return Path(config).parent


def _save_command(name: str, target: Path) -> str:
    return (
        f"python -c \"from transformers import CLIPModel; CLIPModel.from_pretrained('{name}')"
        f".save_pretrained('{target}')\""
    )


def check_model(spec: ModelSpec, profile_file: Path | None = None) -> tuple[Check, ClipSize]:
    """Whether ``spec``'s weights are on disk; also the model's sizes (from its config.json
    where found, else ViT-B/32's). ``profile_file``: where to set ``model.name``."""
    if spec.source == "tiny":
        size = ClipSize.of_tiny(spec)
        message = f"tiny random CLIP ({spec.vision_layers} layers, width {spec.tiny_hidden}): "
        return Check("model", True, message + "built in memory, nothing to fetch"), size
    folder = spec.folder()
    if folder is not None:
        present = (folder / "config.json").exists() and any(
            (folder / f).exists() for f in WEIGHT_FILES
        )
        if present:
            ok = Check("model", True, f"{spec.name}: local folder {folder}")
            return ok, ClipSize.of_config_json(folder / "config.json")
        hub_id = spec.name if spec.name in spec.mirrors else ModelSpec().name
        command = _save_command(hub_id, folder)
        message = (
            f"{spec.name}: {folder} has no config.json with weights; on a machine with hub "
            f"access run `{command}` and copy the folder to {folder}"
        )
        return Check("model", False, message), ClipSize()
    snapshot = cached_model(spec.name)
    if snapshot is not None:
        ok = Check("model", True, f"{spec.name}: Hugging Face cache {snapshot}")
        return ok, ClipSize.of_config_json(snapshot / "config.json")
    import huggingface_hub.constants as hub

    target = REPO_ROOT / "models" / spec.name.split("/")[-1]
    message = (
        f"{spec.name}: not in the Hugging Face cache {Path(hub.HF_HUB_CACHE).resolve()}; on a "
        f"machine with hub access run `{_save_command(spec.name, target)}`, copy the folder to "
        f"{target} and list it under model.mirrors ({spec.name}: {target}) in "
        f"{profile_file or 'the profile'}"
    )
    return Check("model", False, message), ClipSize()


def check_models(
    configs: list[RunConfig], params_dir: Path | str = PARAMS_DIR
) -> tuple[list[Check], ClipSize]:
    """One line per distinct model of the plan; the sizes of the (last) one for the estimates."""
    checks, size = [], ClipSize()
    for spec, profile in dict.fromkeys((c.model, c.profile) for c in configs):
        profile_file = Path(params_dir).resolve() / "profiles" / f"{profile}.yaml"
        check, size = check_model(spec, profile_file)
        checks.append(check)
    return checks, size


# --- data ----------------------------------------------------------------------------------


def dataset_needs(config: RunConfig) -> list[tuple[str, str]]:
    """(dataset, split) pairs a run decodes: ``training.needs.splits_needed``, the one rule
    ``training.data.prepare_datasets`` follows too."""
    return splits_needed(config)


def cache_file(config: RunConfig, name: str, split: str) -> Path:
    """``training.data``'s decoded cache of one split."""
    data = dataclasses.replace(config.data, root=str(resolve(config.data.root)))
    return decoded_cache(data, name, split)


def _cache_present(path: Path) -> bool:
    # The checksum beside it: without one the cache is decoded again (storage.cached).
    return path.exists() and path.with_name(path.name + ".sha256").exists()


def _hf_split_present(folder: Path, split: str) -> bool:
    """Whether ``hf_datasets.load_hf_split`` finds ``split`` in ``folder`` (same layouts)."""
    from collapse_utils.training.hf_datasets import _parquet_files

    try:
        if (folder / "dataset_dict.json").exists():
            splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
            return split in splits
        return (folder / split / "state.json").exists() or bool(_parquet_files(folder, split))
    except ValueError:  # unreadable dataset_dict.json, or the split in several layouts
        return False


def check_dataset(config: RunConfig, name: str, splits: list[str]) -> Check:
    """One dataset of one source: present when each split has a decoded cache or its source."""
    data, root = config.data, resolve(config.data.root)
    missing = [s for s in splits if not _cache_present(cache_file(config, name, s))]
    if data.source == "hf":
        from collapse_utils.training.hf_datasets import HF_BUILDS, hf_folder

        build, folder = HF_BUILDS[name], hf_folder(root / "hf", name).resolve()
        hf = {"pool": "train", "test": "test", **{c: c for c in EUROSAT_CORRUPTIONS}}
        missing = [s for s in missing if not _hf_split_present(folder, hf[s])]
        where = f"Hugging Face build {build.repo} in {folder}"
        fix = (
            f"on a machine with hub access run `hf download {build.repo} --repo-type dataset "
            f"--local-dir {folder}` and copy the folder to {folder}"
        )
        shown = hf
    else:
        from collapse_utils.training.data import torchvision_fetch_command, torchvision_missing

        absent = torchvision_missing(name, root)
        missing = missing if absent else []
        where = f"torchvision in {root}"
        fix = (
            f"{', '.join(map(str, absent))} absent; run `{torchvision_fetch_command(name, root)}` "
            "(where the host is reachable; then copy the folder here)"
        )
        shown = {s: s for s in splits}
    if not missing:
        return Check("data", True, f"{name} ({', '.join(shown[s] for s in splits)}): {where}")
    wanted = ", ".join(shown[s] for s in missing)
    return Check("data", False, f"{name} (split {wanted}) missing from {where}: {fix}")


SPLIT_ORDER = ("pool", "test", *EUROSAT_CORRUPTIONS)


def check_datasets(configs: list[RunConfig]) -> list[Check]:
    """One line per dataset and source the plan decodes."""
    wanted: dict[tuple, tuple[RunConfig, list[str]]] = {}
    for config in configs:
        d = config.data
        for name, split in dataset_needs(config):
            key = (d.source, resolve(d.root), name, d.interpolation, d.image_size)
            _, splits = wanted.setdefault(key, (config, []))
            if split not in splits:
                splits.append(split)
    if not wanted:
        return [Check("data", True, "synthetic stand-ins only: nothing to fetch")]
    return [
        check_dataset(config, key[2], sorted(splits, key=SPLIT_ORDER.index))
        for key, (config, splits) in wanted.items()
    ]


# --- sizes ---------------------------------------------------------------------------------


def _classes(config: RunConfig) -> int:
    d = config.data
    return d.synthetic_classes if d.synthetic_stand_in else CLASSES.get(d.dataset, 102)


def parameter_counts(config: RunConfig, size: ClipSize) -> tuple[int, int]:
    """(classifier parameters, trainable parameters) of a run: the vision tower, projection and
    linear head; LoRA adds rank × (in + out) per adapted matrix and trains those, the head and
    (``lora.train_projection``) the projection; full FT trains all but the frozen layers."""
    head = size.projection_dim * _classes(config) + _classes(config)
    total = size.vision_params + head
    method = config.train.method
    if method == "lora":
        lora = size.layers * len(config.lora.targets) * config.lora.rank * 2 * size.hidden
        projection = size.hidden * size.projection_dim if config.lora.train_projection else 0
        return total + lora, lora + head + projection
    if method == "full":
        frozen = config.train.freeze_layers * size.layer_params
        if config.train.freeze_layers and config.train.freeze_embeddings:
            frozen += size.embedding_params
        return total, total - frozen
    return total, 0


def split_images(config: RunConfig, name: str, split: str) -> int:
    d = config.data
    if d.synthetic_stand_in or name == "synthetic":
        return d.synthetic_classes * d.synthetic_per_class
    return SPLIT_IMAGES.get((d.source, name, split), 0)


@dataclass(frozen=True)
class DiskNeed:
    """Bytes that will be written under ``path``."""

    path: Path
    bytes: int
    what: str  # checkpoints, resume, maps, caches


def _run_done(config: RunConfig) -> bool:
    from collapse_utils.run_record import RunFiles

    files = RunFiles.of(resolve(config.output_root), config.id, config.seed)
    return (files.history if config.train.method == "none" else files.final).exists()


def disk_needs(configs: list[RunConfig], size: ClipSize, jobs: int = 1) -> list[DiskNeed]:
    """What the plan still writes, estimated (runs already complete and caches already decoded
    count nothing):

    - checkpoints: best + final weights, fp32 — full FT 2 × 4 bytes × classifier parameters,
      LoRA 2 × 4 bytes × trainable parameters (safetensors of the trainable tensors);
    - resume: ``resume.pt`` (model state 4 bytes × parameters + AdamW's two moments 8 bytes ×
      trainable parameters), deleted when a run completes: the ``jobs`` largest at once;
    - maps: fp16 [CLS] maps per evaluation (map_images × layers × heads × patches × 2 bytes) and
      the map images;
    - caches: each split not yet decoded, N × 3 × S × S bytes (uint8).
    Histories and TensorBoard logs are kilobytes and not counted."""
    needs: list[DiskNeed] = []
    resumes: list[tuple[int, Path]] = []
    for c in configs:
        if _run_done(c):
            continue
        run_dir = resolve(c.output_root)
        total, trainable = parameter_counts(c, size)
        evals = 1
        if c.train.method != "none":
            kept = total if c.train.method == "full" else trainable
            needs.append(DiskNeed(run_dir, 2 * 4 * kept, "checkpoints"))
            resumes.append((4 * total + 8 * trainable, run_dir))
            evals += (c.train.epochs or 0) * c.train.evals_per_epoch + 1
        per_eval = c.eval.map_images * size.layers * size.heads * size.patches * 2
        images = c.eval.map_images * 3 * c.data.image_size**2
        needs.append(DiskNeed(run_dir, evals * per_eval + images, "maps"))
    for nbytes, run_dir in sorted(resumes, key=lambda r: r[0], reverse=True)[:jobs]:
        needs.append(DiskNeed(run_dir, nbytes, "resume"))
    seen = set()
    for c in configs:
        for name, split in dataset_needs(c):
            path = cache_file(c, name, split)
            if path in seen or _cache_present(path):
                continue
            seen.add(path)
            nbytes = split_images(c, name, split) * 3 * c.data.image_size**2
            needs.append(DiskNeed(path.parent, nbytes, "caches"))
    return needs


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _mount(path: Path) -> Path:
    device = path.stat().st_dev
    while path != path.parent and path.parent.stat().st_dev == device:
        path = path.parent
    return path


def check_disk(needs: list[DiskNeed]) -> list[Check]:
    """Per filesystem written to: the estimated need against ``shutil.disk_usage`` free space."""
    by_device: dict[int, list[DiskNeed]] = {}
    for need in needs:
        by_device.setdefault(_existing(need.path).stat().st_dev, []).append(need)
    if not by_device:
        return [Check("disk", True, "nothing left to write (every run complete, caches decoded)")]
    checks = []
    for group in by_device.values():
        anchor = _existing(group[0].path)
        free = shutil.disk_usage(anchor).free
        total = sum(n.bytes for n in group)
        parts: dict[str, int] = {}
        for need in group:
            parts[need.what] = parts.get(need.what, 0) + need.bytes
        detail = ", ".join(f"{what} {nbytes / GB:.1f}" for what, nbytes in parts.items())
        folders = ", ".join(sorted({str(n.path) for n in group}))
        summary = f"~{total / GB:.1f} GB ({detail}) for {folders} on {_mount(anchor)}"
        if free >= total:
            checks.append(Check("disk", True, f"{summary}; {free / GB:.1f} GB free"))
        else:
            message = (
                f"only {free / GB:.1f} GB free on {_mount(anchor)} but ~{total / GB:.1f} GB "
                f"needed ({detail}) for {folders}: free space, or set output_root / data.root "
                "to a larger disk"
            )
            checks.append(Check("disk", False, message))
    return checks


def check_writable(configs: list[RunConfig]) -> list[Check]:
    """``output_root`` (and the decode cache folder where caches are still to be written) can
    take a file: a temporary file is created and removed in it or its nearest existing parent."""
    folders = {resolve(c.output_root): "output_root" for c in configs}
    for c in configs:
        for name, split in dataset_needs(c):
            path = cache_file(c, name, split)
            if not _cache_present(path):
                folders.setdefault(path.parent, "data.root cache")
    checks = []
    for folder, field in folders.items():
        anchor = _existing(folder)
        try:
            with tempfile.TemporaryFile(dir=anchor):
                pass
        except OSError as err:
            message = (
                f"{folder} ({field}) is not writable: {anchor}: {err.strerror or err}; fix its "
                f"permissions (chmod/chown {anchor}) or set {field.split()[0]} to a writable folder"
            )
            checks.append(Check("outputs", False, message))
        else:
            checks.append(Check("outputs", True, f"{folder} ({field}) is writable"))
    return checks


# --- GPU -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    name: str
    total_bytes: int
    free_bytes: int
    bf16: bool


def wants_cuda(config: RunConfig) -> bool:
    """Whether a run is meant for CUDA: ``train.device`` auto or cuda*, or 16-bit precision.
    ('auto' falls back to CPU without a GPU, which for a full-size profile is days of training.)"""
    t = config.train
    return t.device == "auto" or t.device.startswith("cuda") or t.precision in ("fp16", "bf16")


def cuda_gpu(index: int = 0) -> GpuInfo | None:
    """The CUDA device torch sees at ``index``, or None."""
    import torch

    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return None
    free, total = torch.cuda.mem_get_info(index)
    with torch.cuda.device(index):
        bf16 = torch.cuda.is_bf16_supported()
    return GpuInfo(torch.cuda.get_device_name(index), total, free, bf16)


def gpu_need_bytes(config: RunConfig, size: ClipSize) -> int:
    """Estimated peak GPU memory of a run: fp32 weights of the classifier and of the base CLIP
    (4 bytes × parameters), gradients and AdamW moments (12 bytes × trainable), a frozen copy for
    APR 'frozen', APR's cached reference rows (2 × train × layers × heads × patches × 4 bytes),
    the uint8 images of the dataset's splits, activations of one batch (Korthikanti et al. 2022:
    (34·s·h + 5·a·s²) bytes per layer and image in 16-bit, twice that in fp32) and
    :data:`CUDA_OVERHEAD_BYTES`."""
    total, trainable = parameter_counts(config, size)
    weights = 4 * (total + size.vision_params + size.text_params) + 12 * trainable
    if config.reg.kind == "apr" and config.reg.reference == "frozen":
        weights += 4 * size.vision_params
    d = config.data
    pool = split_images(config, d.dataset, "pool")
    test = split_images(config, d.dataset, "test") if d.has_test_split(d.dataset) else 0
    images = (pool + test) * 3 * d.image_size**2
    if config.reg.kind == "apr" and config.reg.reference == "cache":
        images += 2 * pool * size.layers * size.heads * size.patches * 4
    s, h, a = size.patches + 1, size.hidden, size.heads
    bytes_per_value = 2 if config.train.precision != "fp32" else 4
    per_image = (34 * s * h + 5 * a * s * s) * size.layers * bytes_per_value // 2
    activations = per_image * config.train.batch_size
    return weights + images + activations + CUDA_OVERHEAD_BYTES


_NO_GPU = object()
_HALF = ("fp16", "bf16")


def check_gpu(
    configs: list[RunConfig], size: ClipSize, gpu: Any = _NO_GPU, allow_cpu: bool = False
) -> list[Check]:
    """GPU presence, bf16 and memory for the runs that want CUDA. ``gpu``: a :class:`GpuInfo`
    or None to check against (default: ask torch). ``allow_cpu``: without a GPU, runs with
    ``train.device: auto`` (and precision auto/fp32) may train on CPU (a rehearsal, CI)."""
    cuda = [c for c in configs if wants_cuda(c)]
    if not cuda:
        devices = sorted({c.train.device for c in configs})
        return [Check("gpu", True, f"not needed (train.device {', '.join(devices)})", info=True)]
    if gpu is _NO_GPU:
        device = cuda[0].train.device
        gpu = cuda_gpu(int(device.split(":")[1]) if ":" in device else 0)
    if allow_cpu and gpu is None:
        explicit = [c for c in cuda if c.train.device != "auto" or c.train.precision in _HALF]
        if not explicit:
            message = f"no CUDA GPU: {len(cuda)} of the runs (train.device auto) train on CPU"
            return [Check("gpu", True, message, info=True)]
        cuda = explicit
    if gpu is None:
        message = (
            f"no CUDA GPU visible to torch, which {len(cuda)} of the runs want (train.device "
            f"{cuda[0].train.device}, precision {cuda[0].train.precision}): run on a GPU box "
            "(check nvidia-smi and that torch is a CUDA build), or set train.device: cpu and "
            "train.precision: fp32 to train on CPU"
        )
        return [Check("gpu", False, message)]
    checks = []
    need = max(gpu_need_bytes(c, size) for c in cuda)
    memory = f"{gpu.total_bytes / 2**30:.0f} GiB, {gpu.free_bytes / 2**30:.0f} GiB free"
    if gpu.total_bytes < need:
        message = (
            f"{gpu.name} has {memory}; the largest run needs ~{need / 2**30:.1f} GiB (estimate): "
            "use a larger GPU or lower train.batch_size"
        )
        checks.append(Check("gpu", False, message))
    elif gpu.free_bytes < need:
        message = (
            f"{gpu.name}: {memory}, the largest run needs ~{need / 2**30:.1f} GiB (estimate): "
            "stop the other processes on it (nvidia-smi)"
        )
        checks.append(Check("gpu", False, message))
    else:
        message = f"{gpu.name}, {memory}; the largest run needs ~{need / 2**30:.1f} GiB (estimate)"
        checks.append(Check("gpu", True, message))
    precisions = {c.train.precision for c in cuda}
    if gpu.bf16:
        checks.append(Check("gpu", True, "bf16 supported"))
    elif "bf16" in precisions:
        message = f"{gpu.name} has no bf16 but train.precision is bf16: set it to auto or fp16"
        checks.append(Check("gpu", False, message))
    elif "auto" in precisions:
        message = "no bf16 on this GPU: precision auto trains in fp16 with loss scaling"
        checks.append(Check("gpu", True, message, info=True))
    return checks


# --- time ----------------------------------------------------------------------------------


def estimate_time(configs: list[RunConfig], bench_file: Path = BENCH_FILE) -> list[Check]:
    """The study's duration at the benchmark's measured rates (``implied_study_s`` of its
    full-size model, the ``full`` profile's workload). Information only."""
    if all(c.model.source == "tiny" for c in configs):
        message = "no estimate for a tiny-model profile (the benchmark times the full-size study)"
        return [Check("time", True, message, info=True)]
    if not bench_file.exists():
        message = f"no benchmark at {bench_file}: run `make bench` on this machine for an estimate"
        return [Check("time", True, message, info=True)]
    from collapse_utils.storage import DamagedFileError, read_json

    try:
        bench = read_json(bench_file)
        full = bench["sizes"].get("full")
        hardware = bench["hardware"]["device_name"]
    except (DamagedFileError, OSError, ValueError, KeyError, TypeError) as err:
        message = f"cannot read {bench_file} ({err}): run `make bench` again"
        return [Check("time", True, message, info=True)]
    if full is None:
        message = (
            f"{bench_file} has no full-size figures ({hardware}): run `make bench` on the GPU "
            "(or `python bench.py --size full`)"
        )
        return [Check("time", True, message, info=True)]
    study = full["implied_study_s"]
    parts = ", ".join(f"{k} {v / 3600:.1f} h" for k, v in study.items() if k != "total")
    message = (
        f"~{study['total'] / 3600:.1f} h for the study ({parts}) at the rates measured on "
        f"{hardware} ({bench.get('created', '?')}, {bench_file}; the full profile's workload, "
        "LoRA costed as full fine-tuning)"
    )
    return [Check("time", True, message, info=True)]


# --- all -----------------------------------------------------------------------------------


def run_doctor(
    profile: str,
    params_dir: Path | str = PARAMS_DIR,
    jobs: int = 1,
    gpu: Any = _NO_GPU,
    bench_file: Path = BENCH_FILE,
    allow_cpu: bool = False,
) -> list[Check]:
    """Every check for every experiment of ``profile``, in report order (``gpu``, ``allow_cpu``:
    see :func:`check_gpu`)."""
    configs = load_plan(profile, params_dir)
    trained = sum(c.train.method != "none" for c in configs)
    roots = sorted({str(resolve(c.output_root)) for c in configs})
    plan = Check(
        "plan",
        True,
        f"profile {profile}: {len(configs)} runs ({trained} trained) from "
        f"{Path(params_dir).resolve()}, outputs in {', '.join(roots)}",
        info=True,
    )
    models, size = check_models(configs, params_dir)
    return [
        plan,
        *models,
        *check_datasets(configs),
        *check_gpu(configs, size, gpu, allow_cpu),
        *check_disk(disk_needs(configs, size, jobs)),
        *check_writable(configs),
        *estimate_time(configs, bench_file),
    ]


def problems(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.ok]


def report(checks: list[Check]) -> str:
    """The printed report: one line per check, then a summary line."""
    bad = problems(checks)
    summary = f"doctor: {len(bad)} problem{'s' * (len(bad) != 1)} (lines marked FIX)"
    return "\n".join([*(c.line() for c in checks), summary if bad else "doctor: ready"])
