"""What each book page shows: run pages (one configuration) and family comparison pages.

Notebooks call one function per page; the function runs or loads results, displays tables and
figures, saves the figures under ``<output_root>/figures/`` and glues every number the page's
prose uses. The key ``findings`` holds the page's summary paragraph as Markdown, glued in both
modes of a family notebook, so its markdown cell ``{glue:md}`findings``` always resolves.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from IPython.display import Markdown, display
from myst_nb import glue

from collapse_utils.analysis.results import load_histories, pct_change, run_means, run_summary
from collapse_utils.book import figures as plots
from collapse_utils.config import RunConfig, load_config, load_family, profile_output_root

if TYPE_CHECKING:
    from collapse_utils.training.experiment import RunResult

SMOKE_NOTE = (
    "*Smoke profile: a tiny random CLIP on synthetic images. These numbers check the pipeline; "
    "they are not findings.*"
)
METRIC_NAMES = {
    "entropy": "entropy",
    "erf": "ERF@0.95",
    "gini": "Gini",
    "head_diversity": "head diversity",
}


# --- shared ---------------------------------------------------------------------------------


def _note(profile: str) -> str:
    return SMOKE_NOTE + "\n\n" if profile == "smoke" else ""


def _show_figure(fig, profile: str, name: str) -> None:
    plots.save_figure(fig, profile_output_root(profile), name)
    display(fig)


def _glue_findings(profile: str, text: str) -> None:
    glue("findings", Markdown(_note(profile) + text), display=False)


def config_table(config: RunConfig) -> pd.DataFrame:
    """The settings a reader needs to interpret one run, as a one-column table."""
    train, data = config.train, config.data
    dataset = data.dataset + (" (synthetic stand-in)" if data.synthetic_stand_in else "")
    rows = {
        "description": config.description,
        "profile": config.profile,
        "dataset": dataset,
        "method": train.method,
        "learning rate": train.lr,
        "epochs": train.epochs,
        "batch size": train.batch_size,
        "weight decay": train.weight_decay,
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
    return pd.DataFrame({"value": [str(v) for v in rows.values()]}, index=list(rows))


def _study(profile: str) -> tuple[list[dict], pd.DataFrame]:
    """All complete histories of the profile and one summary row per run (seeds averaged)."""
    histories = load_histories(profile_output_root(profile))
    return histories, run_means(run_summary(histories)).reset_index()


def _pick(histories: list[dict], ids: Sequence[str]) -> list[dict]:
    """The histories of ``ids`` in that order (lowest seed where a run has several: curves show
    one seed); says which are missing instead of failing."""
    by_id: dict[str, dict] = {}
    for history in sorted(histories, key=lambda h: -h.seed):
        by_id[history.id] = history
    missing = [i for i in ids if i not in by_id]
    if missing:
        display(Markdown(f"**Not complete yet, left out:** {', '.join(missing)}"))
    return [by_id[i] for i in ids if i in by_id]


def _rows(summary: pd.DataFrame, ids: Sequence[str]) -> pd.DataFrame:
    return summary.set_index("run").reindex([i for i in ids if i in set(summary["run"])])


def comparison_table(summary: pd.DataFrame, ids: Sequence[str]) -> pd.DataFrame:
    """Best accuracy and each metric's final value and Δ% first → final (report §3.2.1)."""
    rows = _rows(summary, ids)
    table = pd.DataFrame({"best acc": rows["best_acc"]}, index=rows.index)
    for metric, name in METRIC_NAMES.items():
        table[name] = rows[f"{metric}_f"]
        table[f"Δ{name} %"] = rows[f"d_{metric}_pct"]
    return table.round(4)


def _family_ids(profile: str, family: str) -> list[str]:
    return [c.id for c in load_family(profile, family)]


# --- run pages ------------------------------------------------------------------------------


