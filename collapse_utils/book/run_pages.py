"""Run pages (``notebooks/run.ipynb``, one per configuration and seed): the tested pieces its
cells call — the settings table, where the run came from, its figures, its conclusion."""

from __future__ import annotations

import pandas as pd

from collapse_utils.analysis.results import pct_change
from collapse_utils.book import figures
from collapse_utils.book.page import Page
from collapse_utils.book.style import DATASET_NAMES, METRIC_NAMES
from collapse_utils.book.tables import format_change, format_lr
from collapse_utils.code_hash import run_code, training_code_hash
from collapse_utils.config import RunConfig
from collapse_utils.run_record import RunRecord


def config_table(config: RunConfig) -> pd.DataFrame:
    """The settings a reader needs to interpret one run, as a one-column table (index:
    setting)."""
    train, data = config.train, config.data
    dataset = DATASET_NAMES.get(data.dataset, data.dataset)
    dataset += " (synthetic stand-in)" if data.synthetic_stand_in else ""
    rows = {
        "description": config.description,
        "profile": config.profile,
        "dataset": dataset,
        "method": train.method,
        "learning rate": format_lr(train.lr) if train.lr is not None else None,
        "epochs": train.epochs,
        "batch size": train.batch_size,
        "weight decay": f"{train.weight_decay:g}",
        "frozen layers": train.freeze_layers,
        "LoRA": f"r={config.lora.rank}, α={config.lora.alpha}, {'/'.join(config.lora.targets)}"
        if train.method == "lora"
        else "—",
        "regularizer": f"{config.reg.kind} λ={config.reg.lam}"
        if config.reg.kind != "none"
        else "—",
        "model": config.model.name if config.model.source == "hub" else "tiny random CLIP",
        "seed": config.seed,
        "config hash": config.config_hash(),
    }
    index = pd.Index(list(rows), name="setting")
    values = ["—" if v is None else str(v) for v in rows.values()]
    return pd.DataFrame({"value": values}, index=index)


def per_layer_table(history: RunRecord) -> pd.DataFrame:
    """The four metrics (columns: metric keys) per layer (1-based index) before training (the
    first eval)."""
    metrics = history.evals[0].metrics
    table = pd.DataFrame({m: metrics[m] for m in METRIC_NAMES})
    table.index = pd.RangeIndex(1, len(table) + 1, name="layer")
    return table


def provenance(history: RunRecord, profile: str) -> str:
    """The line under a run's training: which training code made it (a warning when it is not
    this checkout's, :func:`code_warning`)."""
    return code_warning([history], profile) or (
        f"Made by this checkout's training and measurement code (`{training_code_hash()}`)."
    )


def run_figures(page: Page, config: RunConfig, history: RunRecord, name: str) -> None:
    """A baseline's pre-trained structure (figure and per-layer table), or a trained run's
    accuracy-and-entropy curves and its layer × time entropy heat map; ``name``:
    :func:`run_label`."""
    dataset = DATASET_NAMES.get(config.data.dataset, config.data.dataset)
    if config.train.method == "none":
        page.figure(
            f"fig2_baseline_{name}",
            figures.baseline_structure([history]),
            f"The pre-trained model's four [CLS]→patch attention metrics per layer on the "
            f"{dataset} metric-subset images: lower entropy and ERF@0.95 and a higher Gini "
            f"mean attention concentrated on fewer patches.",
        )
        page.table(
            "per_layer",
            per_layer_table(history),
            "The pre-trained model's four metrics in every layer.",
        )
        return
    page.figure(
        f"fig3_triple_curve_{name}",
        figures.training_curves(history),
        f"{name} over training: {history.eval_split} accuracy (blue) against layer-mean "
        "entropy (red, right axis), and the training loss; look at whether entropy keeps "
        "falling once accuracy has levelled off.",
    )
    page.figure(
        f"fig4_layer_entropy_{name}",
        figures.layer_heatmaps([history]),
        f"Entropy of every layer (rows) at every evaluation (columns) of {name}: a row that "
        "darkens from left to right is a layer whose attention concentrates.",
    )


