"""Typed, frozen run configuration and its loader.

A run is described by one :class:`RunConfig`, built by :func:`load_config` from two YAML files:
``params/profiles/<profile>.yaml`` (hardware/scale: model, data root, epochs, default learning
rates) and ``params/experiments/<id>.yaml`` (what the experiment changes). Every field is
checked before anything is loaded; a bad file raises :class:`ConfigError` naming the file and
the dotted field.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The runner points notebooks at another params folder (tests) through this variable.
PARAMS_ENV = "COLLAPSE_PARAMS_DIR"
REPO_ROOT = Path(__file__).resolve().parent.parent
PARAMS_DIR = Path(os.environ.get(PARAMS_ENV) or REPO_ROOT / "params")

# The four attention metrics of the report (§1.4); formulas in metrics.py. Here so that code
# reading results needs no torch import.
METRICS = ("entropy", "erf", "gini", "head_diversity")
DATASETS = ("eurosat", "pets", "cifar100", "cifar10", "flowers102", "synthetic")
# linear_probe: frozen encoder, head only; last_block: the last vision layer, its post-LayerNorm
# and the head (study2's baselines).
# torch.compile modes of train.compile ("off": eager). reduce-overhead adds CUDA graphs.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
# TrainSpec fields that choose how a step runs, not what it computes: outside the config hash.
EXECUTION_ONLY = ("compile", "cache_frozen")
METHODS = ("none", "full", "lora", "linear_probe", "last_block")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
REGULARIZERS = ("none", "apr", "entropy_floor")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
TEMPLATE_SETS = ("original", "single", "ensemble")
# Which weights zero-shot scores: merged = the fine-tuned vision tower and projection (LoRA
# merged); vision_base = the report's code: only the vision tower's base weights loaded into the
# pre-trained CLIP (its projection stays pre-trained, LoRA adapters are dropped).
ZEROSHOT_WEIGHTS = ("merged", "vision_base")
# Class names in zero-shot prompts: CLIP's authors' names, the source's own as stored (the
# report's code), or those with underscores as spaces (study2's); training.zeroshot.prompt_names.
CLASS_NAME_STYLES = ("readable", "build", "build_spaced")
DATA_SOURCES = ("torchvision", "hf")
SPLITS = ("heldout", "original", "fixed")
INTERPOLATIONS = ("bicubic", "bilinear")
KL_DIRECTIONS = ("initial_to_current", "current_to_initial")


class ConfigError(ValueError):
    """A configuration file is invalid; the message names the file and the field."""


@dataclass(frozen=True)
class ModelSpec:
    """Which CLIP to load. ``source='hub'`` reads ``name`` (hub id or local folder; a hub id
    listed in ``mirrors`` loads from that folder instead, e.g. a copy on a box without hub
    access); ``source='tiny'`` builds a random CLIP with the ``tiny_*`` sizes (224 px)."""

    source: str = "hub"
    name: str = "openai/clip-vit-base-patch32"
    vision_layers: int = 12
    patch_size: int = 32  # ViT-B/32; 16 for ViT-B/16 (checked against the loaded model)
    # hub id → local folder; left out of the hash (a dict has none), kept in equality
    mirrors: dict[str, str] = field(default_factory=dict, hash=False)
    tiny_hidden: int = 64
    tiny_heads: int = 4
    # Scales the random init; at 8 a tiny model's [CLS] attention is structured (entropy and
    # Gini near real CLIP's) instead of uniform, so the smoke book's curves move.
    tiny_init_factor: float = 8.0
    attn_implementation: str = "sdpa"

    def folder(self) -> Path | None:
        """The local folder the weights load from (a mirror of ``name``, or ``name`` itself
        when it is a folder), or None for a hub id to look up in the Hugging Face cache."""
        if self.name in self.mirrors:
            return resolve_path(self.mirrors[self.name], REPO_ROOT)
        return local_model_folder(self.name)


@dataclass(frozen=True)
class DataSpec:
    """Dataset and splits. ``synthetic_stand_in`` replaces the real dataset by the synthetic one
    (smoke profile) while keeping the experiment's dataset name for labels."""

    dataset: str = "eurosat"
    root: str = "data"
    download: bool = False
    val_fraction: float = 0.2
    metric_subset: int = 200
    image_size: int = 224
    synthetic_stand_in: bool = False
    synthetic_classes: int = 10
    synthetic_per_class: int = 40
    # Where images come from: torchvision datasets, or the Hugging Face builds the report's
    # code used (``data/hf/<owner>__<name>``, see training/hf_datasets.py).
    source: str = "torchvision"
    # heldout: train/val cut from the training pool (val selects the epoch), metric subset from
    # val. original: the dataset's own train/test splits; "val" accuracy is test accuracy each
    # epoch and the metric subset is drawn from test by the original RandomState rule.
    split: str = "heldout"
    interpolation: str = "bicubic"  # resize of the shorter side to image_size
    flip: bool = False  # RandomHorizontalFlip on training batches
    metric_seed: int = 42  # seed of the original metric-subset rule (fixed across run seeds)
    # split fixed (study2's): [train, val, probe] images per class, per dataset, drawn with
    # data_seed whatever the run's seed; the probe split is the metric subset.
    fixed_per_class: dict[str, tuple[int, ...]] = field(default_factory=dict)
    data_seed: int = 0

    def has_test_split(self, name: str) -> bool:
        """Whether dataset ``name`` has its own test split here (torchvision's EuroSAT has none;
        the Hugging Face build and the synthetic stand-in do)."""
        return self.synthetic_stand_in or not (name == "eurosat" and self.source == "torchvision")


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation. ``lr`` and ``epochs`` of ``None`` take the profile's defaults per method and
    dataset. ``freeze_layers`` freezes the patch embedding and the first k vision layers."""

    method: str = "full"
    lr: float | None = None
    epochs: int | None = None
    weight_decay: float = 0.01
    batch_size: int = 64
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0
    precision: str = "auto"
    freeze_layers: int = 0
    evals_per_epoch: int = 5
    # epoch: tracking points at round(k·S/n) of every epoch; global: every floor(S/n) steps of
    # the run (the report's code). S: steps per epoch, n: evals_per_epoch.
    eval_cadence: str = "epoch"
    # With freeze_layers > 0: also freeze the patch/position embeddings and the pre-LayerNorm.
    freeze_embeddings: bool = True
    # How the training step runs (not what it computes: neither field enters the config hash).
    # compile: off (eager) or a torch.compile mode; the whole loss is compiled, the capture
    # hooks of a regularizer included. cache_frozen: a linear probe trains on cached image
    # features and last-block runs on the cached inputs of the last layer (without a
    # regularizer), the frozen tower run once per image and orientation.
    compile: str = "off"
    cache_frozen: bool = True
    device: str = "auto"
    checkpoint_every: int = 1  # epochs between resume checkpoints (the last epoch always)


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.1
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    train_projection: bool = False  # the visual projection trains beside adapters and head


@dataclass(frozen=True)
class RegSpec:
    """Attention regularizer on the [CLS] row: ``apr`` (KL to pre-trained) or ``entropy_floor``.
    ``reference`` says where APR's pre-trained attention comes from: ``cache`` (computed once
    for every training image before training) or ``frozen`` (a frozen copy run every step)."""

    kind: str = "none"
    lam: float = 0.0
    reference: str = "cache"
    floor_ratio: float = 1.0  # entropy floor per layer = ratio × pre-trained mean entropy
    floor_reduction: str = "mean"  # over layers: mean, or sum (the original)
    # KL direction of APR: initial_to_current = KL(pre-trained ‖ current);
    # current_to_initial = KL(current ‖ pre-trained) (the original).
    kl_direction: str = "initial_to_current"


@dataclass(frozen=True)
class EvalSpec:
    zeroshot_datasets: tuple[str, ...] = ("cifar100",)
    templates: str = "ensemble"
    class_names: str = "readable"  # CLASS_NAME_STYLES
    zeroshot_max_images: int | None = None
    zeroshot_checkpoint: str = "final"  # weights zero-shot is measured on: final or best epoch
    zeroshot_weights: str = "merged"  # ZEROSHOT_WEIGHTS
    # autocast: metrics, accuracies and regularizer references under the training precision;
    # fp32: without autocast (the report's code), whatever the training precision.
    precision: str = "autocast"
    # §6.4 C: the regularizer tests pair layers of Δ entropy in % (delta_pct) or of final
    # entropy in nats (final_nats, the report's code).
    c_statistic: str = "delta_pct"
    # EuroSAT's seven corrupted test splits, about this many images each (study2: 1000): the
    # accuracy per split at the selected epoch; None: not measured. Only the Hugging Face build
    # (data.source: hf) has them: other sources measure nothing.
    corruption_images: int | None = None
    map_images: int = 8  # metric-subset images whose full [CLS] maps are kept per eval
    # WiSE-FT page: α evenly spaced from 0 (pre-trained) to 1 (fine-tuned), this many points
    interpolation_points: int = 11
    # per_image: head diversity of each image's maps, averaged; batch_mean: of the maps
    # averaged over each metric batch (the original).
    head_diversity: str = "per_image"
    # Metrics averaged per batch of this many metric images, then over batches (the original:
    # 32); None: over all images at once.
    metric_batch: int | None = None
    # Representation signals at every snapshot: linear CKA per layer of the [CLS] features and
    # embedding drift against the pre-trained tower, relative weight drift of the vision tower.
    representation: bool = True


@dataclass(frozen=True)
class Defaults:
    """Profile-level defaults filled into a run: learning rate per method, epochs per dataset."""

    lr: dict[str, float] = field(default_factory=lambda: {"full": 1e-5, "lora": 1e-4})
    epochs: dict[str, int] = field(default_factory=lambda: {"eurosat": 20, "pets": 30})


@dataclass(frozen=True)
class RunConfig:
    id: str
    family: str
    description: str = ""
    profile: str = "smoke"
    seed: int = 42
    output_root: str = "outputs"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    reg: RegSpec = field(default_factory=RegSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    @property
    def run_dir(self) -> Path:
        """``<output_root>/runs/<id>/seed<k>/``: seeds never overwrite each other."""
        return Path(self.output_root) / "runs" / self.id / f"seed{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Stable 12-hex-digit hash of everything that changes results: not the description,
        nor where outputs and data live (a moved repository keeps its runs), nor how a step runs
        (:data:`EXECUTION_ONLY`: a compiled run reuses an eager one's results)."""
        payload = self.to_dict()
        payload.pop("description")
        payload.pop("output_root")
        payload["data"].pop("root")
        for name in EXECUTION_ONLY:
            payload["train"].pop(name)
        text = json.dumps(payload, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def with_seed(self, seed: int) -> RunConfig:
        return dataclasses.replace(self, seed=seed)

    def with_overrides(self, **changes: Any) -> RunConfig:
        """A validated copy with top-level fields or whole-section dicts replaced, e.g.
        ``config.with_overrides(output_root="/tmp/x", train={"epochs": 1})``."""
        values, where = {}, Path("<overrides>")
        for key, value in changes.items():
            current = getattr(self, key)
            if dataclasses.is_dataclass(current) and isinstance(value, dict):
                hints = _hints(type(current))
                unknown = sorted(set(value) - set(hints))
                if unknown:
                    raise ConfigError(f"{where}: unknown field(s) {unknown} of {key!r}")
                typed = {k: _check_type(v, hints[k], f"{key}.{k}", where) for k, v in value.items()}
                value = dataclasses.replace(current, **typed)
            values[key] = value
        config = _resolve_paths(dataclasses.replace(self, **values), REPO_ROOT)
        _validate(config, {}, Path("<overrides>"))
        return config


# --- loading -------------------------------------------------------------------------------

_PROFILE_KEYS = {
    "about", "extends", "output_root", "seed", "max_seeds", "max_grid_values", "caps", "model",
    "data", "train", "lora", "reg", "eval", "defaults",
}  # fmt: skip
_EXPERIMENT_KEYS = {"id", "family", "description", "seed", "seeds", "grid"} | (
    _PROFILE_KEYS - {"defaults", "about", "extends", "max_seeds", "max_grid_values", "caps"}
)
_SECTIONS = {
    "model": ModelSpec,
    "data": DataSpec,
    "train": TrainSpec,
    "lora": LoraSpec,
    "reg": RegSpec,
    "eval": EvalSpec,
    "defaults": Defaults,
}


def available_profiles(params_dir: Path = PARAMS_DIR) -> list[str]:
    return sorted(p.stem for p in (params_dir / "profiles").glob("*.yaml"))


def experiment_files(params_dir: Path | str = PARAMS_DIR) -> list[str]:
    """Stems of ``params/experiments/*.yaml``: one configuration each, or a grid of them. A
    ``.yml`` file there is an error (it would be ignored: its configurations would never run)."""
    folder = Path(params_dir) / "experiments"
    ignored = sorted(folder.glob("*.yml"))
    if ignored:
        raise ConfigError(f"{ignored[0]}: experiment files end in .yaml; rename it")
    return sorted(p.stem for p in folder.glob("*.yaml"))


def available_experiments(params_dir: Path | str = PARAMS_DIR) -> list[str]:
    """Every configuration id: a plain experiment's id, or each point of a grid file. A grid
    point whose id is also an experiment file's is an error naming both (the file would
    silently take the point's place)."""
    stems = experiment_files(params_dir)
    ids = []
    for stem in stems:
        points = _file_ids(stem, params_dir)
        clash = [i for i in points if i != stem and i in stems]
        if clash:
            grid = Path(params_dir) / "experiments" / f"{stem}.yaml"
            raise ConfigError(
                f"{grid}: grid point {clash[0]!r} has the id of the experiment file "
                f"{clash[0]}.yaml; rename one of them"
            )
        ids += points
    return ids


Source = tuple[Path, dict[str, Any]]  # a params file and its fields


def profile_sources(profile: str, params_dir: Path | str = PARAMS_DIR) -> list[Source]:
    """The profile's file and the profiles it ``extends``, base first (later ones override)."""
    chain: list[Source] = []
    name: Any = profile
    referrer: Path | None = None  # the profile file whose ``extends`` names ``name``
    while name is not None:
        where = f"{referrer}: field 'extends': " if referrer else ""
        if not isinstance(name, str):
            raise ConfigError(f"{where}must be one profile name, got {name!r}")
        try:
            _check_name(name, "profile")
        except ConfigError as err:
            raise ConfigError(f"{where}{err}") from None
        path = Path(params_dir) / "profiles" / f"{name}.yaml"
        if not path.exists():
            raise ConfigError(
                f"{where or str(path) + ': '}unknown profile {name!r}; available: "
                f"{available_profiles(params_dir)}"
            )
        if any(path == seen for seen, _ in chain):
            raise ConfigError(f"{path}: field 'extends' makes a cycle")
        raw = _read_yaml(path, _PROFILE_KEYS)
        chain.insert(0, (path, raw))
        name, referrer = raw.get("extends"), path
    return chain


def _profile_field(profile: str, key: str, default: str, params_dir: Path | str) -> str:
    """A top-level text field of a profile, following ``extends``."""
    value, where = _profile_value(profile, key, params_dir)
    return _check_type(default if value is None else value, str, key, where)


def profile_about(profile: str, params_dir: Path | str = PARAMS_DIR) -> str:
    """The profile's one-line ``about`` (what it is for), shown on every page it builds."""
    return _profile_field(profile, "about", "", params_dir)


def profile_output_root(profile: str, params_dir: Path | str = PARAMS_DIR) -> Path:
    """``output_root`` of a profile (where its runs, figures and caches live)."""
    output_root = _profile_field(profile, "output_root", "outputs", params_dir)
    return resolve_path(output_root, params_root(params_dir))


def profile_model(profile: str, params_dir: Path | str = PARAMS_DIR) -> ModelSpec:
    """The model a profile names (its ``model:`` sections, ``extends`` followed), before any
    experiment file changes it (paths as written): e.g. the smoke profile's tiny CLIP, for
    benchmarks."""
    profiles = profile_sources(profile, params_dir)
    origin: dict[str, Path] = {}
    model = _merge_sections(profiles, origin)["model"]
    return _build(ModelSpec, model, "model", origin, profiles[-1][0])


def load_config(
    profile: str,
    experiment_id: str,
    params_dir: Path | str = PARAMS_DIR,
    seed: int | None = None,
) -> RunConfig:
    """Merge ``profiles/<profile>.yaml`` (after the profiles it ``extends``) with
    ``experiments/<experiment_id>.yaml`` into a validated :class:`RunConfig`. Later files
    override earlier ones field by field; every error names the file and the dotted field."""
    params_dir = Path(params_dir)
    profiles = profile_sources(profile, params_dir)
    experiment_file, exp = _experiment_source(experiment_id, params_dir)
    sources = [*profiles, (experiment_file, exp)]
    # Which file each field came from, so semantic errors can name it.
    origin: dict[str, Path] = {}
    sections = _merge_sections(sources, origin)
    built = {
        name: _build(cls, sections[name], name, origin, profiles[-1][0])
        for name, cls in _SECTIONS.items()
    }
    defaults: Defaults = built.pop("defaults")
    top: dict[str, Any] = {"profile": profile}
    for key in ("output_root", "seed", "id", "family", "description"):
        for source, raw in sources:
            if key in raw:
                top[key] = _check_type(raw[key], _hints(RunConfig)[key], key, source)
                origin[key] = source
    if seed is not None:
        top["seed"] = seed
    elif "seeds" in exp:
        top["seed"] = exp["seeds"][0]
    built["train"] = _fill_defaults(built["train"], built["data"], defaults, origin)
    config = _apply_caps(RunConfig(**top, **built), profiles)
    _validate(config, origin, experiment_file)
    return _resolve_paths(config, params_root(params_dir))


# Numeric fields a profile may cap (``caps:``): an experiment's larger value is lowered to it.
CAPPABLE = ("train.epochs", "eval.corruption_images", "eval.zeroshot_max_images")


def _apply_caps(config: RunConfig, profiles: list[Source]) -> RunConfig:
    """``config`` with each field the profiles' ``caps`` names lowered to its cap where the
    experiment asks for more (the smoke profile runs Study B's 6 epochs as 3); the run's
    config records the value it ran with."""
    caps: dict[str, Any] = {}
    for source, raw in profiles:
        block = raw.get("caps") or {}
        if not isinstance(block, dict):
            raise ConfigError(f"{source}: field 'caps' must be a mapping of field to a number")
        for field_name, cap in block.items():
            if field_name not in CAPPABLE:
                raise ConfigError(
                    f"{source}: field 'caps.{field_name}' is not one of {list(CAPPABLE)}"
                )
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
                raise ConfigError(
                    f"{source}: field 'caps.{field_name}' must be an integer >= 1, got {cap!r}"
                )
            caps[field_name] = cap
    for field_name, cap in caps.items():
        section, name = field_name.split(".")
        part = getattr(config, section)
        value = getattr(part, name)
        if value is not None and value > cap:
            config = dataclasses.replace(
                config, **{section: dataclasses.replace(part, **{name: cap})}
            )
    return config


def _experiment_source(experiment_id: str, params_dir: Path) -> Source:
    """The experiment file of ``experiment_id`` and its fields; for a grid point, the grid
    file with the point's values in place of ``grid``."""
    _check_name(experiment_id, "experiment id")
    path = params_dir / "experiments" / f"{experiment_id}.yaml"
    if path.exists():
        exp = _read_experiment(path)
        if "grid" in exp:
            points = list(grid_points(path, exp))
            raise ConfigError(
                f"{path}: {experiment_id!r} is a grid; load one of its points, e.g. "
                f"{points[0][0]!r} ({len(points)} points)"
            )
        return path, exp
    for stem in experiment_files(params_dir):
        grid_file = params_dir / "experiments" / f"{stem}.yaml"
        if experiment_id.startswith(f"{stem}_"):
            exp = _read_experiment(grid_file)
            for point_id, point in grid_points(grid_file, exp) if "grid" in exp else ():
                if point_id == experiment_id:
                    return grid_file, point
    raise ConfigError(
        f"{path}: unknown experiment {experiment_id!r}; "
        f"available: {available_experiments(params_dir)}"
    )


def _read_experiment(path: Path) -> dict[str, Any]:
    exp = _read_yaml(path, _EXPERIMENT_KEYS)
    for name in ("id", "family"):
        if name not in exp:
            raise ConfigError(f"{path}: field {name!r} is required")
    if exp["id"] != path.stem:
        raise ConfigError(
            f"{path}: field 'id' is {exp['id']!r} but the file is named {path.stem!r}"
        )
    _check_family(exp["family"], path, path.parent.parent)
    _check_seeds(path, exp)
    return exp


# --- grids and seeds ---------------------------------------------------------------------------
#
# An experiment file may declare ``grid:``, a mapping of dotted fields (``train.lr``) or ``seed``
# to lists of values: it stands for one configuration per combination of the non-seed axes, with
# the id ``<file id>_<value>_…`` (values in the order of _NAME_ORDER, then the file's order), and
# the ``seed`` axis gives each configuration its seeds. Any experiment may list ``seeds:`` instead
# of ``seed:``. A configuration's seeds are replicates: one run folder each, one id.

_NAME_ORDER = ("data.dataset", "train.method", "lora.rank", "train.lr")
_NAME_PREFIX = {"lora.rank": "r", "train.lr": "lr", "train.weight_decay": "wd", "reg.lam": "lam"}


def grid_points(path: Path, exp: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(id, fields)`` of every point of a grid file's ``exp``: ``fields`` is ``exp`` without
    ``grid``, with the point's values set (and ``seeds`` from a ``seed`` axis)."""
    axes = _grid_axes(path, exp)
    named = sorted(axes, key=lambda a: _NAME_ORDER.index(a) if a in _NAME_ORDER else 99)
    base = {k: v for k, v in exp.items() if k != "grid"}
    if "seed" in exp["grid"]:
        base["seeds"] = exp["grid"]["seed"]
    ids: set[str] = set()
    for values in itertools.product(*(axes[a] for a in named)):
        point, names = copy.deepcopy(base), [exp["id"]]
        for axis, value in zip(named, values, strict=True):
            section, key = axis.split(".")
            point.setdefault(section, {})[key] = value
            names.append(_value_name(axis, value))
        point_id = point["id"] = "_".join(names)
        _check_name(point_id, f"{path}: grid point id")
        if point_id in ids:
            raise ConfigError(f"{path}: field 'grid' gives two points the id {point_id!r}")
        ids.add(point_id)
        yield point_id, point


def _grid_axes(path: Path, exp: dict[str, Any]) -> dict[str, list[Any]]:
    """The grid's non-seed axes (dotted field → values), checked against the config's fields."""
    grid = exp["grid"]
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: field 'grid' must be a mapping of fields to lists of values")
    axes = {}
    for axis, values in grid.items():
        if not isinstance(values, list) or not values or len(set(map(str, values))) < len(values):
            raise ConfigError(f"{path}: field 'grid.{axis}' must be a list of distinct values")
        if axis == "seed":
            continue
        section, _, key = str(axis).partition(".")
        settings = _hints(_SECTIONS[section]) if section in _SECTIONS else {}
        if section == "defaults" or key not in settings:
            raise ConfigError(
                f"{path}: field 'grid' axis {axis!r} is not a setting; use 'seed' or "
                "<section>.<field> such as 'train.lr'"
            )
        if key in (exp.get(section) or {}):
            raise ConfigError(f"{path}: field {axis!r} is set both in 'grid' and in {section!r}")
        axes[axis] = values
    if not axes:
        raise ConfigError(f"{path}: field 'grid' needs a setting besides 'seed' (or use seeds:)")
    return axes


def _value_name(axis: str, value: Any) -> str:
    """``train.lr`` 1e-05 → ``lr1e-5``; ``lora.rank`` 8 → ``r8``; ``train.method`` full → full;
    another number is named by its field: ``train.epochs`` 3 → ``epochs3``."""
    if isinstance(value, float) or (axis == "train.lr" and isinstance(value, str)):
        mantissa, exponent = f"{float(value):e}".split("e")
        text = f"{float(mantissa):g}e{int(exponent)}"
    else:
        text = str(value).replace(" ", "")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    prefix = _NAME_PREFIX.get(axis, axis.partition(".")[2] if number else "")
    return f"{prefix}{text}"


def _check_seeds(path: Path, exp: dict[str, Any]) -> None:
    """``seeds:`` is a non-empty list of distinct seeds and excludes ``seed:`` and a grid's
    ``seed`` axis."""
    grid_seeds = isinstance(exp.get("grid"), dict) and "seed" in exp["grid"]
    if "seeds" in exp and ("seed" in exp or grid_seeds):
        raise ConfigError(f"{path}: give either 'seeds' or 'seed' (or a grid 'seed' axis)")
    if "seeds" not in exp and not grid_seeds:
        return
    name = "seeds" if "seeds" in exp else "grid.seed"  # the field as the file writes it
    seeds = exp["seeds"] if "seeds" in exp else exp["grid"]["seed"]
    if not isinstance(seeds, list) or not seeds or len(set(seeds)) < len(seeds):
        raise ConfigError(f"{path}: field {name!r} must be a list of distinct integers")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ConfigError(f"{path}: field {name!r} has {seed!r}; seeds are integers >= 0")


def _file_ids(stem: str, params_dir: Path | str) -> list[str]:
    path = Path(params_dir) / "experiments" / f"{stem}.yaml"
    exp = _read_experiment(path)
    return [i for i, _ in grid_points(path, exp)] if "grid" in exp else [stem]


def config_seeds(
    profile: str, experiment_id: str, params_dir: Path | str = PARAMS_DIR
) -> tuple[int, ...]:
    """The seeds a configuration runs with: its ``seeds`` (or grid ``seed`` axis), else the
    one ``seed`` of the experiment or profile."""
    _, exp = _experiment_source(experiment_id, Path(params_dir))
    if "seeds" not in exp:
        return (load_config(profile, experiment_id, params_dir).seed,)
    return tuple(exp["seeds"][: profile_limit(profile, "max_seeds", params_dir)])


def profile_limit(profile: str, key: str, params_dir: Path | str = PARAMS_DIR) -> int | None:
    """A profile's ``max_seeds`` (a configuration runs at most its first this many seeds);
    None: all."""
    value, where = _profile_value(profile, key, params_dir)
    return _positive_int(value, key, where)


def grid_limits(profile: str, params_dir: Path | str = PARAMS_DIR) -> dict[str, Any]:
    """A profile's ``max_grid_values`` as {experiment file stem or ``*``: limit}: an integer
    for every grid, or a mapping by file with ``*`` for the rest (a file this params folder
    lacks is no error: profiles serve several). A limit is the number of values every axis of
    that grid keeps, or a mapping {axis: number} (the other axes whole). {} when unset."""
    value, where = _profile_value(profile, "max_grid_values", params_dir)
    if value is None:
        return {}
    limits = value if isinstance(value, dict) else {"*": value}
    for stem, limit in limits.items():
        name = f"max_grid_values.{stem}" if stem != "*" else "max_grid_values"
        for axis, n in limit.items() if isinstance(limit, dict) else [("", limit)]:
            _positive_int(n, f"{name}.{axis}" if axis else name, where)
    return limits


def _profile_value(profile: str, key: str, params_dir: Path | str) -> tuple[Any, Path]:
    """A top-level field of a profile after its ``extends`` chain (None: unset) and the file
    that set it."""
    value, where = None, Path(params_dir)
    for source, raw in profile_sources(profile, params_dir):
        if key in raw:
            value, where = raw[key], source
    return value, where


def _positive_int(value: Any, key: str, where: Path) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{where}: field {key!r} must be an integer >= 1, got {value!r}")
    return value


def profile_experiments(profile: str, params_dir: Path | str = PARAMS_DIR) -> list[str]:
    """The configuration ids ``profile`` runs: :func:`available_experiments`, with each grid
    cut to a corner by the profile's ``max_grid_values`` (:func:`grid_limits`: every non-seed
    axis keeps its first values; the smoke profile checks each code path without the whole
    grid)."""
    limits = grid_limits(profile, params_dir)
    if not limits:
        return available_experiments(params_dir)
    ids = []
    for stem in experiment_files(params_dir):
        path = Path(params_dir) / "experiments" / f"{stem}.yaml"
        exp = _read_experiment(path)
        limit = limits.get(stem, limits.get("*"))
        if "grid" not in exp or limit is None:
            ids += [i for i, _ in grid_points(path, exp)] if "grid" in exp else [stem]
            continue
        axes = _grid_axes(path, exp)
        per_axis = limit if isinstance(limit, dict) else dict.fromkeys(axes, limit)
        kept = {axis: values[: per_axis.get(axis)] for axis, values in axes.items()}
        for point_id, point in grid_points(path, exp):
            if all(_get(point, axis) in values for axis, values in kept.items()):
                ids.append(point_id)
    return ids


def _get(fields: dict[str, Any], dotted: str) -> Any:
    section, key = dotted.split(".")
    return fields[section][key]


def plan_runs(
    profile: str, params_dir: Path | str = PARAMS_DIR, seeds: tuple[int, ...] | None = None
) -> list[RunConfig]:
    """Every run of the study: each configuration once per seed (its own seeds, or ``seeds``
    for every configuration), all validated before anything runs; in id order, then seed."""
    runs = []
    for i in profile_experiments(profile, params_dir):
        config = load_config(profile, i, params_dir)
        runs += [config.with_seed(s) for s in seeds or config_seeds(profile, i, params_dir)]
    return runs


def run_name(config: RunConfig, several_seeds: bool) -> str:
    """A run's readable name: the id, with ``_s<seed>`` when its configuration has several."""
    return f"{config.id}_s{config.seed}" if several_seeds else config.id


def _merge_sections(sources: list[Source], origin: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Each section's fields, later sources overriding earlier ones field by field."""
    sections: dict[str, dict[str, Any]] = {}
    for section in _SECTIONS:
        merged: dict[str, Any] = {}
        for source, raw in sources:
            block = raw.get(section) or {}
            if not isinstance(block, dict):
                raise ConfigError(f"{source}: field {section!r} must be a mapping")
            for key, value in block.items():
                merged[key] = value
                origin[f"{section}.{key}"] = source
        sections[section] = merged
    return sections


def params_root(params_dir: Path | str = PARAMS_DIR) -> Path:
    """The folder holding ``params/``: every relative path in params resolves against it,
    never against the current directory."""
    return Path(params_dir).resolve().parent


def resolve_path(path: str | Path, root: Path) -> Path:
    """``path`` if absolute (``~`` expanded), else ``root / path``."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else root / path


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def local_model_folder(name: str, root: Path = REPO_ROOT) -> Path | None:
    """The folder ``model.name`` means (absolute, relative names under ``root``), or None when
    it is a hub id: ``name`` or ``owner/name`` that is not a folder. ``./m``, ``~/m``, ``a/b/c``
    and ``../m`` are folders."""
    path = resolve_path(name, root).resolve()
    if path.is_dir() or not _HUB_ID.fullmatch(name) or ".." in name:
        return path
    return None


def _resolve_paths(config: RunConfig, root: Path) -> RunConfig:
    """Output root, data root and a local model folder as absolute paths under ``root``."""
    model = config.model
    mirrors = {hub_id: str(resolve_path(path, root)) for hub_id, path in model.mirrors.items()}
    model = dataclasses.replace(model, mirrors=mirrors)
    folder = local_model_folder(model.name, root) if model.source == "hub" else None
    if folder is not None and model.name not in mirrors:
        model = dataclasses.replace(model, name=str(folder))
    return dataclasses.replace(
        config,
        output_root=str(resolve_path(config.output_root, root)) if config.output_root else "",
        data=dataclasses.replace(config.data, root=str(resolve_path(config.data.root, root))),
        model=model,
    )


def load_family(profile: str, family: str, params_dir: Path | str = PARAMS_DIR) -> list[RunConfig]:
    """All experiment configs of one family, in id order."""
    _check_family(family, Path(params_dir) / "families.yaml", params_dir)
    configs = [
        load_config(profile, i, params_dir) for i in profile_experiments(profile, params_dir)
    ]
    return [c for c in configs if c.family == family]


def _check_family(family: Any, source: Path, params_dir: Path | str) -> None:
    """``family`` must be one of ``params/families.yaml`` (the book's families)."""
    from collapse_utils.families import family_names  # families.py imports this module

    _choice(family, family_names(params_dir), "family", {}, source)


# YAML 1.1 numbers a reader would not mean: 010 (octal 8), 1:30 (sexagesimal 90).
_SURPRISING_NUMBER = re.compile(r"[-+]?(0[0-9_]+|[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?)")
_NUMBER_TAGS = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
MAX_YAML_DEPTH = 32  # a params file nests a few levels; 20 000 brackets are an attack


class _UniqueKeyLoader(yaml.SafeLoader):
    """The params files' YAML loader: it rejects a key given twice in one mapping (PyYAML keeps
    the last), a number YAML 1.1 would read as octal or sexagesimal (``010`` → 8,
    ``1:30`` → 90: quote it or write it plainly), anchors and aliases (a "billion laughs" file
    expands past any memory) and nesting deeper than :data:`MAX_YAML_DEPTH`; each error names
    the field or the line."""

    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in params files: write the value",
                self.peek_event().start_mark)  # fmt: skip
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                self.peek_event().start_mark)  # fmt: skip
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"field {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
            items = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for item in items:
                if (isinstance(item, yaml.ScalarNode) and item.tag in _NUMBER_TAGS
                        and _SURPRISING_NUMBER.fullmatch(item.value)):  # fmt: skip
                    raise yaml.constructor.ConstructorError(
                        None, None, f"field {key!r}: {item.value} reads as a different number "
                        "under YAML 1.1 (octal or base 60); write it without a leading zero or "
                        "colon, or quote it", item.start_mark)  # fmt: skip
        return super().construct_mapping(node, deep)


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]*")


def _check_name(name: str, what: str) -> None:
    """Ids and profile names become folder names: letters, digits, ``_ . = -`` only."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"{what} {name!r} is not a safe name (letters, digits, '_', '.', '=', '-'; "
            "no path separators)"
        )


def read_params_yaml(path: Path) -> Any:
    """A params file's YAML (UTF-8, no key given twice); :class:`ConfigError` names the file.
    Each text is parsed once (pages load every configuration many times)."""
    return copy.deepcopy(_parse_params_yaml(Path(path), Path(path).read_bytes()))


@functools.lru_cache(maxsize=512)
def _parse_params_yaml(path: Path, data: bytes) -> Any:
    try:
        return yaml.load(data.decode("utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err


def _read_yaml(path: Path, allowed: set[str]) -> dict[str, Any]:
    raw = read_params_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{path}: unknown field {key!r}; allowed: {sorted(allowed)}")
    return raw


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, raw: dict[str, Any], section: str, origin: dict[str, Path], fallback: Path):
    hints = _hints(cls)
    values = {}
    for key, value in raw.items():
        source = origin.get(f"{section}.{key}", fallback)
        if key not in hints:
            raise ConfigError(
                f"{source}: unknown field '{section}.{key}'; allowed: {sorted(hints)}"
            )
        values[key] = _check_type(value, hints[key], f"{section}.{key}", source)
    return cls(**values)


def _check_type(value: Any, hint: Any, name: str, source: Path) -> Any:
    """Return ``value`` converted to ``hint`` (int→float, list→tuple) or raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], name, source)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: field {name!r} must be a list, got {value!r}")
        return tuple(_check_type(v, args[0], name, source) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: field {name!r} must be a mapping, got {value!r}")
        return {
            _check_type(k, args[0], name, source): _check_type(v, args[1], f"{name}.{k}", source)
            for k, v in value.items()
        }
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads "1e-5" (no dot) as a string; accept it as a number.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: field {name!r} must be true/false, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"{source}: field {name!r} must be an integer, got {value!r}")
    if not isinstance(value, hint):
        raise ConfigError(
            f"{source}: field {name!r} must be {hint.__name__}, got {type(value).__name__} "
            f"{value!r}"
        )
    return value