def run_page(profile: str, config_id: str) -> RunResult:
    """Run (or load) one configuration and show its settings, curves and per-layer heat map."""
    # Imported here: torch/transformers/PEFT take seconds to import and only run pages train.
    from collapse_utils.training.experiment import run_experiment

    config = load_config(profile, config_id)
    display(config_table(config))
    result = run_experiment(config, progress=False)
    history = result.history
    first, last = history.evals[0].metrics, history.evals[-1].metrics
    values = {m: (float(np.mean(first[m])), float(np.mean(last[m]))) for m in METRIC_NAMES}
    for metric, (start, end) in values.items():
        glue(f"{metric}_0", start, display=False)
        glue(f"{metric}_f", end, display=False)
        glue(f"d_{metric}_pct", pct_change(start, end), display=False)
    zeroshot = history.zeroshot
    if config.train.method == "none":
        _show_figure(plots.baseline_structure([history]), profile, f"fig2_baseline_{config_id}")
        display(_per_layer_table(history))
        text = (
            f"The pre-trained model's layer-mean [CLS]→patch entropy on the "
            f"{config.data.metric_subset} metric-subset images is {values['entropy'][0]:.3f} "
            f"nats, ERF@0.95 {values['erf'][0]:.3f}, Gini {values['gini'][0]:.3f} and head "
            f"diversity {values['head_diversity'][0]:.3f}."
        )
    else:
        _show_figure(plots.training_curves(history), profile, f"fig3_triple_curve_{config_id}")
        _show_figure(plots.layer_heatmaps([history]), profile, f"fig4_layer_entropy_{config_id}")
        glue("best_acc", history.best_val_acc, display=False)
        glue("final_acc", history.final_val_acc, display=False)
        text = (
            f"Best validation accuracy {history.best_val_acc:.3f} (final "
            f"{history.final_val_acc:.3f}). Layer-mean entropy went from "
            f"{values['entropy'][0]:.3f} to {values['entropy'][1]:.3f} nats "
            f"({_pct(values['entropy'])}), ERF@0.95 {_pct(values['erf'])}, Gini "
            f"{_pct(values['gini'])}, head diversity {_pct(values['head_diversity'])}."
        )
    for name, zs in zeroshot.items():
        glue(f"zs_{name}", zs.accuracy, display=False)
        text += (
            f" Zero-shot {name}: {zs.accuracy:.3f} against {zs.pretrained_accuracy:.3f} "
            f"for the pre-trained model ({zs.n_images} images, {zs.templates} templates)."
        )
    _glue_findings(profile, text)
    return result


def _pct(pair: tuple[float, float]) -> str:
    return f"{pct_change(*pair):+.2f} %"


def _per_layer_table(history: dict) -> pd.DataFrame:
    metrics = history.evals[0].metrics
    table = pd.DataFrame({METRIC_NAMES[m]: metrics[m] for m in METRIC_NAMES})
    table.index = pd.RangeIndex(1, len(table) + 1, name="layer")
    return table.round(4)


# --- family pages ---------------------------------------------------------------------------


def baseline_summary(profile: str) -> None:
    """Report §3.1 / §6.2: the pre-trained attention structure on each dataset."""
    histories, _ = _study(profile)
    chosen = _pick(histories, _family_ids(profile, "baseline"))
    _show_figure(plots.baseline_structure(chosen), profile, "fig2_baseline_structure")
    rows = []
    for history in chosen:
        for metric, name in METRIC_NAMES.items():
            values = np.array(history.evals[0].metrics[metric])
            rows.append(
                {
                    "baseline": history.id,
                    "metric": name,
                    "mean": values.mean(),
                    "std": values.std(ddof=1),
                    "min": values.min(),
                    "max": values.max(),
                }
            )
    table = pd.DataFrame(rows).set_index(["baseline", "metric"]).round(4)
    display(table)
    text = " ".join(
        f"On {h.id}, layer-mean entropy is {np.mean(h.evals[0]['metrics']['entropy']):.3f} "
        f"nats and the most concentrated layer is layer "
        f"{int(np.argmin(h.evals[0]['metrics']['entropy'])) + 1}."
        for h in chosen
    )
    _glue_findings(profile, text)


def full_vs_lora_summary(profile: str) -> None:
    """Report §3.2: full fine-tuning against LoRA on EuroSAT (E2, E4–E6) and Pets (E3, E7)."""
    histories, summary = _study(profile)
    display(comparison_table(summary, ["E2", "E3", "E4", "E5", "E6", "E7"]))
    heat = _pick(histories, ["E2", "E3", "E5", "E7"])
    _show_figure(plots.layer_heatmaps(heat), profile, "fig4_layer_entropy_heatmap")
    eurosat = _pick(histories, ["E2", "E4", "E5", "E6"])
    pets = _pick(histories, ["E3", "E7"])
    fig = plots.metric_trajectories(eurosat, "Full FT vs LoRA (EuroSAT)")
    _show_figure(fig, profile, "fig5_fullft_vs_lora")
    fig = plots.metric_trajectories(pets, "Full FT vs LoRA (Pets)")
    _show_figure(fig, profile, "fig5b_fullft_vs_lora_pets")
    all_runs = eurosat + pets
    for metric, name in (
        ("head_diversity", "fig9_head_diversity"),
        ("gini", "fig17_gini_evolution"),
        ("erf", "extra_erf95_evolution"),
    ):
        _show_figure(plots.single_metric_trajectories(all_runs, metric), profile, name)
    rank = _rows(summary, ["E4", "E5", "E6"])[["rank", "best_acc", "d_entropy_pct", "d_gini_pct"]]
    display(rank.round(4))
    full = summary[summary["run"].isin(["E2", "E3"])]["d_entropy_pct"].mean()
    lora = summary[summary["run"].isin(["E4", "E5", "E6", "E7"])]["d_entropy_pct"].mean()
    glue("full_mean_d_entropy", full, display=False)
    glue("lora_mean_d_entropy", lora, display=False)
    _glue_findings(
        profile,
        f"Averaged over runs, layer-mean entropy changed by {full:+.2f} % under full fine-tuning "
        f"(E2, E3) and by {lora:+.2f} % under LoRA (E4–E7). Whether that difference is more than "
        "noise is tested in the statistics chapter.",
    )


