"""Atomic, checksummed files: a crash never leaves a half-written result behind, and a damaged
file is detected and named instead of read.

Every ``write_*`` writes the data to a temp file and renames it, then writes the data's SHA-256
beside it (``<name>.sha256``, also atomically). ``verify`` compares the two; ``read_*`` and
:func:`cached` refuse or recompute a file whose checksum is missing or wrong. Histories are
read by structure instead (``run_record``), so a hand-edited ``history.json`` still loads.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
CHECKSUM_SUFFIX = ".sha256"


class DamagedFileError(RuntimeError):
    """A file's content does not match its checksum (or it has none); the message names it."""


class StorageError(RuntimeError):
    """A result could not be written (the message names the folder and its free space)."""


class LockedError(RuntimeError):
    """Another process holds the lock; the message names what is locked and by which pid."""


@contextmanager
def locked(lock_file: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` while the block runs; if another process holds
    it, raise :class:`LockedError` at once saying ``what`` is in use and by which pid."""
    with open(lock_file, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise LockedError(
                f"{what} is in use by another process (pid {holder}); wait for it to finish "
                "or stop it"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _temp_for(path: Path) -> Path:
    """A temp name unique to this process, beside ``path``: parallel writers of one cache file
    never share a temp file, and the last rename wins with a complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _replace(tmp: Path, path: Path, checksum: bool = True) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    digest = _digest(tmp) if checksum else None
    os.replace(tmp, path)
    if digest is not None:
        side = _temp_for(checksum_path(path))
        side.write_text(digest + "\n")
        os.replace(side, checksum_path(path))


def remove(path: Path) -> None:
    """Delete ``path`` and its checksum, if present."""
    path.unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def verify(path: Path) -> bool:
    """Whether ``path`` exists and matches the checksum written with it."""
    side = checksum_path(path)
    if not (path.exists() and side.exists()):
        return False
    return side.read_text().strip() == _digest(path)


def require_verified(path: Path) -> None:
    """Raise :class:`DamagedFileError` naming ``path`` unless it matches its checksum."""
    if not verify(path):
        reason = "missing" if not path.exists() else "damaged (checksum missing or wrong)"
        raise DamagedFileError(f"{path.resolve()}: {reason}")


def write_json(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` via a temp file and rename, with its checksum."""
    tmp = _temp_for(path)
    tmp.write_text(json.dumps(payload, indent=1, default=_jsonable))
    _replace(tmp, path)


def read_json(path: Path) -> Any:
    """JSON from ``path`` after checking its checksum."""
    require_verified(path)
    return json.loads(path.read_text())


def write_torch(path: Path, payload: Any) -> None:
    """``torch.save`` via a temp file and rename, with its checksum; a failed write (a full
    disk: torch says only ``enforce fail at inline_container.cc``) leaves no temp file and
    raises :class:`StorageError` naming the folder and its free space."""
    import torch  # lazily: analysis code writes JSON through this module without torch

    tmp = _temp_for(path)
    try:
        torch.save(payload, tmp)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        raise StorageError(
            f"{path.parent}: could not write {path.name} ({free / 2**30:.2f} GiB free there; a "
            f"full disk?): {err}"
        ) from err
    _replace(tmp, path)


def read_torch(path: Path, weights_only: bool = True) -> Any:
    """``torch.load`` of ``path`` after checking its checksum."""
    import torch

    require_verified(path)
    return torch.load(path, weights_only=weights_only)


def write_safetensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str]):
    """Weights as safetensors (contiguous CPU copies) via a temp file and rename, with checksum."""
    from safetensors.torch import save_file

    tmp = _temp_for(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata)
    _replace(tmp, path)


def read_safetensors(path: Path, device: str = "cpu") -> dict[str, Any]:
    from safetensors.torch import load_file

    require_verified(path)
    return load_file(path, device=device)


def cached(path: Path, compute: Callable[[], Any], fmt: str = "torch") -> Any:
    """The value stored at ``path`` (``fmt`` 'torch' or 'json') if it verifies, else
    ``compute()`` written there. A damaged file is named in a warning and recomputed."""
    read, write = (read_torch, write_torch) if fmt == "torch" else (read_json, write_json)
    if path.exists():
        try:
            return read(path)
        except DamagedFileError as err:
            warnings.warn(f"{err}; recomputing it", stacklevel=2)
    value = compute()
    write(path, value)
    return value


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
