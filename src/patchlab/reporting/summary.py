"""Per-category table of a sweep, with the seed's numbers and the difference where it has them.

Rows may be any part names: seed columns appear only where the seed has a number, and a
metric a run did not produce (pixel metrics without masks) reads "-".
"""

import json
import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from patchlab.artifacts.run_files import CONFIG_FILE, METRICS_FILE, TUNING_FILE
from patchlab.data.geometry import geometry_from

# The seed notebook's per-category numbers (EfficientNet-B5, anomalib 0.7), to compare against.
SEED_METRICS = ("image_auroc", "pixel_auroc", "pixel_f1_max")

SEED_RESULTS: dict[str, tuple[float, float, float]] = {
    "bottle": (1.0000, 0.9640, 0.6342),
    "cable": (0.9878, 0.9740, 0.5952),
    "capsule": (0.9154, 0.9837, 0.4922),
    "carpet": (0.9992, 0.9836, 0.5527),
    "grid": (0.9641, 0.9533, 0.2385),
    "hazelnut": (0.9993, 0.9810, 0.5772),
    "leather": (1.0000, 0.9820, 0.3537),
    "metal_nut": (1.0000, 0.9689, 0.7745),
    "pill": (0.9569, 0.9528, 0.6050),
    "screw": (0.9309, 0.9724, 0.2910),
    "tile": (0.9870, 0.9443, 0.6046),
    "toothbrush": (0.9889, 0.9799, 0.5543),
    "transistor": (0.9987, 0.9780, 0.7013),
    "wood": (0.9798, 0.9083, 0.4600),
    "zipper": (0.9947, 0.9703, 0.4844),
}

# pixel_f1 is the honest figure (tuned on validation, scored on held-out images): threshold=optuna.
TABLE_METRICS = ("image_auroc", "pixel_auroc", "pixel_f1_max", "pixel_f1", "image_f1_max", "aupro")
# What tells two runs of one category apart.
CONFIG_COLUMNS = ("backbone", "layers", "coreset_ratio", "num_neighbors", "geometry")
# What a model-selection sweep reports for each configuration beside its validation metric:
# figures on the held-out half of the split, which no choice has seen.
HELD_OUT_METRICS = ("held_out_image_auroc", "held_out_pixel_auroc", "held_out_aupro", "pixel_f1")
FAILED_FILE = "failed.json"
KILLED_FILE = "killed.json"  # a stop signal ended the job (or the sweep before it started)
RESUMED_FILE = "resumed.json"  # resume=true reused a finished run instead of running the job
MISSING = "-"


def config_columns(cfg: DictConfig) -> dict[str, str]:
    """The distinguishing settings of one run, as its table row shows them."""
    return {
        "backbone": str(cfg.backbone.name),
        "layers": ",".join(cfg.backbone.layers) if cfg.backbone.get("layers") else "per member",
        "coreset_ratio": f"{cfg.model.coreset_ratio:g}",
        "num_neighbors": str(cfg.model.num_neighbors),
        "geometry": geometry_column(cfg),
    }


def geometry_column(cfg: DictConfig) -> str:
    """`256/224` (resize/crop), `fit 224x560`, ..., and the tiles when the run had them."""
    geometry = geometry_from(OmegaConf.to_container(cfg.data.geometry, resolve=True))
    tiles = cfg.model.get("tile_size")
    return geometry.describe() + (f", tiles {tiles}" if tiles else "")


def _job_row(job: Path) -> dict:
    config = job / CONFIG_FILE
    cfg = OmegaConf.load(config) if config.is_file() else None
    row = {"category": job.name, "seed_key": cfg.category.name if cfg else job.name}
    row |= config_columns(cfg) | {"optimized_metric": cfg.get("optimized_metric")} if cfg else {}
    # A job can fail after its metrics are written (the MLflow upload at its end): then it
    # failed, with its numbers still shown.
    if (job / METRICS_FILE).is_file():
        row |= {"status": "ok", **json.loads((job / METRICS_FILE).read_text())}
    for name, status in ((KILLED_FILE, "KILLED"), (FAILED_FILE, "FAILED")):
        if (job / name).is_file():
            return row | {"status": status, "error": json.loads((job / name).read_text())["error"]}
    if (job / METRICS_FILE).is_file():
        if (job / RESUMED_FILE).is_file():
            row["resumed_from"] = json.loads((job / RESUMED_FILE).read_text())["run_id"]
        return row
    return row | {"status": "FAILED", "error": "no result: the job ended without metrics.json"}


