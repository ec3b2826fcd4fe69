"""The profile table of book/method.md states what params/profiles/ really set."""

from __future__ import annotations

import re

import pytest

from collapse_utils.config import REPO_ROOT, load_config

METHOD = REPO_ROOT / "book" / "method.md"


def _yaml_text(value) -> list[str]:
    if isinstance(value, tuple):
        return [str(v) for v in value]
    if isinstance(value, bool):
        return ["true" if value else "false"]
    return ["null" if value is None else f"{value:g}" if isinstance(value, float) else str(value)]


def _rows() -> list[tuple[str, str, str]]:
    """(dotted field, full cell, full_clean cell) of every row of the profile table."""
    section = METHOD.read_text().split("## The profiles", 1)[1]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        field = re.search(r"\(`([a-z_.]+)`\)", cells[0]) if len(cells) == 5 else None
        if field:
            rows.append((field.group(1), cells[1], cells[2]))  # the profiles, after the choice
    return rows


def _stated(cell: str, other: list[str]) -> list[str]:
    if cell == "same":
        return other
    before_reason = cell.split(" — ")[0]
    return re.findall(r"`([^`]+)`", before_reason)


def test_the_table_covers_every_protocol_choice():
    fields = {field for field, _, _ in _rows()}
    assert {"data.split", "eval.head_diversity", "eval.metric_batch", "reg.floor_ratio",
            "reg.kl_direction", "lora.dropout", "train.freeze_embeddings",
            "eval.zeroshot_checkpoint", "data.interpolation", "data.flip"} <= fields  # fmt: skip


@pytest.mark.parametrize(("field", "full", "clean"), _rows(), ids=[r[0] for r in _rows()])
def test_profile_columns_match_the_params(field, full, clean):
    section, name = field.split(".")
    values = {}
    for profile in ("full", "full_clean"):
        values[profile] = _yaml_text(getattr(getattr(load_config(profile, "E2"), section), name))
    full_stated = _stated(full, [])
    assert full_stated == values["full"], field
    assert _stated(clean, full_stated) == values["full_clean"], field
