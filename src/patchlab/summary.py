"""Per-category table of a sweep, with the seed's numbers and the difference beside each metric."""

import json
import math
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from patchlab.seed_results import SEED_METRICS, SEED_RESULTS

# pixel_f1 is the honest figure (tuned on validation, scored on held-out images): threshold=optuna.
TABLE_METRICS = ("image_auroc", "pixel_auroc", "pixel_f1_max", "pixel_f1", "image_f1_max", "aupro")
FAILED_FILE = "failed.json"


def collect(sweep_dir: Path) -> pd.DataFrame:
    """One row per job folder: its metrics.json, or its failure and error.

    Rows are named by folder (a sweep over other knobs names them apart); `seed_key` is the
    job's category, which the seed's numbers are looked up by.
    """
    rows = []
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        config = job / "config.yaml"
        key = OmegaConf.load(config).category.name if config.is_file() else job.name
        row = {"category": job.name, "seed_key": key}
        if (job / "metrics.json").is_file():
            rows.append(row | {"status": "ok", **json.loads((job / "metrics.json").read_text())})
        elif (job / FAILED_FILE).is_file():
            failure = json.loads((job / FAILED_FILE).read_text())
            rows.append(row | {"status": "FAILED", "error": failure["error"]})
    return pd.DataFrame(rows)


def compare(results: pd.DataFrame) -> pd.DataFrame:
    """Adds `seed_<metric>` and `diff_<metric>` columns and a mean row over finished jobs."""
    keys = results["seed_key"] if "seed_key" in results else results["category"]
    table = results.set_index("category").reindex(columns=["status", *TABLE_METRICS, "error"])
    for i, metric in enumerate(SEED_METRICS):
        table[f"seed_{metric}"] = [SEED_RESULTS.get(k, (math.nan,) * 3)[i] for k in keys]
        table[f"diff_{metric}"] = table[metric] - table[f"seed_{metric}"]
    finished = table[table["status"] == "ok"]
    mean = finished.drop(columns=["status", "error"]).mean(numeric_only=True)
    table.loc["mean"] = {**mean.to_dict(), "status": f"{len(finished)}/{len(table)} ok"}
    return table


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub table of the comparison; failed categories show their error."""
    columns = ["status"]
    for metric in TABLE_METRICS:
        columns += [metric] + (
            [f"seed_{metric}", f"diff_{metric}"] if metric in SEED_METRICS else []
        )
    lines = ["| category | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for category, row in table.iterrows():
        cells = [_cell(row[c], c.startswith("diff_")) for c in columns]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    failed = table[table["status"] == "FAILED"]
    lines += [f"\n**{c} FAILED**: {row['error']}" for c, row in failed.iterrows()]
    return "\n".join(lines) + "\n"


def _cell(value: object, signed: bool) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:+.4f}" if signed else f"{value:.4f}"
    return str(value)


def bar_chart(table: pd.DataFrame) -> Figure:
    """One panel per seed metric: this sweep's bars with the seed's value marked on each."""
    rows = table.drop(index="mean")
    rows = rows[rows["status"] == "ok"]
    figure = Figure(figsize=(13, 9), layout="constrained")
    for axis, metric in zip(figure.subplots(len(SEED_METRICS), 1), SEED_METRICS, strict=True):
        sns.barplot(x=rows.index, y=rows[metric], ax=axis, color="tab:blue", label="this run")
        axis.scatter(
            rows.index,
            rows[f"seed_{metric}"],
            color="black",
            marker="_",
            s=600,
            linewidths=2.5,
            label="seed",
            zorder=3,
        )
        axis.set_ylabel(metric)
        axis.set_ylim(max(0.0, float(rows[[metric, f"seed_{metric}"]].min().min()) - 0.05), 1.0)
        axis.tick_params(axis="x", labelrotation=30)
        axis.legend(loc="lower right")
    figure.suptitle("Per-category results against the seed (black marks)")
    return figure


def heatmap(table: pd.DataFrame) -> Figure:
    """Category x metric grid of values, failed categories left blank."""
    values = table[list(TABLE_METRICS)].astype(float)
    figure = Figure(figsize=(8, 0.45 * len(values) + 2), layout="constrained")
    axis = figure.subplots()
    sns.heatmap(values, annot=True, fmt=".3f", cmap="viridis", vmin=0.0, vmax=1.0, ax=axis)
    axis.set_title("Metrics by category")
    return figure


def write_summary(sweep_dir: Path) -> tuple[pd.DataFrame, list[Path]]:
    """Writes summary.csv, summary.md and the two plots into the sweep dir."""
    table = compare(collect(sweep_dir))
    paths = [
        sweep_dir / name
        for name in ("summary.csv", "summary.md", "summary_bars.png", "summary_heatmap.png")
    ]
    table.to_csv(paths[0])
    paths[1].write_text(to_markdown(table))
    bar_chart(table).savefig(paths[2], dpi=90)
    heatmap(table).savefig(paths[3], dpi=90)
    return table, paths