def run_label(config: RunConfig, seed: int | None) -> str:
    """The run's name in figure files and captions: its id, with ``_s<seed>`` when the page is
    one seed of several (the runner passes ``seed`` only then)."""
    return config.id if seed is None else f"{config.id}_s{config.seed}"


def run_conclusion(config: RunConfig, history: RunRecord) -> str:
    """What the run measured, in words: the pre-trained metrics of a baseline, or accuracy and
    the change of each metric (first → last tracking point); then zero-shot transfer."""
    first, last = history.evals[0], history.evals[-1]
    values = {m: (first.layer_mean(m), last.layer_mean(m)) for m in METRIC_NAMES}
    if config.train.method == "none":
        text = (
            f"The pre-trained model's layer-mean [CLS]→patch entropy on the "
            f"{config.data.metric_subset} metric-subset images is {values['entropy'][0]:.3f} "
            f"nats, ERF@0.95 {values['erf'][0]:.3f}, Gini {values['gini'][0]:.3f} and head "
            f"diversity {values['head_diversity'][0]:.3f}."
        )
    else:
        text = (
            f"{accuracy_sentence(history, config.data.split)} Layer-mean entropy went from "
            f"{values['entropy'][0]:.3f} to {values['entropy'][1]:.3f} nats "
            f"({_pct(values['entropy'])}), ERF@0.95 {_pct(values['erf'])}, Gini "
            f"{_pct(values['gini'])}, head diversity {_pct(values['head_diversity'])}."
        )
    for name, zs in history.zeroshot.items():
        text += (
            f" Zero-shot {name} ({zs.checkpoint} epoch's weights): {_percent(zs.accuracy)} "
            f"against {_percent(zs.pretrained_accuracy)} for the pre-trained model "
            f"({zs.n_images} images, {zs.templates} templates)."
        )
    return text


def accuracy_sentence(history: RunRecord, split: str) -> str:
    """Task accuracy named for what it is: under the report's protocol ('original') the
    per-epoch accuracy, and the best epoch, are on the test split."""
    best, final = _percent(history.best_val_acc), _percent(history.final_val_acc)
    if split == "original":
        return (
            f"Best test accuracy over epochs {best} (final {final}; the report's protocol "
            "selects the epoch on test)."
        )
    text = f"Best validation accuracy {best} (final {final})."
    if history.test_acc is not None:
        text += f" Test accuracy at the selected epoch {_percent(history.test_acc)}."
    return text


def _percent(accuracy: float) -> str:
    return f"{100 * accuracy:.2f} %"


def _pct(pair: tuple[float, float]) -> str:
    return f"{format_change(pct_change(*pair))} %"


def code_warning(histories: list[RunRecord], profile: str) -> str:
    """A warning when ``histories`` were made by different training code, or by other code than
    this checkout's (:mod:`collapse_utils.code_hash`); empty when this checkout made them all."""
    current = training_code_hash()
    ids = [h.id for h in histories]
    codes = {h.id if ids.count(h.id) == 1 else f"{h.id}_s{h.seed}": run_code(h) for h in histories}
    stale = [name for name, code in codes.items() if code != current]
    retrain = f"`python -m collapse_utils run --profile {profile} --stale` trains them again"
    if len(set(codes.values())) > 1:
        made = ", ".join(f"{name} `{code}`" for name, code in codes.items())
        return (
            f"**Warning: these runs were made by different training code** ({made}; this "
            f"checkout's is `{current}`): their differences may be the code's. {retrain}."
        )
    if stale:
        return (
            f"**Warning: made by other training code** (`{codes[stale[0]]}`) than this "
            f"checkout's (`{current}`). {retrain}."
        )
    return ""