def lr_sweep_summary(profile: str) -> None:
    """Report §3.4: the learning-rate sweep, with E2 as the default-rate point."""
    histories, summary = _study(profile)
    ids = [*_family_ids(profile, "lr_sweep"), "E2"]
    chosen = _pick(histories, ids)
    rows = _rows(summary, ids).reset_index().sort_values("lr")
    table = rows.set_index("run")[
        ["lr", "best_acc", "d_entropy_pct", "d_erf_pct", "d_gini_pct", "zs_cifar100"]
    ]
    display(table.round(4))
    _show_figure(plots.lr_sweep(rows, chosen), profile, "fig6_lr_sweep")
    steepest = rows.loc[rows["d_entropy_pct"].idxmin()]
    _glue_findings(
        profile,
        f"Across {len(rows)} learning rates from {rows['lr'].min():g} to {rows['lr'].max():g}, "
        f"the largest entropy drop is {steepest['d_entropy_pct']:+.2f} % at lr "
        f"{steepest['lr']:g}. The correlation with log learning rate, with exact p-values, is in "
        "the statistics chapter.",
    )


def layer_freezing_summary(profile: str) -> None:
    """Report §3.5: freezing the first k layers (E2 is k = 0)."""
    _, summary = _study(profile)
    rows = _rows(summary, ["E2", *_family_ids(profile, "layer_freezing")]).reset_index()
    display(rows.set_index("run")[["freeze_layers", "best_acc", "d_entropy_pct"]].round(4))
    fig = plots.ablation_effect(rows, "freeze_layers", "frozen layers", "Layer freezing")
    _show_figure(fig, profile, "extra_frozen_layers")
    span = rows["d_entropy_pct"].max() - rows["d_entropy_pct"].min()
    _glue_findings(
        profile,
        f"Across 0–{int(rows['freeze_layers'].max())} frozen layers the entropy change spans "
        f"{span:.2f} percentage points and best accuracy ranges from {rows['best_acc'].min():.3f} "
        f"to {rows['best_acc'].max():.3f}.",
    )


def lora_targets_summary(profile: str) -> None:
    """Report §3.6: LoRA on q,v (E5) against q,k,v,o (A2)."""
    histories, summary = _study(profile)
    ids = ["E5", *_family_ids(profile, "lora_targets")]
    display(comparison_table(summary, ids))
    fig = plots.metric_trajectories(_pick(histories, ids), "LoRA targets: QV vs QKVO")
    _show_figure(fig, profile, "extra_lora_qkvo")
    rows = _rows(summary, ids)
    _glue_findings(
        profile,
        " ".join(
            f"{run}: Δentropy {row['d_entropy_pct']:+.2f} %, Δhead diversity "
            f"{row['d_head_diversity_pct']:+.2f} %, best accuracy {row['best_acc']:.3f}."
            for run, row in rows.iterrows()
        ),
    )


def regularization_summary(profile: str) -> None:
    """Report §3.7: APR, entropy floor and weight decay against no regularization (E2)."""
    histories, summary = _study(profile)
    ids = ["E2", *_family_ids(profile, "regularization")]
    rows = _rows(summary, ids)
    display(rows[["reg_kind", "lam", "weight_decay", "best_acc", "d_entropy_pct"]].round(4))
    fig = plots.regularization(rows.reset_index(), _pick(histories, ids))
    _show_figure(fig, profile, "fig8_regularization")
    reference = rows.loc["E2", "d_entropy_pct"] if "E2" in rows.index else float("nan")
    best = rows["d_entropy_pct"].idxmax()
    _glue_findings(
        profile,
        f"Without regularization (E2) entropy changed by {reference:+.2f} %; the setting that "
        f"kept it highest is {best} ({rows.loc[best, 'd_entropy_pct']:+.2f} %). Paired tests "
        "against E2 are in the statistics chapter.",
    )


