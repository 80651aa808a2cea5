"""An HTML and a markdown report of chosen MLflow runs: results against the seed, settings,
failures, and each run's figures.

    patchlab report [--experiment patchcore] [--out reports/patchcore]
        [--sweep multirun/2026-11-29_10-00-00 | --run-ids ID [ID ...] |
         --filter "params.backbone.name = 'tf_efficientnet_lite2'"]

Without a selection the report shows the newest finished run of each category. With one it
shows every matching category run, failed ones included. Every number comes from MLflow, and
the figures are the runs' own artifacts. The HTML embeds its images, so it is one file to share.
"""

import base64
import html
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from patchlab.artifacts.store import given_tracking_uri, run_url, ui_url
from patchlab.errors import UserError, command_parser, exit_on_user_error
from patchlab.reporting.render import FIGURES_DIR, HEATMAPS_DIR
from patchlab.reporting.run_figures import RUN_FIGURES
from patchlab.reporting.summary import (
    TABLE_METRICS,
    bar_chart,
    compare,
    config_columns,
    decision_table,
    display_frame,
    failures,
    heatmap,
    result_columns,
    setting_columns,
    to_markdown,
    to_markdown_rows,
)

CONFIG_PARAMS = (
    "category.name",
    "backbone.name",
    "backbone.layers",
    "model.coreset_ratio",
    "model.num_neighbors",
    "data.geometry._target_",
)
SETTING_PREFIXES = ("data.geometry.", "model.tile_size")
WORST_CASES = 4  # heatmaps per run in the report
STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 12px}"
    ".scroll{overflow-x:auto}table{border-collapse:collapse;font-size:12px;margin:8px 0}"
    "td,th{border:1px solid #ccc;padding:2px 5px;text-align:right;white-space:nowrap}"
    "th{background:#f3f3f3}img{max-width:100%}.failed{color:#b00020}"
)


def select_runs(
    client: MlflowClient,
    experiment: str,
    sweep: str | None = None,
    run_ids: list[str] | None = None,
    filter_string: str | None = None,
) -> tuple[list[Run], str]:
    """The category runs to report, and a sentence saying how they were chosen."""
    if run_ids:
        return [client.get_run(run_id) for run_id in run_ids], f"runs {', '.join(run_ids)}"
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise UserError(
            f"No MLflow experiment named {experiment!r} at {client.tracking_uri}; pass "
            "--experiment, or --tracking-uri for another store"
        )
    query, chosen = "tags.category != ''", []
    if sweep:
        query += f" and tags.sweep = '{Path(sweep).resolve()}'"
        chosen.append(f"sweep {sweep}")
    if filter_string:
        query += f" and {filter_string}"
        chosen.append(f"filter `{filter_string}`")
    runs = client.search_runs([found.experiment_id], query, order_by=["attributes.start_time"])
    runs = [r for r in runs if r.info.status != "RUNNING"]
    if chosen:
        return runs, "every category run of " + " and ".join(chosen)
    latest = {r.data.tags["category"]: r for r in runs if r.info.status == "FINISHED"}
    return [latest[name] for name in sorted(latest)], "the newest finished run of each category"


def _row(run: Run) -> dict:
    params = run.data.params
    row = {
        "seed_key": run.data.tags["category"],
        "status": "ok" if run.info.status == "FINISHED" else run.info.status,
        "started": datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M"),
        "error": run.data.tags.get("error", ""),
        **{k: run.data.metrics[k] for k in TABLE_METRICS if k in run.data.metrics},
    }
    if all(key in params for key in CONFIG_PARAMS):
        # Params are strings: None was logged as "None", which the config spells null.
        keys = [k for k in params if k in CONFIG_PARAMS or k.startswith(SETTING_PREFIXES)]
        cfg = OmegaConf.from_dotlist(
            [f"{k}={'null' if params[k] == 'None' else params[k]}" for k in keys]
        )
        row |= config_columns(cfg)
    return row


