"""Which library code a page or a training run depends on, as a short hash of its source files.

A page's code is every ``collapse_utils`` module its notebook imports, followed through their
own imports (those inside functions too), read from the source files without importing them.
Training and measurement code is left out of a page's hash: a run records the hash of that code
(:func:`training_code_hash`, in its ``versions``), so a changed metric marks the *runs* stale
(``run --stale`` retrains them) instead of silently re-rendering pages over old runs.
"""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

PACKAGE = "collapse_utils"
PACKAGE_ROOT = Path(__file__).resolve().parent
# What a training run executes: its record names this code's hash (``versions``).
TRAINING_PACKAGES = ("training", "measurement")
TRAINING_CODE = "training code"  # the key in RunRecord.versions
# Set (to anything) in a kernel's environment by ``run --stale``: run_experiment trains a
# complete run again when other training code made it.
RETRAIN_STALE = "COLLAPSE_RETRAIN_STALE"


def imported_modules(source: str) -> set[str]:
    """The ``collapse_utils`` modules ``source`` imports anywhere (top level or in functions);
    ``from collapse_utils.book import figures`` names both the package and ``…book.figures``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    # Importing a module runs its packages' __init__ first.
    names |= {".".join(n.split(".")[:k]) for n in names for k in range(1, n.count(".") + 1)}
    return {n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")}


def module_file(name: str, root: Path = PACKAGE_ROOT) -> Path | None:
    """The source file of module ``name`` (``collapse_utils.a.b``) under ``root``, or None
    (a name imported from a module, such as a function, is no file)."""
    parts = name.split(".")[1:]
    stem = root.joinpath(*parts)
    for path in (stem.with_suffix(".py"), stem / "__init__.py"):
        if path.is_file():
            return path
    return None


def closure(modules: set[str], exclude: tuple[str, ...] = (), root: Path = PACKAGE_ROOT):
    """The source files of ``modules`` and of everything they import, sorted; packages
    ``exclude`` (first-level names under ``collapse_utils``) are not followed."""
    seen: set[Path] = set()
    todo = [f for f in (module_file(m, root) for m in modules) if f is not None]
    while todo:
        path = todo.pop()
        if path in seen or path.relative_to(root).parts[0] in exclude:
            continue
        seen.add(path)
        todo += [f for m in imported_modules(path.read_text()) if (f := module_file(m, root))]
    return sorted(seen)


def files_hash(files: list[Path], root: Path = PACKAGE_ROOT) -> str:
    """12 hex digits over each file's path (relative to ``root``) and bytes."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:12]


def training_code_hash(root: Path = PACKAGE_ROOT) -> str:
    """The hash of the training and measurement code (every module of
    :data:`TRAINING_PACKAGES` and what they import outside them)."""
    modules = {f"{PACKAGE}.{package}" for package in TRAINING_PACKAGES}
    modules |= {
        f"{PACKAGE}.{p.relative_to(root).with_suffix('').as_posix().replace('/', '.')}"
        for package in TRAINING_PACKAGES
        for p in (root / package).glob("*.py")
    }
    return files_hash(closure(modules, root=root), root)


def notebook_code_hash(notebook: Path, root: Path = PACKAGE_ROOT) -> str:
    """The hash of the library code a notebook's page runs (training code left out)."""
    cells = json.loads(notebook.read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    # Notebook cells may hold IPython syntax; only their import lines matter here.
    imports = "\n".join(
        line for line in source.splitlines() if line.lstrip().startswith(("import ", "from "))
    )
    modules = imported_modules("\n".join(line.strip() for line in imports.splitlines()))
    return files_hash(closure(modules, exclude=TRAINING_PACKAGES, root=root), root)


def run_code(record) -> str:
    """The training code hash a :class:`~collapse_utils.run_record.RunRecord` was made by
    ("unrecorded" for runs from before it was recorded)."""
    return record.versions.get(TRAINING_CODE, "unrecorded")


def is_stale(record, current: str | None = None) -> bool:
    """Whether other training code than ``current`` (default: this checkout's) made it."""
    return run_code(record) != (current or training_code_hash())
