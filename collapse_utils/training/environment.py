"""Where and how a run computes: device, autocast dtype, seeds and RNG state, versions."""

from __future__ import annotations

import platform
import random
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import torch

from collapse_utils.code_hash import TRAINING_CODE, training_code_hash
from collapse_utils.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device; :class:`ConfigError` if this machine lacks it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            raise ConfigError(
                f"field 'train.device' is {name!r} but this machine has {count} CUDA device(s); "
                "use auto or cpu"
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("field 'train.device' is 'mps' but MPS is not available; use auto or cpu")
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


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; a no-op context for fp32 (``dtype`` None)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a run ("not installed" for one imported from a
    checkout on the path instead: a run must not fail for want of package metadata), and the
    hash of this checkout's training and measurement code (``code_hash.TRAINING_CODE``)."""
    names = ("torch", "torchvision", "transformers", "peft", "collapse_utils")
    return {name: _version(name) for name in names} | {
        "python": platform.python_version(),
        TRAINING_CODE: training_code_hash(),
    }


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
