"""Sweep summaries and reports for any part names, failures, and absent metrics."""

import math
import re
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from helpers.configs import tracked
from patchlab.artifacts.store import ui_url
from patchlab.jobs.tracking import describe, first_error
from patchlab.reporting.report import build_report
from patchlab.reporting.summary import (
    bar_chart,
    compare,
    heatmap,
    selection,
    selection_markdown,
    to_markdown,
)

NAN = math.nan


def results(names: list[str], pixel: float = 0.95) -> pd.DataFrame:
    rows = [
        {"category": n, "status": "ok", "image_auroc": 0.99, "pixel_auroc": pixel, "aupro": 0.9}
        for n in names
    ]
    return pd.DataFrame(rows)


def test_own_names_get_no_seed_columns_and_plot() -> None:
    table = compare(results(["gear", "valve"]))
    markdown = to_markdown(table)
    assert "seed_" not in markdown and "| gear | ok | 0.9900 | 0.9500 |" in markdown
    assert "pixel_f1 " not in markdown  # a metric no run has is not a column
    bar_chart(table).savefig(Path("/dev/null"), format="png")
    heatmap(table).savefig(Path("/dev/null"), format="png")


def test_the_heatmap_tells_apart_runs_a_hundredth_apart() -> None:
    rows = results(["a", "b", "c"])
    rows["image_auroc"] = [0.97, 0.98, 0.99]
    drawn = heatmap(compare(rows)).axes[0].collections[0].get_facecolors()
    colours = {tuple(drawn[row * 3].round(3)) for row in range(3)}  # image_auroc, per run
    assert len(colours) == 3
    assert not heatmap(compare(rows)).axes[0].get_legend()


def test_no_legend_sits_on_a_bar() -> None:
    """The bar chart's legend belongs to the figure, outside every panel."""
    figure = bar_chart(compare(results(["bottle", "cable", "gear"])))
    assert figure.legends and not any(axis.get_legend() for axis in figure.axes)


def test_seed_columns_only_where_the_seed_has_the_category() -> None:
    markdown = to_markdown(compare(results(["bottle", "gear"])))
    assert "| bottle | ok | 0.9900 | 1.0000 | -0.0100 |" in markdown
    assert "| gear | ok | 0.9900 | - | - |" in markdown


def test_absent_pixel_metrics_read_as_a_dash() -> None:
    rows = results(["gear", "valve"])
    rows.loc[1, ["pixel_auroc", "aupro"]] = NAN  # image-only data: no masks, no pixel metrics
    markdown = to_markdown(compare(rows))
    assert "| valve | ok | 0.9900 | - | - |" in markdown and "nan" not in markdown


def test_a_failure_masked_by_teardown_is_reported_as_the_first_error() -> None:
    try:
        try:
            raise AttributeError("'Process' object has no attribute 'env'")
        except AttributeError:
            raise RuntimeError("Please call `iter(combined_loader)` first.")  # noqa: B904
    except RuntimeError as error:
        masked = error
    assert isinstance(first_error(masked), AttributeError)
    assert describe(masked) == "AttributeError: 'Process' object has no attribute 'env'"
    try:
        raise ValueError("Unreadable image x.png") from OSError("truncated")
    except ValueError as error:
        assert describe(error) == "ValueError: Unreadable image x.png"  # written for the user


def test_ui_url_follows_a_tracking_server() -> None:
    assert ui_url("http://mlflow.lab:5000/") == "http://mlflow.lab:5000"
    assert ui_url("sqlite:///mlruns/mlflow.db") == "http://127.0.0.1:5000"


@pytest.fixture(scope="module")
def two_bottle_runs(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("report")
    for ratio in ("0.25", "0.5"):
        store = f"tracking.root={base}/mlruns"
        overrides = [f"data.root={synthetic_root}", store, f"model.coreset_ratio={ratio}"]
        tracked(overrides, base / ratio)
    return base


def test_report_selects_by_filter_and_names_runs_apart(two_bottle_runs: Path) -> None:
    client = MlflowClient(f"sqlite:///{two_bottle_runs / 'mlruns' / 'mlflow.db'}")
    table, markdown, page = build_report(client, "patchcore", two_bottle_runs / "all", None)
    assert list(table.index) == ["bottle", "mean"]  # default: newest finished per category
    assert table.loc["bottle", "coreset_ratio"] == "0.5"
    assert table.loc["bottle", "geometry"] == "64/64"  # rebuilt from the logged params
    table, markdown, page = build_report(
        client,
        "patchcore",
        two_bottle_runs / "both",
        filter_string="params.data.geometry.resize = '64'",
    )
    names = list(table.index.drop("mean"))
    assert len(names) == 2 and all(n.startswith("bottle resnet18 r0.") for n in names)
    text = markdown.read_text()
    assert "| run | backbone | layers | coreset_ratio |" in text and "started" in text
    html = re.sub(r"base64,[^\"]+", "", page.read_text())
    assert "overflow-x:auto" in html and "<th>run</th>" in html and "nan" not in html
    assert "<th>seed</th>" in html and "seed_image_auroc" not in html  # two header rows
    chosen = build_report(
        client,
        "patchcore",
        two_bottle_runs / "one",
        filter_string="params.model.coreset_ratio = '0.25'",
    )[0]
    assert chosen.loc["bottle", "coreset_ratio"] == "0.25"


def test_selection_picks_by_the_validation_metric_never_a_held_out_one() -> None:
    rows = pd.DataFrame(
        [
            {
                "category": "a",
                "status": "ok",
                "optimized_metric": "val_pixel_auroc",
                "val_pixel_auroc": 0.90,
                "held_out_pixel_auroc": 0.50,
                "pixel_auroc": 0.50,
            },
            {
                "category": "b",
                "status": "ok",
                "optimized_metric": "val_pixel_auroc",
                "val_pixel_auroc": 0.80,
                "held_out_pixel_auroc": 0.99,
                "pixel_auroc": 0.99,
            },
            {"category": "c", "status": "FAILED", "optimized_metric": "val_pixel_auroc"},
        ]
    )
    picked = selection(rows)
    assert picked.index.tolist() == ["a", "b"] and picked["picked"].tolist() == ["yes", ""]
    markdown = selection_markdown(picked)
    assert "Picked **a** (val_pixel_auroc 0.9000)" in markdown
    assert "held_out_pixel_auroc 0.5000" in markdown
    assert "| a | yes | 0.9000 | 0.5000 |" in markdown


def test_a_test_metric_picks_nothing() -> None:
    rows = results(["a", "b"]).assign(optimized_metric="pixel_auroc")
    assert selection(rows) is None