def metrics_table(runs: list[Run]) -> pd.DataFrame:
    """Rows named by category, or by run name where a category appears more than once."""
    rows = [_row(run) for run in runs]
    categories = [row["seed_key"] for row in rows]
    unique = len(set(categories)) == len(categories)
    for row, run in zip(rows, runs, strict=True):
        row["category"] = (
            row["seed_key"] if unique else f"{run.info.run_name} {run.info.run_id[:6]}"
        )
    table = compare(pd.DataFrame(rows))
    return table.rename_axis("category" if unique else "run")


def _figures(client: MlflowClient, run: Run, assets: Path, downloads: str) -> list[Path]:
    """The run's figures/ PNGs, known ones first, then its worst cases: the first
    WORST_CASES heatmaps (input, anomaly map and masks), ranked by the run's figure selection
    (by default the least anomalous defects and most anomalous goods), copied into `assets`."""
    listed = client.list_artifacts(run.info.run_id, FIGURES_DIR)
    names = {Path(item.path).name for item in listed}
    ordered = [n for n in RUN_FIGURES if n in names] + sorted(names - set(RUN_FIGURES))
    paths = [f"{FIGURES_DIR}/{n}" for n in ordered if n.endswith(".png")]
    heatmaps = sorted(item.path for item in client.list_artifacts(run.info.run_id, HEATMAPS_DIR))
    paths += [p for p in heatmaps if p.endswith(".png")][:WORST_CASES]
    images = []
    for path in paths:
        local = Path(client.download_artifacts(run.info.run_id, path, downloads))
        target = assets / f"{run.info.run_id[:8]}_{path.replace('/', '_')}"
        local.replace(target)
        images.append(target)
    return images


@dataclass(frozen=True)
class Section:
    """One run's part of the report: its link, its decisions and its figures."""

    name: str
    link: str
    decision: str  # "operating point ..., image threshold ..." or why there is none
    rates: pd.DataFrame | None
    images: list[Path]


def _section(name: str, link: str, run: Run, images: list[Path]) -> Section:
    metrics, params = run.data.metrics, run.data.params
    point = run.data.tags.get("operating_point") or params.get("tuned.operating_point")
    if point is None and "tuned.image_threshold" in params:  # tuned before operating points
        point = "f1"
    if point is None:
        decision = "untuned: decisions at the test set's F1-max threshold, no held-out rates"
    else:
        threshold = metrics.get("image_threshold", float("nan"))
        decision = f"operating point {point}, image threshold {threshold:.6g}"
    return Section(name, link, decision, decision_table(metrics), images)


def build_report(
    client: MlflowClient,
    experiment: str,
    out: Path,
    sweep: str | None = None,
    run_ids: list[str] | None = None,
    filter_string: str | None = None,
    ui: str | None = None,
) -> tuple[pd.DataFrame, Path, Path]:
    """Writes report.md (with assets/) and report.html into `out`; returns the table too.

    Run links point at `ui`, by default the tracking server itself or a local `mlflow ui`.
    """
    runs, selection = select_runs(client, experiment, sweep, run_ids, filter_string)
    if not runs:
        raise UserError(f"No category runs in experiment {experiment!r} match: {selection}")
    assets = out / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    table = metrics_table(runs)
    bar_chart(table).savefig(assets / "summary_bars.png", dpi=80)
    heatmap(table).savefig(assets / "summary_heatmap.png", dpi=80)
    base = (ui or ui_url(client.tracking_uri)).rstrip("/")
    sections = []
    with tempfile.TemporaryDirectory() as downloads:
        for name, run in zip(table.index.drop("mean"), runs, strict=True):
            link = run_url(base, run.info.experiment_id, run.info.run_id)
            images = _figures(client, run, assets, downloads)
            sections.append(_section(str(name), link, run, images))
    header = f"Selection: {selection} ({len(runs)} runs, {client.tracking_uri})."
    (out / "report.md").write_text(_markdown(experiment, header, table, sections, out))
    (out / "report.html").write_text(_html(experiment, header, table, sections, assets))
    return table, out / "report.md", out / "report.html"