def _fill_defaults(
    train: TrainSpec, data: DataSpec, defaults: Defaults, origin: dict[str, Path]
) -> TrainSpec:
    lr, epochs = train.lr, train.epochs
    if train.method != "none":
        if lr is None:
            lr = defaults.lr.get(train.method)
            origin["train.lr"] = origin.get("defaults.lr", Path("defaults.lr"))
        if epochs is None:
            epochs = defaults.epochs.get(data.dataset)
            origin["train.epochs"] = origin.get("defaults.epochs", Path("defaults.epochs"))
    return dataclasses.replace(train, lr=lr, epochs=epochs)


def _choice(value: Any, allowed: tuple[str, ...], name: str, origin: dict[str, Path], fb: Path):
    if value not in allowed:
        raise ConfigError(
            f"{origin.get(name, fb)}: field {name!r} is {value!r}; must be one of {list(allowed)}"
        )


# Fields with a closed set of values (tuple fields: every element).
_CHOICES: dict[str, tuple[str, ...]] = {
    "model.source": ("hub", "tiny"),
    "model.attn_implementation": ("sdpa", "eager"),
    "data.dataset": DATASETS,
    "data.source": DATA_SOURCES,
    "data.split": SPLITS,
    "data.interpolation": INTERPOLATIONS,
    "train.method": METHODS,
    "train.precision": PRECISIONS,
    "train.eval_cadence": ("epoch", "global"),
    "train.compile": COMPILE_MODES,
    "lora.targets": LORA_TARGETS,
    "reg.kind": REGULARIZERS,
    "reg.reference": ("cache", "frozen"),
    "reg.floor_reduction": ("mean", "sum"),
    "reg.kl_direction": KL_DIRECTIONS,
    "eval.zeroshot_datasets": DATASETS,
    "eval.templates": TEMPLATE_SETS,
    "eval.class_names": CLASS_NAME_STYLES,
    "eval.zeroshot_checkpoint": ("final", "best"),
    "eval.zeroshot_weights": ZEROSHOT_WEIGHTS,
    "eval.precision": ("autocast", "fp32"),
    "eval.c_statistic": ("delta_pct", "final_nats"),
    "eval.head_diversity": ("per_image", "batch_mean"),
}
# Numeric ranges: field → (low, high, low inclusive, high inclusive); None means unbounded.
# Every float is also checked to be finite. ``None`` values (optional fields) are skipped.
_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "model.vision_layers": (1, None, True, True),
    "model.patch_size": (1, None, True, True),
    "eval.interpolation_points": (2, None, True, True),
    "model.tiny_hidden": (1, None, True, True),
    "model.tiny_heads": (1, None, True, True),
    "model.tiny_init_factor": (0, None, False, True),
    "data.val_fraction": (0, 1, False, False),
    "data.metric_subset": (1, None, True, True),
    "data.image_size": (32, None, True, True),
    "data.synthetic_classes": (2, 100, True, True),  # labels.SYNTHETIC has 100 names
    "data.synthetic_per_class": (2, None, True, True),
    "train.lr": (0, None, False, True),
    "train.epochs": (1, None, True, True),
    "train.weight_decay": (0, None, True, True),
    "train.batch_size": (1, None, True, True),
    "train.warmup_fraction": (0, 1, True, False),
    "train.grad_clip": (0, None, False, True),
    "train.evals_per_epoch": (1, None, True, True),
    "train.checkpoint_every": (1, None, True, True),
    "lora.rank": (1, 4096, True, True),
    "lora.alpha": (0, None, False, True),
    "lora.dropout": (0, 1, True, False),
    "reg.lam": (0, None, True, True),
    "reg.floor_ratio": (0, 1, False, True),
    "eval.zeroshot_max_images": (1, None, True, True),
    "eval.corruption_images": (1, None, True, True),
    "eval.map_images": (0, None, True, True),
    "eval.metric_batch": (1, None, True, True),
    "seed": (0, 2**32 - 1, True, True),
}


