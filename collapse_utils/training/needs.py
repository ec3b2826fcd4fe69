"""Which dataset splits a run reads: the one rule that ``training.data.prepare_datasets``
follows and that ``doctor`` checks. No torch here, so the doctor stays fast."""

from __future__ import annotations

from pathlib import Path

from collapse_utils.config import DataSpec, RunConfig

# The seven corrupted copies of EuroSAT's test split in the Hugging Face build (study2's).
EUROSAT_CORRUPTIONS = (
    "contrast", "gaussian_noise", "impulse_noise", "jpeg_compression", "motion_blur", "pixelate",
    "spatter",
)  # fmt: skip


def splits_needed(config: RunConfig) -> list[tuple[str, str]]:
    """The (dataset, split) pairs a run decodes, in order: its pool ('pool', the training
    split), the zero-shot sets' test splits (the pool where there is none: torchvision's
    EuroSAT, whose zero-shot uses val) and, with ``eval.corruption_images``, EuroSAT's corruption
    splits of the Hugging Face source. Empty for synthetic stand-ins."""
    data = config.data
    if data.synthetic_stand_in:
        return []
    names = [data.dataset, *config.eval.zeroshot_datasets]
    needs = [(data.dataset, "pool")]
    needs += [(n, "test" if data.has_test_split(n) else "pool") for n in names]
    if config.eval.corruption_images and data.dataset == "eurosat" and data.source == "hf":
        needs += [("eurosat", c) for c in EUROSAT_CORRUPTIONS]
    return [need for need in dict.fromkeys(needs) if need[0] != "synthetic"]


def decoded_cache(data: DataSpec, name: str, split: str) -> Path:
    """Where ``training.data`` keeps one decoded split: ``<root>/cache/<stem>.pt`` (and its
    ``.sha256``). ``data.root`` is absolute once the config is loaded."""
    # v2: the blobs also hold the source's own class names (build_names).
    stem = f"v2_{data.source}_{name}_{split}_{data.image_size}_{data.interpolation}"
    return Path(data.root) / "cache" / f"{stem}.pt"
