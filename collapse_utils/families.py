"""The book's families as data: ``params/families.yaml``, loaded and checked here.

A family is a group of experiments that differ in one setting (its *axis*, a column of
``analysis.results.run_summary``). It has one notebook and a comparison page that lists its
*reference* runs first, then its own experiments in id order. Which experiments belong to a
family is said by the experiment files (their ``family`` field, checked against this table by
``config.load_config``). The ``statistics`` block names the runs the statistics chapter singles
out. A bad file raises :class:`~collapse_utils.config.ConfigError` naming the file and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collapse_utils.config import PARAMS_DIR, ConfigError, load_family, read_params_yaml

FAMILIES_FILE = "families.yaml"
# Settings a family can vary: the columns of analysis.results.run_summary that describe a run.
AXES = ("dataset", "method", "lr", "weight_decay", "rank", "targets", "freeze_layers", "reg_kind",
        "lam")  # fmt: skip
_FAMILY_FIELDS = ("notebook", "title", "references", "axis", "study")
REPORT_STUDY = "report"  # the default ``study`` of a family: the report's own design
_STATISTICS_RUNS = ("layer_anova", "dynamics")
_STATISTICS_FAMILIES = ("method_comparison", "lr_sweep", "regularizers")


@dataclass(frozen=True)
class Family:
    name: str
    notebook: str
    title: str
    references: tuple[str, ...]
    axis: str
    # Which study the family belongs to: the report's (its runs feed the cross-study chapters:
    # findings, statistics, zero-shot, explorer) or another design with its own page (Study B).
    study: str = REPORT_STUDY
    source: Path = field(default=Path(FAMILIES_FILE), compare=False, repr=False)

    @property
    def reference(self) -> str:
        """The one reference run, for comparisons that need exactly one."""
        if len(self.references) != 1:
            raise ConfigError(
                f"{self.source}: field 'families.{self.name}.references' must name exactly one "
                f"run for this comparison, got {list(self.references)}"
            )
        return self.references[0]


@dataclass(frozen=True)
class StatisticsRuns:
    """Runs of the layer-position ANOVA (§6.4 D) and of the training-dynamics figure (§3.9),
    and the families whose runs tests A (full FT vs LoRA), B (learning rate) and C
    (regularizers against the family's reference) are about."""

    layer_anova: tuple[str, ...]
    dynamics: tuple[str, ...]
    method_comparison: str
    lr_sweep: str
    regularizers: str


def load_families(params_dir: Path | str = PARAMS_DIR) -> dict[str, Family]:
    """Family name → :class:`Family`, in book order."""
    path, raw = _read(params_dir)
    block = raw["families"]
    if not isinstance(block, dict) or not block:
        raise ConfigError(f"{path}: field 'families' must be a non-empty mapping")
    families = {name: _family(path, name, fields) for name, fields in block.items()}
    seen: dict[str, str] = {}
    for family in families.values():  # one page folder and one comparison page per notebook
        if family.notebook in seen:
            raise ConfigError(
                f"{path}: field 'families.{family.name}.notebook' is {family.notebook!r}, "
                f"already the notebook of family {seen[family.notebook]!r}; one family per "
                "notebook"
            )
        seen[family.notebook] = family.name
    return families


def load_statistics_runs(params_dir: Path | str = PARAMS_DIR) -> StatisticsRuns:
    path, raw = _read(params_dir)
    block = _mapping(path, "statistics", raw["statistics"],
                     _STATISTICS_RUNS + _STATISTICS_FAMILIES)  # fmt: skip
    families = load_families(params_dir)
    for key in _STATISTICS_FAMILIES:
        if block[key] not in families:
            raise ConfigError(f"{path}: field 'statistics.{key}' is {block[key]!r}; must be one "
                              f"of the families {list(families)}")  # fmt: skip
    runs = {key: _ids(path, f"statistics.{key}", block[key]) for key in _STATISTICS_RUNS}
    return StatisticsRuns(**runs, **{key: block[key] for key in _STATISTICS_FAMILIES})


def family_names(params_dir: Path | str = PARAMS_DIR) -> tuple[str, ...]:
    return tuple(load_families(params_dir))


def comparison_ids(profile: str, family: Family, params_dir: Path | str = PARAMS_DIR) -> list[str]:
    """The runs of a family's comparison: its references, then its experiments in id order."""
    members = [c.id for c in load_family(profile, family.name, params_dir)]
    return list(dict.fromkeys([*family.references, *members]))


def report_ids(profile: str, params_dir: Path | str = PARAMS_DIR) -> list[str]:
    """Ids of every configuration in a family of the report's study (not Study B's grid): the
    runs the cross-study chapters read."""
    families = [f for f in load_families(params_dir).values() if f.study == REPORT_STUDY]
    return [c.id for f in families for c in load_family(profile, f.name, params_dir)]


def _read(params_dir: Path | str) -> tuple[Path, dict[str, Any]]:
    path = Path(params_dir) / FAMILIES_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: missing; it lists the book's families (see params/)")
    return path, _mapping(path, "", read_params_yaml(path), ("families", "statistics"))


def _mapping(path: Path, name: str, value: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    where = f"field {name!r}" if name else "top level"
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {where} must be a mapping, got {value!r}")
    unknown = sorted(set(value) - set(fields))
    missing = [f for f in fields if f not in value]
    if unknown:
        raise ConfigError(f"{path}: {where} has unknown field(s) {unknown}; allowed {list(fields)}")
    if missing:
        prefix = f"{name}." if name else ""
        raise ConfigError(f"{path}: field {prefix + missing[0]!r} is required")
    return value


def _family(path: Path, name: str, fields: Any) -> Family:
    where = f"families.{name}"
    if isinstance(fields, dict):
        fields = {"study": REPORT_STUDY, **fields}
    fields = _mapping(path, where, fields, _FAMILY_FIELDS)
    for key in ("notebook", "title", "axis", "study"):
        if not isinstance(fields[key], str) or not fields[key]:
            raise ConfigError(f"{path}: field '{where}.{key}' must be a non-empty string")
    if fields["axis"] not in AXES:
        raise ConfigError(
            f"{path}: field '{where}.axis' is {fields['axis']!r}; must be one of {list(AXES)}"
        )
    return Family(
        name=name,
        notebook=fields["notebook"],
        title=fields["title"],
        references=_ids(path, f"{where}.references", fields["references"]),
        axis=fields["axis"],
        study=fields["study"],
        source=path,
    )


def _ids(path: Path, name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: field {name!r} must be a list of experiment ids, got {value!r}")
    return tuple(value)