def _field(c: RunConfig, name: str) -> Any:
    value: Any = c
    for part in name.split("."):
        value = getattr(value, part)
    return value


def _check_range(value: Any, name: str, fail) -> None:
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        fail(name, f"must be a finite number, got {value}")
    low, high, low_in, high_in = _RANGES[name]
    too_low = low is not None and (value < low if low_in else value <= low)
    too_high = high is not None and (value > high if high_in else value >= high)
    if too_low or too_high:
        left = "[" if low_in else "("
        right = "]" if high_in and high is not None else ")"
        fail(name, f"must be in {left}{low}, {'∞' if high is None else high}{right}, got {value}")


def _validate(c: RunConfig, origin: dict[str, Path], fb: Path) -> None:
    def fail(name: str, message: str) -> None:
        raise ConfigError(f"{origin.get(name, fb)}: field {name!r} {message}")

    for name, allowed in _CHOICES.items():
        value = _field(c, name)
        for item in value if isinstance(value, tuple) else (value,):
            _choice(item, allowed, name, origin, fb)
    for name in _RANGES:
        _check_range(_field(c, name), name, fail)
    for section in (c.model, c.data, c.train, c.lora, c.reg, c.eval):
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                fail(f"{_section_name(section)}.{f.name}", f"must be a finite number, got {value}")
    _validate_combinations(c, fail)