def _tuned_jobs(sweep_dir: Path) -> dict[str, tuple[str, dict[str, float]]]:
    """Job folder -> (operating point, metrics) of each finished tuned job."""
    jobs = {}
    for tuning in sorted(sweep_dir.glob(f"*/{TUNING_FILE}")):
        metrics = tuning.parent / METRICS_FILE
        if metrics.is_file():
            point = json.loads(tuning.read_text()).get("operating_point", "f1")
            jobs[tuning.parent.name] = (point, json.loads(metrics.read_text()))
    return jobs


def collect(sweep_dir: Path) -> pd.DataFrame:
    """One row per job folder: its metrics.json, or why it has none (FAILED, KILLED).

    Rows are named by folder (a sweep over other knobs names them apart); `seed_key` is the
    job's category, which the seed's numbers are looked up by.
    """
    jobs = sorted(
        p
        for p in sweep_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and any(p.iterdir())
    )
    return pd.DataFrame([_job_row(job) for job in jobs])


def compare(results: pd.DataFrame) -> pd.DataFrame:
    """Adds `seed_<metric>` and `diff_<metric>` columns and a mean row over finished jobs."""
    keys = results["seed_key"] if "seed_key" in results else results["category"]
    configs = setting_columns(results)
    columns = ["status", *configs, *TABLE_METRICS, "error", "resumed_from"]
    table = results.set_index("category").reindex(columns=columns)
    for metric in TABLE_METRICS:
        table[metric] = table[metric].astype(float)
    for i, metric in enumerate(SEED_METRICS):
        table[f"seed_{metric}"] = [SEED_RESULTS.get(k, (math.nan,) * 3)[i] for k in keys]
        table[f"diff_{metric}"] = table[metric] - table[f"seed_{metric}"]
    finished = table[table["status"] == "ok"]
    mean = finished.drop(columns=["status", "error", "resumed_from", *configs])
    mean = mean.mean(numeric_only=True)
    table.loc["mean"] = {**mean.to_dict(), "status": f"{len(finished)}/{len(table)} ok"}
    return table


def selection(results: pd.DataFrame) -> pd.DataFrame | None:
    """Finished jobs ranked by the sweep's validation metric, best first, the pick marked.

    The metric is `optimized_metric`; only a validation metric (`val_...`) may pick, so for
    any other there is no selection (None). Held-out columns are shown, never used.
    """
    if "optimized_metric" not in results or results["optimized_metric"].isna().all():
        return None
    metric = str(results["optimized_metric"].dropna().iloc[0])
    if not metric.startswith("val_") or metric not in results:
        return None
    ranked = results[(results["status"] == "ok") & results[metric].notna()]
    if ranked.empty:
        return None
    ranked = ranked.sort_values(metric, ascending=False, kind="stable").set_index("category")
    held_out = [c for c in HELD_OUT_METRICS if c in ranked]
    shown = ranked[[*setting_columns(ranked), metric, *held_out]].copy()
    shown.insert(0, "picked", ["yes"] + ["" for _ in range(len(shown) - 1)])
    return shown


def selection_markdown(picked: pd.DataFrame) -> str:
    """The ranking and the pick's held-out numbers, saying which column chose."""
    metric = next(c for c in picked.columns if c.startswith("val_"))
    best = picked.iloc[0]
    held_out = ", ".join(
        f"{c} {cell(float(best[c]))}" for c in HELD_OUT_METRICS if c in picked.columns
    )
    shown = display_frame(picked, list(picked.columns))
    lines = [
        f"## Model selection by {metric} (validation half only)",
        "",
        f"Picked **{picked.index[0]}** ({metric} {cell(float(best[metric]))}). Held out, seen "
        f"by no choice: {held_out}.",
        "",
        *_markdown_table(shown.rename_axis("job")),
    ]
    return "\n".join(lines) + "\n"


def setting_columns(table: pd.DataFrame) -> list[str]:
    """The settings (and start times) the rows carry."""
    return [c for c in (*CONFIG_COLUMNS, "started") if c in table]