FAMILY_SUMMARIES = {
    "baseline": baseline_summary,
    "full_vs_lora": full_vs_lora_summary,
    "lr_sweep": lr_sweep_summary,
    "layer_freezing": layer_freezing_summary,
    "lora_targets": lora_targets_summary,
    "regularization": regularization_summary,
}


def family_page(profile: str, config_id: str, family: str) -> None:
    """A family notebook's one entry point: a run page, or (``config_id == ""``) the comparison."""
    with failure_findings(profile):
        if config_id:
            config = load_config(profile, config_id)
            if config.family != family:
                raise ValueError(f"{config_id} is in family {config.family!r}, not {family!r}")
            run_page(profile, config_id)
        else:
            FAMILY_SUMMARIES[family](profile)


@contextmanager
def failure_findings(profile: str) -> Iterator[None]:
    """On an error, glue ``findings`` saying the page failed and why, then re-raise: the page
    shows the error cell and its summary paragraph names the failure instead of a stale text."""
    try:
        yield
    except BaseException as err:
        _glue_findings(profile, f"**This page failed** with `{type(err).__name__}`: {err}")
        raise


# --- cross-study pages ----------------------------------------------------------------------


def zeroshot_page(profile: str) -> pd.DataFrame:
    """Report §3.3: zero-shot accuracy of every run against the pre-trained model, for every
    zero-shot dataset of the profile. Changes are in accuracy points (×100)."""
    with failure_findings(profile):
        _, summary = _study(profile)
        runs = summary[summary["method"] != "none"].copy()
        datasets = [c[3:] for c in runs.columns if c.startswith("zs_") and
                    not c.endswith("_pretrained")]  # fmt: skip
        table = runs.set_index("run")[["method", "lr", "d_entropy_pct"]].copy()
        text = []
        for dataset in datasets:
            accuracy, pretrained = runs[f"zs_{dataset}"], runs[f"zs_{dataset}_pretrained"]
            table[f"{dataset} acc"] = accuracy.to_numpy()
            table[f"{dataset} change (points)"] = (100 * (accuracy - pretrained)).to_numpy()
            by_method = runs.groupby("method")[f"zs_{dataset}"].mean()
            glue(f"zs_pretrained_{dataset}", float(pretrained.iloc[0]), display=False)
            text.append(
                f"{dataset}: pre-trained {pretrained.iloc[0]:.3f}; "
                + ", ".join(f"mean over {m} runs {v:.3f}" for m, v in by_method.items())
                + "."
            )
        display(table.round(4))
        first = datasets[0]
        fig = plots.zeroshot_vs_collapse(runs, first)
        _show_figure(fig, profile, "fig7_collapse_vs_zeroshot")
        _show_figure(plots.zeroshot_bars(runs, first), profile, "fig15_zeroshot_extended")
        for dataset in datasets[1:]:
            fig = plots.zeroshot_bars(runs, dataset)
            _show_figure(fig, profile, f"fig15_zeroshot_extended_{dataset}")
        _glue_findings(profile, "Zero-shot accuracy — " + " ".join(text))
        return table


def reproducibility_page(profile: str) -> pd.DataFrame:
    """Profile, config hashes, package versions, hardware and wall time of every run."""
    with failure_findings(profile):
        return _reproducibility(profile)


def _reproducibility(profile: str) -> pd.DataFrame:
    histories = load_histories(profile_output_root(profile), complete_only=False)
    table = pd.DataFrame(
        [
            {
                "run": h.id,
                "seed": h.seed,
                "status": h.status,
                "config hash": h.config_hash,
                "device": h.device,
                "wall time (s)": round(h.wall_time_s, 1),
            }
            for h in histories
        ]
    ).set_index("run")
    display(table)
    versions = pd.DataFrame(
        sorted({(k, v) for h in histories for k, v in h.versions.items()}),
        columns=["package", "version"],
    )
    display(versions)
    total = float(table["wall time (s)"].sum())
    glue("n_runs", len(table), display=False)
    glue("total_wall_time_min", total / 60, display=False)
    _glue_findings(
        profile,
        f"{len(table)} runs of the {profile} profile, {int((table['status'] == 'complete').sum())}"
        f" complete, took {total / 60:.1f} minutes of training and evaluation in all "
        f"(output root `{Path(profile_output_root(profile))}`).",
    )
    return table
