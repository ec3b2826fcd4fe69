"""Atomic file writes: a crash never leaves a half-written result behind."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def _temp_for(path: Path) -> Path:
    """A temp name unique to this process, beside ``path``: parallel writers of one cache file
    never share a temp file, and the last rename wins with a complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")


def _replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` via a temp file and rename."""
    tmp = _temp_for(path)
    tmp.write_text(json.dumps(payload, indent=1, default=_jsonable))
    _replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_torch(path: Path, payload: Any) -> None:
    """``torch.save`` via a temp file and rename."""
    import torch  # lazily: analysis code writes JSON through this module without torch

    tmp = _temp_for(path)
    torch.save(payload, tmp)
    _replace(tmp, path)


def write_safetensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str]):
    """Weights as safetensors (contiguous CPU copies) via a temp file and rename."""
    from safetensors.torch import save_file

    tmp = _temp_for(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata)
    _replace(tmp, path)


def cache_key(*parts: Any) -> str:
    """16 hex digits identifying a cached result by everything it depends on (dataclasses,
    names, numbers)."""
    text = json.dumps(parts, sort_keys=True, default=_key_part)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _key_part(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else _jsonable(value)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete temp files a killed process left behind; returns what was removed."""
    stale = list(folder.glob(f"*{TMP_SUFFIX}")) if folder.exists() else []
    for path in stale:
        path.unlink()
    return stale


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "tolist"):  # torch tensors and numpy arrays
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