def _section_name(section: Any) -> str:
    return {ModelSpec: "model", DataSpec: "data", TrainSpec: "train", LoraSpec: "lora",
            RegSpec: "reg", EvalSpec: "eval"}[type(section)]  # fmt: skip


def _validate_combinations(c: RunConfig, fail) -> None:
    """Checks that involve more than one field."""
    if c.train.method != "none" and (c.train.lr is None or c.train.epochs is None):
        fail("train.lr" if c.train.lr is None else "train.epochs", "is needed to train")
    if not 0 <= c.train.freeze_layers <= c.model.vision_layers:
        fail("train.freeze_layers", f"must be between 0 and the number of vision layers "
             f"({c.model.vision_layers}), got {c.train.freeze_layers}")  # fmt: skip
    if c.train.freeze_layers and c.train.method != "full":
        fail("train.freeze_layers", "only applies to method 'full'")
    if not c.lora.targets:
        fail("lora.targets", "must name at least one module")
    if c.reg.kind != "none" and c.train.method == "none":
        fail("reg.kind", "needs a training method")
    if c.data.split == "original" and not c.data.has_test_split(c.data.dataset):
        fail("data.split", f"'original' needs the dataset's own test split; "
             f"{c.data.dataset} from {c.data.source} has none (use data.source: hf)")  # fmt: skip
    if c.data.split == "fixed":
        counts = c.data.fixed_per_class.get(c.data.dataset)
        if counts is None or len(counts) != 3 or min(counts) < 1:
            reason = f"for {c.data.dataset!r} (data.split: fixed), got {counts!r}"
            fail("data.fixed_per_class", f"needs [train, val, probe] per class, each ≥ 1, {reason}")
    if not DEVICE.fullmatch(c.train.device):
        fail("train.device", f"is {c.train.device!r}; must be auto, cpu, cuda, cuda:<index> or mps")
    if not c.output_root.strip():
        fail("output_root", "must name a folder, got an empty string")
    if c.data.image_size % c.model.patch_size:
        fail("model.patch_size", f"must divide data.image_size ({c.data.image_size}) into "
             f"whole patches, got {c.model.patch_size}")  # fmt: skip
    if c.model.source == "tiny":
        _validate_tiny(c, fail)


def _validate_tiny(c: RunConfig, fail) -> None:
    """The tiny random CLIP: 224 px, ``tiny_hidden`` split over ``tiny_heads``."""
    if c.model.tiny_hidden % c.model.tiny_heads:
        fail("model.tiny_hidden", f"must be divisible by model.tiny_heads ({c.model.tiny_heads})")
    if c.data.image_size != 224:
        fail("data.image_size", f"must be 224 for the tiny CLIP, got {c.data.image_size}")
    if c.lora.rank > c.model.tiny_hidden:
        fail("lora.rank", f"must be <= the model width ({c.model.tiny_hidden}), got {c.lora.rank}")
