from __future__ import annotations

import json
import re

import numpy as np

from collapse_utils.book.explore import RunMaps, available_runs
from collapse_utils.book.static_explorer import HEADS, IMAGES, explorer_data, explorer_html
from collapse_utils.training.experiment import run_experiment
from tests.test_train import small


def test_the_page_embeds_every_run_step_layer_and_the_head_mean_as_levels(tmp_path):
    for experiment in ("E2", "E5"):
        run_experiment(small(tmp_path, experiment), progress=False)
    output_root = tmp_path / "out"
    data = explorer_data(output_root)
    assert set(data["runs"]) == {"E2", "E5"}
    e2 = data["runs"]["E2"]
    maps = RunMaps.load(available_runs(output_root)["E2"])
    weights = np.array(e2["weights"])  # (steps, images, layers, 1 + heads, patches)
    assert weights.shape == (len(maps.steps), min(IMAGES, 2), 3, 1 + HEADS, 49)
    assert weights.max(axis=-1).min() == 255 and weights.min() >= 0  # relative to the top patch
    mean = maps.patches(-1, 1, 2, None)
    assert np.abs(weights[-1, 1, 2, 0] - 255 * mean / mean.max()).max() <= 0.5
    assert e2["steps"] == maps.steps.tolist()
    assert set(e2["images"]) <= set(data["pictures"])
    page = explorer_html(output_root, "x1")
    embedded = re.search(r"const data = (\{.*?\});\n", page).group(1)
    assert json.loads(embedded) == json.loads(json.dumps(data))
    assert 'id="x1"' in page and "<option>E5</option>" in page
    assert "<option selected>E2</option>" in page  # no start named: the first run
    assert "<option selected>E5</option>" in explorer_html(output_root, "x2", initial="E5")
    assert e2["title"] == maps.history.label  # the run's name above the map