def _markdown(
    experiment: str, header: str, table: pd.DataFrame, sections: list[Section], out: Path
) -> str:
    lines = [
        f"# PatchCore report: {experiment}\n",
        header + "\n",
        to_markdown(table),
        "![per-category bars](assets/summary_bars.png)\n",
        "![metric heatmap](assets/summary_heatmap.png)\n",
    ]
    for section in sections:
        lines.append(f"## {section.name}\n\n[MLflow run]({section.link}): {section.decision}\n")
        if section.rates is not None:
            lines += [to_markdown_rows(section.rates), ""]
        lines += [f"![{p.stem}]({p.relative_to(out)})" for p in section.images]
        lines.append("")
    return "\n".join(lines)


def _embedded(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _header(column: str) -> tuple[str, str]:
    """Two header rows: the metric, then run / seed / difference, so columns stay narrow."""
    for prefix, label in (("seed_", "seed"), ("diff_", "diff")):
        if column.startswith(prefix):
            return column.removeprefix(prefix), label
    return column, ""


def _html_table(table: pd.DataFrame, columns: list[str]) -> str:
    shown = display_frame(table, columns).reset_index()
    headers = [_header(c) for c in shown.columns]
    seeded = {metric for metric, label in headers if label == "seed"}
    headers = [(m, "run" if m in seeded and not label else label) for m, label in headers]
    shown.columns = pd.MultiIndex.from_tuples(headers)
    return f"<div class='scroll'>{shown.to_html(index=False)}</div>"


def _html(
    experiment: str, header: str, table: pd.DataFrame, sections: list[Section], assets: Path
) -> str:
    title = html.escape(f"PatchCore report: {experiment}")
    parts = [
        f"<html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>"
        f"</head><body><h1>{title}</h1><p>{html.escape(header)}</p><h2>Results</h2>",
        _html_table(table, result_columns(table)),
    ]
    if setting_columns(table):
        parts += [
            "<h2>Settings</h2>",
            _html_table(table.drop(index="mean"), setting_columns(table)),
        ]
    parts += [
        f"<p class='failed'><b>{html.escape(n)} {status}</b>: {html.escape(e)}</p>"
        for n, status, e in failures(table)
    ]
    parts += [
        _embedded(assets / "summary_bars.png", "bars"),
        _embedded(assets / "summary_heatmap.png", "heatmap"),
    ]
    for section in sections:
        parts.append(
            f"<h2>{html.escape(section.name)}</h2><p><a href='{section.link}'>MLflow run</a>: "
            f"{html.escape(section.decision)}</p>"
        )
        if section.rates is not None:
            rates = section.rates.reset_index().to_html(index=False)
            parts.append(f"<div class='scroll'>{rates}</div>")
        parts += [_embedded(p, p.stem) for p in section.images]
    return "\n".join([*parts, "</body></html>"])


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = command_parser("report", __doc__)
    parser.add_argument("--experiment", default="patchcore")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--sweep", default=None, help="a multirun folder: every run of it")
    choice.add_argument("--run-ids", nargs="+", default=None, help="these runs")
    parser.add_argument("--filter", default=None, help="an MLflow search filter, ANDed")
    parser.add_argument("--tracking-uri", default=None, help="default: as train.py resolves it")
    parser.add_argument("--ui-url", default=None, help="run links; default: the server, if any")
    parser.add_argument("--out", type=Path, default=None, help="default: reports/<experiment>")
    args = parser.parse_args(argv)
    uri = given_tracking_uri(args.tracking_uri)
    out = args.out or Path("reports") / args.experiment
    _, markdown, page = build_report(
        MlflowClient(uri), args.experiment, out, args.sweep, args.run_ids, args.filter, args.ui_url
    )
    print(f"wrote {markdown} and {page}")


if __name__ == "__main__":
    main()
