"""The explorer without a kernel: the saved [CLS] maps embedded in the page with a small viewer
script, so a reader of the static book moves run, layer, step, image and head and the picture
changes (the widget explorer in ``explore.py`` needs a live kernel).

To keep a page to a few MB only part of each run's saved maps is embedded: the first
:data:`IMAGES` images, at every tracking step, per layer the mean of the heads and the first
:data:`HEADS` heads, as [CLS]→patch weights relative to the strongest patch of the row in 256
levels (what the viewer shades); images as 112 px PNG, each distinct image once.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from collapse_utils.book.explore import RunMaps, available_runs
from collapse_utils.book.figures import ATTENTION_ALPHA, ATTENTION_RGB, ATTENTION_SCALE

IMAGES = 2
HEADS = 1
IMAGE_PX = 112


def _png(image: np.ndarray) -> str:
    """(3, S, S) uint8 → a ``data:`` URL of a small PNG."""
    picture = Image.fromarray(np.transpose(image, (1, 2, 0))).resize((IMAGE_PX, IMAGE_PX))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _levels(weights: np.ndarray) -> list[int]:
    """(patches,) weights → 0..255 relative to the largest."""
    return np.round(255 * weights / max(float(weights.max()), 1e-12)).astype(int).tolist()


def _run_entry(run: RunMaps, pictures: dict[str, str]) -> dict[str, Any]:
    """steps, image keys and weights[step][image][layer][head] (head 0: the mean of the heads,
    then heads 1..HEADS), each a list of patch levels (:func:`_levels`)."""
    n_images = min(IMAGES, run.maps.shape[1])
    n_heads = min(HEADS, run.maps.shape[3])
    keys = []
    for image in run.images[:n_images]:
        key = hashlib.sha1(image.tobytes()).hexdigest()[:12]
        pictures.setdefault(key, _png(image))
        keys.append(key)
    heads = [None, *range(n_heads)]
    layers = range(run.maps.shape[2])
    weights = [
        [[[_levels(run.patches(s, i, layer, h)) for h in heads] for layer in layers]
         for i in range(n_images)]
        for s in range(len(run.steps))
    ]  # fmt: skip
    return {"steps": run.steps.tolist(), "images": keys, "heads": n_heads, "weights": weights,
            "title": run.history.label}  # fmt: skip


def explorer_data(output_root: Path | str, ids: Collection[str] | None = None) -> dict[str, Any]:
    """Everything the viewer shows: ``runs`` (label → entry, see :func:`_run_entry`) of every
    run with maps, or of the runs of ``ids``, and ``pictures`` (image key → PNG data URL)."""
    pictures: dict[str, str] = {}
    found = available_runs(output_root).items()
    runs = {label: _run_entry(RunMaps.load(files), pictures) for label, files in found
            if ids is None or files.run_dir.parent.name in ids}  # fmt: skip
    return {"runs": runs, "pictures": pictures}


def explorer_html(
    output_root: Path | str,
    element_id: str = "cls-explorer",
    ids: Collection[str] | None = None,
    initial: str | None = None,
) -> str:
    """A self-contained viewer (controls, a canvas and the data) for a static page, of every
    run or of the runs of ``ids``. It opens as the widget explorer does: run ``initial`` (else
    the first), last layer, mean of the heads, image 1, last step."""
    content = explorer_data(output_root, ids)
    data = json.dumps(content, separators=(",", ":"))
    runs = content["runs"]
    chosen = initial if initial in runs else next(iter(runs), None)
    options = "".join(
        f"<option{' selected' if r == chosen else ''}>{html.escape(r)}</option>" for r in runs
    )
    red = ",".join(str(c) for c in ATTENTION_RGB)
    page = (_TEMPLATE.replace("__CX_ID__", element_id).replace("__CX_OPTIONS__", options)
            .replace("__CX_RGB__", red).replace("__CX_ALPHA__", str(ATTENTION_ALPHA))
            .replace("__CX_SCALE__", html.escape(ATTENTION_SCALE)))  # fmt: skip
    return page.replace("__CX_DATA__", data)


_TEMPLATE = """
<div id="__CX_ID__" class="cls-explorer" style="font-size:0.9em">
 <label>configuration <select data-control="run">__CX_OPTIONS__</select></label>
 <label>image <select data-control="image"></select></label>
 <label>head <select data-control="head"></select></label><br>
 <label>layer <input data-control="layer" type="range" min="1" value="1"></label>
 <label>step <input data-control="step" type="range" min="0" value="0"></label>
 <div data-control="label" style="font-weight:bold"></div>
 <canvas width="336" height="336" style="border:1px solid #ccc"></canvas>
 <div style="font-size:0.85em;color:#555">0 <span style="display:inline-block;width:10em;
 height:0.8em;background:linear-gradient(to right,rgba(__CX_RGB__,0),
 rgba(__CX_RGB__,__CX_ALPHA__))"></span> 1: __CX_SCALE__ (CLS→CLS dropped, renormalised).</div>
</div>
<script>
(function () {
  const data = __CX_DATA__;
  const root = document.getElementById("__CX_ID__");
  const $ = (name) => root.querySelector(`[data-control="${name}"]`);
  const canvas = root.querySelector("canvas"), ctx = canvas.getContext("2d");
  const pictures = {};
  function fit() {
    const run = data.runs[$("run").value];
    const option = (text, i) => `<option value="${i}">${text}</option>`;
    $("image").innerHTML = run.images.map((_, i) => option(i + 1, i)).join("");
    const heads = [...Array(run.heads).keys()].map((h) => `head ${h + 1}`);
    $("head").innerHTML = ["mean of heads", ...heads].map(option).join("");
    $("layer").max = run.weights[0][0].length;
    $("layer").value = run.weights[0][0].length;
    $("step").max = run.steps.length - 1;
    $("step").value = run.steps.length - 1;
  }
  function draw() {
    const run = data.runs[$("run").value];
    const s = +$("step").value, i = +$("image").value, l = +$("layer").value - 1;
    const w = run.weights[s][i][l][+$("head").value];
    const key = run.images[i];
    const head = +$("head").value ? `head ${$("head").value}` : "mean of heads";
    $("label").textContent =
      `${run.title}: image ${i + 1}, layer ${l + 1}, ${head}, step ${run.steps[s]}`;
    const picture = pictures[key] || (pictures[key] = new Image());
    const paint = () => {
      ctx.drawImage(picture, 0, 0, canvas.width, canvas.height);
      const side = Math.round(Math.sqrt(w.length)), cell = canvas.width / side;
      w.forEach((v, p) => {
        ctx.fillStyle = `rgba(__CX_RGB__,${(__CX_ALPHA__ * v / 255).toFixed(3)})`;
        ctx.fillRect((p % side) * cell, Math.floor(p / side) * cell, cell, cell);
      });
      canvas.dataset.drawn = `${$("run").value}|${s}|${i}|${l}|${$("head").value}`;
    };
    if (picture.complete && picture.src) return paint();
    picture.onload = paint;
    picture.src = data.pictures[key];
  }
  $("run").addEventListener("change", () => { fit(); draw(); });
  ["image", "head", "layer", "step"].forEach((n) => $(n).addEventListener("input", draw));
  ["image", "head"].forEach((n) => $(n).addEventListener("change", draw));
  fit(); draw();
})();
</script>
"""