def result_columns(table: pd.DataFrame) -> list[str]:
    """Status and the metrics some row has; seed columns where the seed has a number."""
    columns = ["status"]
    for metric in TABLE_METRICS:
        if table[metric].notna().any():
            columns.append(metric)
            if metric in SEED_METRICS and table[f"seed_{metric}"].notna().any():
                columns += [f"seed_{metric}", f"diff_{metric}"]
    return columns


def cell(value: object, signed: bool = False) -> str:
    """Four decimals for every number, signed for differences, "-" for what is absent."""
    if isinstance(value, float):
        if math.isnan(value):
            return MISSING
        return f"{value:+.4f}" if signed else f"{value:.4f}"
    return MISSING if value is None else str(value)


def display_frame(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """`columns` of the table as the strings both the markdown and the HTML report show."""
    shown = pd.DataFrame(
        {c: [cell(v, c.startswith("diff_")) for v in table[c]] for c in columns},
        index=table.index,
    )
    return shown.rename_axis(table.index.name or "category")


def failures(table: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(row, status, error) of every FAILED or KILLED job."""
    failed = table[table["status"].isin(["FAILED", "KILLED"])]
    return [(str(name), str(row["status"]), str(row["error"])) for name, row in failed.iterrows()]


def resumed(table: pd.DataFrame) -> list[tuple[str, str]]:
    """(row, run id) of every job that resume=true answered with an earlier finished run."""
    if "resumed_from" not in table:
        return []
    reused = table["resumed_from"].dropna()
    return [(str(name), str(run)) for name, run in reused.items()]


def _markdown_table(shown: pd.DataFrame) -> list[str]:
    header = [shown.index.name, *shown.columns]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    return lines + [f"| {name} | " + " | ".join(row) + " |" for name, row in shown.iterrows()]


def to_markdown_rows(shown: pd.DataFrame) -> str:
    """A table of strings as markdown, its index as the first column."""
    return "\n".join(_markdown_table(shown))


def to_markdown(table: pd.DataFrame) -> str:
    """Results against the seed, then each row's settings; failures with their errors below."""
    lines = _markdown_table(display_frame(table, result_columns(table)))
    settings = setting_columns(table)
    if settings:
        lines += ["", *_markdown_table(display_frame(table.drop(index="mean"), settings))]
    lines += [f"\n**{name} {status}**: {error}" for name, status, error in failures(table)]
    lines += [
        f"\n**{name} resumed**: finished run {run} of the same config, not run again"
        for name, run in resumed(table)
    ]
    return "\n".join(lines) + "\n"


RATE_NAMES = {
    "recall": "recall",
    "false_reject_rate": "false-reject rate",
    "precision": "precision",
}


def decision_table(metrics: Mapping[str, float]) -> pd.DataFrame | None:
    """A tuned run's rates at its operating point, each with its 95% interval and image count:
    overall, then the recall of each defect type with the share of its defect pixels the
    masks found. Validation rates beside held-out ones; None for an untuned run."""
    if "held_out_image_recall" not in metrics:
        return None
    per_type = sorted(
        k.removeprefix("held_out_image_")
        for k in metrics
        if k.startswith("held_out_image_recall/") and not k.endswith(("_low", "_high", "_count"))
    )
    rows = []
    for name in [*RATE_NAMES, *per_type]:
        held = f"held_out_image_{name}"
        low, high = (
            metrics.get(f"{held}_ci_low", math.nan),
            metrics.get(f"{held}_ci_high", math.nan),
        )
        defect_type = name.removeprefix("recall/") if "/" in name else None
        rows.append(
            {
                "rate": RATE_NAMES.get(name) or f"recall of {defect_type}",
                "validation": cell(metrics.get(f"val_image_{name}", math.nan)),
                "held-out": cell(metrics[held]),
                "95% CI": MISSING if math.isnan(low) else f"{low:.2f}-{high:.2f}",
                "images": f"{metrics.get(f'{held}_count', math.nan):.0f}",
                "defect pixels found": cell(
                    metrics.get(f"held_out_defect_pixels_found/{defect_type}", math.nan)
                )
                if defect_type
                else MISSING,
            }
        )
    return pd.DataFrame(rows).set_index("rate")


def decisions_markdown(jobs: Mapping[str, tuple[str, Mapping[str, float]]]) -> str:
    """Each tuned job's operating point, threshold and decision table, as summary.md shows."""
    lines = []
    for name, (point, metrics) in jobs.items():
        table = decision_table(metrics)
        if table is None:
            continue
        threshold = metrics.get("image_threshold", math.nan)
        lines += [f"### {name}: operating point {point}, image threshold {threshold:.6g}", ""]
        lines += [to_markdown_rows(table), ""]
    return (
        "\n".join(["## Decisions (held-out part, 95% Clopper-Pearson intervals)", "", *lines])
        if lines
        else ""
    )


def _message(text: str) -> Figure:
    figure = Figure(figsize=(6, 1.5))
    figure.text(0.5, 0.5, text, ha="center", va="center")
    return figure


def bar_chart(table: pd.DataFrame) -> Figure:
    """One panel per seed metric the runs have: a horizontal bar per run (run names can be
    long), with the seed's value marked where known."""
    rows = table.drop(index="mean")
    rows = rows[rows["status"] == "ok"]
    metrics = [m for m in SEED_METRICS if rows[m].notna().any()]
    if not metrics:
        return _message("no finished runs to plot")
    names = [str(name) for name in rows.index]
    figure = Figure(figsize=(5 * len(metrics) + 3, 0.35 * len(rows) + 1.8), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False, sharey=True)[0]
    for axis, metric in zip(axes, metrics, strict=True):
        sns.barplot(x=rows[metric].to_numpy(), y=names, ax=axis, color="tab:blue", label="this run")
        seeds = rows[f"seed_{metric}"]
        known = [(name, value) for name, value in zip(names, seeds, strict=True) if pd.notna(value)]
        if known:
            axis.scatter(
                [value for _, value in known],
                [name for name, _ in known],
                color="black",
                marker="|",
                s=300,
                linewidths=2.5,
                label="seed",
                zorder=3,
            )
        low = pd.concat([rows[metric], seeds]).min(skipna=True)
        axis.set_xlim(max(0.0, float(low) - 0.05), 1.0)
        axis.set_xlabel(metric)
    handles, labels = axes[0].get_legend_handles_labels()
    for axis in axes:  # seaborn gives each panel a legend of its own, over the bars
        if axis.get_legend():
            axis.get_legend().remove()
    figure.legend(handles, labels, loc="outside lower center", ncols=2)  # below, on no bar
    figure.suptitle("Per-category results (black marks: the seed, where it has the category)")
    return figure


def heatmap(table: pd.DataFrame) -> Figure:
    """Row x metric grid of values; failed rows and absent metrics left blank.

    Each column's colours span that column's own lowest to highest value: on one fixed 0-1
    scale runs at 0.98 and 0.99 share a colour, and the table is there to tell them apart.
    """
    metrics = [m for m in TABLE_METRICS if table[m].notna().any()]
    if not metrics:
        return _message("no metrics to plot")
    values = table[metrics].astype(float)
    low, span = values.min(), values.max() - values.min()
    fitted = ((values - low) / span.where(span > 1e-9)).fillna(0.5).where(values.notna())
    label = max(len(str(name)) for name in values.index)  # run names can be long
    width = 2 + 1.1 * len(metrics) + 0.08 * label
    figure = Figure(figsize=(max(width, 7), 0.45 * len(values) + 2), layout="constrained")
    axis = figure.subplots()
    sns.heatmap(fitted, annot=values, fmt=".4f", cmap="viridis", cbar=False, ax=axis)
    axis.set_title("Metrics by run (colour per metric: lowest dark, highest bright)")
    return figure


def write_summary(sweep_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame | None, list[Path]]:
    """Writes summary.csv, summary.md and the two plots into the sweep dir, and selection.csv
    when `optimized_metric` is a validation metric; returns the table, the ranking and paths."""
    results = collect(sweep_dir)
    table, picked = compare(results), selection(results)
    paths = [
        sweep_dir / name
        for name in ("summary.csv", "summary.md", "summary_bars.png", "summary_heatmap.png")
    ]
    table.to_csv(paths[0])
    markdown = to_markdown(table)
    if picked is not None:
        paths.append(sweep_dir / "selection.csv")
        picked.to_csv(paths[-1])
        markdown = selection_markdown(picked) + "\n" + markdown
    paths[1].write_text(markdown + decisions_markdown(_tuned_jobs(sweep_dir)))
    bar_chart(table).savefig(paths[2], dpi=90)
    heatmap(table).savefig(paths[3], dpi=90)
    return table, picked, paths
