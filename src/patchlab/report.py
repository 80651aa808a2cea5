"""An HTML and a markdown report of an MLflow experiment (or one sweep of it).

    python -m patchlab.report --experiment patchcore [--sweep SWEEP_DIR] [--out reports/patchcore]

Every number comes from MLflow (the latest finished run per category), not recomputed; the
figures are the runs' own artifacts. The HTML embeds its images, so it is one file to share.
"""

import argparse
import base64
import html
import shutil
import tempfile
from pathlib import Path

import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from patchlab.summary import TABLE_METRICS, bar_chart, compare, heatmap, to_markdown
from patchlab.tracking import tracking_uri

CATEGORY_FIGURES = (
    "score_distributions.png",
    "roc_curves.png",
    "pixel_pr_curve.png",
    "failure_cases.png",
)


def latest_runs(client: MlflowClient, experiment: str, sweep: str | None) -> list[Run]:
    """The newest finished run of each category, optionally within one sweep."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"No MLflow experiment named {experiment!r} at {client.tracking_uri}")
    query = "attributes.status = 'FINISHED' and tags.category != ''"
    if sweep:
        query += f" and tags.sweep = '{Path(sweep).resolve()}'"
    runs = client.search_runs([found.experiment_id], query, order_by=["attributes.start_time DESC"])
    latest: dict[str, Run] = {}
    for run in runs:
        latest.setdefault(run.data.tags["category"], run)
    return [latest[name] for name in sorted(latest)]


def metrics_table(runs: list[Run]) -> pd.DataFrame:
    rows = [
        {
            "category": r.data.tags["category"],
            "status": "ok",
            **{k: r.data.metrics.get(k, float("nan")) for k in (*TABLE_METRICS, "pixel_f1")},
        }
        for r in runs
    ]
    return compare(pd.DataFrame(rows))


def build_report(
    client: MlflowClient, experiment: str, sweep: str | None, out: Path, ui_url: str
) -> tuple[pd.DataFrame, Path, Path]:
    """Writes report.md (with assets/) and report.html into `out`; returns the table too."""
    runs = latest_runs(client, experiment, sweep)
    if not runs:
        raise ValueError(f"No finished category runs in experiment {experiment!r}")
    assets = out / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    table = metrics_table(runs)
    bar_chart(table).savefig(assets / "summary_bars.png", dpi=80)
    heatmap(table).savefig(assets / "summary_heatmap.png", dpi=80)
    sections = []
    downloads = tempfile.TemporaryDirectory()
    for run in runs:
        category = run.data.tags["category"]
        link = f"{ui_url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        images = []
        for name in CATEGORY_FIGURES:
            local = client.download_artifacts(run.info.run_id, f"figures/{name}", downloads.name)
            target = assets / f"{category}_{name}"
            shutil.move(local, target)
            images.append(target)
        sections.append((category, link, images))
    downloads.cleanup()
    markdown = _markdown(experiment, table, sections, out)
    (out / "report.md").write_text(markdown)
    (out / "report.html").write_text(_html(experiment, table, sections))
    return table, out / "report.md", out / "report.html"


def _markdown(experiment: str, table: pd.DataFrame, sections: list, out: Path) -> str:
    lines = [
        f"# PatchCore report: {experiment}\n",
        to_markdown(table),
        "![per-category bars](assets/summary_bars.png)\n",
        "![metric heatmap](assets/summary_heatmap.png)\n",
    ]
    for category, link, images in sections:
        lines.append(f"## {category}\n\n[MLflow run]({link})\n")
        lines += [f"![{p.stem}]({p.relative_to(out)})" for p in images]
        lines.append("")
    return "\n".join(lines)


def _embedded(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html(experiment: str, table: pd.DataFrame, sections: list) -> str:
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:auto}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:3px 6px;text-align:right}img{max-width:100%}"
    )
    shown = table.drop(columns=["error"]).round(4).fillna("")
    parts = [
        f"<html><head><meta charset='utf-8'><title>{html.escape(experiment)}</title>"
        f"<style>{style}</style></head><body><h1>PatchCore report: {html.escape(experiment)}</h1>",
        shown.to_html(),
        _embedded(sections[0][2][0].parent / "summary_bars.png", "bars"),
        _embedded(sections[0][2][0].parent / "summary_heatmap.png", "heatmap"),
    ]
    for category, link, images in sections:
        parts.append(f"<h2>{html.escape(category)}</h2><p><a href='{link}'>MLflow run</a></p>")
        parts += [_embedded(p, p.stem) for p in images]
    return "\n".join([*parts, "</body></html>"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiment", default="patchcore")
    parser.add_argument("--sweep", default=None, help="a multirun folder: only its runs")
    parser.add_argument("--tracking-uri", default=None, help="default: as train.py resolves it")
    parser.add_argument("--ui-url", default="http://127.0.0.1:5000", help="for the run links")
    parser.add_argument("--out", type=Path, default=None, help="default: reports/<experiment>")
    args = parser.parse_args()
    uri = args.tracking_uri or tracking_uri(OmegaConf.load(Path("conf/tracking/mlflow.yaml")))
    out = args.out or Path("reports") / args.experiment
    _, markdown, page = build_report(
        MlflowClient(uri), args.experiment, args.sweep, out, args.ui_url
    )
    print(f"wrote {markdown} and {page}")


if __name__ == "__main__":
    main()
