"""A full-size rehearsal of the GPU profiles with nothing from the hub or the internet.

:func:`build_fixtures` writes, in the real on-disk formats, what the ``full`` profile reads:

- ``model/``: a random-init CLIP ViT-B/32 (``CLIPConfig()``'s defaults are exactly ViT-B/32)
  and ``model_b16/`` (the same with 16-pixel patches: ViT-B/16's shape, Study B's second
  backbone), saved with ``save_pretrained`` and loaded by path through the profile's
  ``model.mirrors``, each with the real CLIP BPE tokenizer built from
  ``bpe_simple_vocab_16e6.txt.gz``, the vocabulary that ships inside the ``open_clip_torch``
  wheel (installed without its dependencies: only the file is read);
- ``data/hf/<owner>__<name>/``: each Hugging Face build with its real features and its
  train/test splits (``save_to_disk``), a few random images per class;
- ``data/eurosat/2750/`` and ``data/oxford-iiit-pet/``: torchvision's layouts of EuroSAT and
  Pets. (torchvision verifies the MD5 of its CIFAR and Flowers-102 files, so those layouts
  cannot be faked without patching torchvision; the rehearsal reads them as Hugging Face builds.)

The ``rehearsal`` profile (``params/profiles/rehearsal.yaml``) extends ``full`` and points at
these folders, so ``python -m collapse_utils rehearse`` runs the full profile's code path —
loaders, full-size model, tokenizer, precision — for a few steps per configuration.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from collapse_utils.config import RunConfig, available_experiments, load_config
from collapse_utils.training.labels import CIFAR10, CIFAR100, EUROSAT, PETS
from collapse_utils.training.needs import EUROSAT_CORRUPTIONS

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# torchvision's EuroSAT class folders, in label order.
EUROSAT_FOLDERS = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
    "PermanentCrop", "Residential", "River", "SeaLake",
)  # fmt: skip
# Images per class and split of each fake build: enough for a metric subset of 20 and a batch
# (CIFAR-10 as EuroSAT: 10 classes, so it can be trained on as well as scored zero-shot).
PER_CLASS = {
    "eurosat": (4, 2), "pets": (3, 2), "cifar100": (1, 1), "cifar10": (4, 2), "flowers102": (1, 1),
}  # fmt: skip
# (image, label) columns of each build; the others use ("image", "label").
HF_COLUMNS = {"cifar100": ("img", "fine_label"), "cifar10": ("img", "label")}


class RehearsalError(RuntimeError):
    """A rehearsal fixture cannot be built (e.g. the BPE vocabulary is not installed)."""


# --- the model and its tokenizer ------------------------------------------------------------


def bpe_vocabulary() -> Path:
    """The CLIP BPE merges file inside the installed ``open_clip`` package (not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RehearsalError(
            "the CLIP BPE vocabulary comes from the open_clip_torch wheel: "
            "pip install --no-deps open_clip_torch"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise RehearsalError(f"{path}: missing from the installed open_clip_torch")
    return path


def clip_tokenizer_files(bpe: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of CLIP's tokenizer from its BPE file: 256 byte symbols, their
    end-of-word forms, 48 894 merges, then the start and end tokens (49 408 ids)."""
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, [tuple(m.split()) for m in merges]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map, which CLIP's BPE uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def save_model(folder: Path, seed: int = 0, patch_size: int = 32) -> Path:
    """A random-init ViT-B/``patch_size`` CLIP and the real CLIP tokenizer in ``folder``."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab, merges = clip_tokenizer_files(bpe_vocabulary())
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(folder)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        CLIPModel(CLIPConfig(vision_config={"patch_size": patch_size})).save_pretrained(folder)
    return folder


# --- datasets -------------------------------------------------------------------------------


def _images(rng: np.random.Generator, count: int) -> list[Image.Image]:
    """Random RGB images of varied sizes (wider, taller, smaller than 224)."""
    sizes = [(64, 48), (40, 72), (32, 32), (96, 64)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for w, h in (sizes[i % len(sizes)] for i in range(count))]  # fmt: skip


def _hf_build(name: str, rng: np.random.Generator):
    """A DatasetDict with the build's real columns, ClassLabel names and splits."""
    import datasets

    names = {
        "eurosat": list(EUROSAT),
        "pets": list(PETS),
        "cifar100": [n.replace(" ", "_") for n in CIFAR100],
        "cifar10": list(CIFAR10),
        # The build names classes by their official numbers, sorted as text.
        "flowers102": sorted(str(i) for i in range(1, 103)),
    }[name]
    image, label = HF_COLUMNS.get(name, ("image", "label"))
    splits = {}
    # EuroSAT's build also holds its seven corrupted copies of the test split (study2 reads them).
    corrupted = EUROSAT_CORRUPTIONS if name == "eurosat" else ()
    train, test = PER_CLASS[name]
    for split, per_class in (("train", train), ("test", test), *((c, test) for c in corrupted)):
        labels = [c for c in range(len(names)) for _ in range(per_class)]
        columns = {image: _images(rng, len(labels)), label: labels}
        features = {image: datasets.Image(), label: datasets.ClassLabel(names=names)}
        if name == "pets":
            columns["image_id"] = [f"{names[c]}_{i}" for i, c in enumerate(labels)]
            columns["label_cat_dog"] = [int(c >= 12) for c in labels]
            features |= {"image_id": datasets.Value("string"),
                         "label_cat_dog": datasets.ClassLabel(names=["cat", "dog"])}  # fmt: skip
        if name == "cifar100":
            columns["coarse_label"] = [c // 5 for c in labels]
            features["coarse_label"] = datasets.ClassLabel(num_classes=20)
        splits[split] = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    return datasets.DatasetDict(splits)


def save_hf_builds(data_root: Path, seed: int = 0) -> None:
    from collapse_utils.training.hf_datasets import hf_folder

    rng = np.random.default_rng(seed)
    for name in PER_CLASS:
        _hf_build(name, rng).save_to_disk(str(hf_folder(data_root / "hf", name)))


def save_torchvision_layouts(data_root: Path, seed: int = 0) -> None:
    """EuroSAT (``eurosat/2750/<Class>/*.jpg``) and Pets (``oxford-iiit-pet/images`` and its
    ``annotations/{trainval,test}.txt``) as torchvision reads them."""
    rng = np.random.default_rng(seed)
    train, test = PER_CLASS["eurosat"]
    for folder in EUROSAT_FOLDERS:
        target = data_root / "eurosat" / "2750" / folder
        target.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(_images(rng, train + test)):
            image.save(target / f"{folder}_{i + 1}.jpg")
    pets = data_root / "oxford-iiit-pet"
    (pets / "images").mkdir(parents=True, exist_ok=True)
    (pets / "annotations").mkdir(exist_ok=True)
    for split, per_class in zip(("trainval", "test"), PER_CLASS["pets"], strict=True):
        lines = []
        for c, breed in enumerate(PETS):
            stem = breed.replace(" ", "_")
            for i in range(per_class):
                image_id = f"{stem}_{split}{i}"
                _images(rng, 1)[0].save(pets / "images" / f"{image_id}.jpg")
                lines.append(f"{image_id} {c + 1} {1 + int(c >= 12)} {c + 1}")
        (pets / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")


def build_fixtures(models: dict[Path, int], data_root: Path, seed: int = 0) -> None:
    """The models (``models``: folder → patch size) and datasets (``data_root``) of the
    rehearsal, built once: a ``.complete`` marker in each records a finished build (the data
    marker also lists the builds, their sizes and splits, so a folder written before they
    changed is built again; a model's, its patch size)."""
    for model_dir, patch_size in models.items():
        marker = json.dumps({"seed": seed, "patch_size": patch_size})
        done = model_dir / ".complete"
        if not done.is_file() or json.loads(done.read_text()).get("patch_size", 32) != patch_size:
            save_model(model_dir, seed, patch_size)
            done.write_text(marker)
    marker = json.dumps({"seed": seed, "per_class": sorted(PER_CLASS.items()),
                         "corruptions": EUROSAT_CORRUPTIONS})  # fmt: skip
    done = data_root / ".complete"
    if not done.is_file() or done.read_text() != marker:
        save_hf_builds(data_root, seed)
        save_torchvision_layouts(data_root, seed)
        done.write_text(marker)


def model_fixtures(configs: Sequence[RunConfig]) -> dict[Path, int]:
    """The model folders ``configs`` load (their mirrors) → the patch size each must have."""
    return {c.model.folder(): c.model.patch_size for c in configs if c.model.source == "hub"}


def rehearse(
    profile: str = "rehearsal",
    only: Sequence[str] | None = None,
    jobs: int = 1,
    build: bool = True,
    check: Callable[[], int] | None = None,
):
    """Build the fixtures the profile points at, run ``check`` (the doctor: non-zero stops the
    rehearsal, returning None), then the book for ``profile`` (every configuration, or ``only``
    these); returns the runner's report."""
    from collapse_utils.book.runner import run_book

    configs = [load_config(profile, i) for i in available_experiments()]
    # Only the models the chosen configurations load (run names in ``only``: all of them).
    chosen = [c for c in configs if c.id in (only or ())] or configs
    build_fixtures(model_fixtures(chosen), Path(configs[0].data.root))
    if check is not None and check() != 0:
        return None
    return run_book(profile, only=only, jobs=jobs, build=build)
