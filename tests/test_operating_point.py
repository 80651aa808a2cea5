"""Operating points a line can sign off: objectives met on validation, rates with exact
intervals, per-type recall, predict following the point, and tuned runs that reproduce."""

import argparse
import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy.stats import beta, binom

from helpers.configs import compose_config
from patchlab.artifacts.bank import BANK_FILE, read_banks
from patchlab.core.metrics import f1_max
from patchlab.errors import SettingError, UserError
from patchlab.jobs.build import configured
from patchlab.jobs.pipeline import run
from patchlab.jobs.retune import chosen_point
from patchlab.jobs.tracking import run_name, tracked_run
from patchlab.tuning.operating_point import OperatingPoint
from patchlab.tuning.rates import Rate, decision_rates, images_to_confirm
from patchlab.tuning.study import ThresholdTuning

TUNED = ["threshold=optuna", "threshold.n_trials=8"]


def scored(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Overlapping good and defective scores of two defect types, one much fainter."""
    generator = torch.Generator().manual_seed(seed)
    good = torch.rand(60, generator=generator)
    crack = 0.8 + 0.6 * torch.rand(30, generator=generator)
    faint = 0.3 + 0.6 * torch.rand(30, generator=generator)
    labels = torch.tensor([0] * 60 + [1] * 60)
    return torch.cat([good, crack, faint]), labels, ["good"] * 60 + ["crack"] * 30 + ["faint"] * 30


@pytest.mark.parametrize("target", [0.0, 0.05, 0.2])
def test_a_false_reject_target_holds_and_catches_the_most(target: float) -> None:
    scores, labels, types = scored()
    point = OperatingPoint("false_reject", target)
    threshold = point.choose(scores, labels, types)
    rates = decision_rates(scores, labels, types, threshold)
    assert rates["false_reject_rate"].value <= target
    good = scores[labels == 0].sort(descending=True).values
    allowed = int(target * 60)  # the best threshold sits just above the next good score
    best = decision_rates(scores, labels, types, float(good[allowed]) + 1e-9)
    assert rates["recall"].hits == best["recall"].hits


def test_a_recall_target_per_type_holds_for_every_type() -> None:
    scores, labels, types = scored()
    overall = OperatingPoint("recall", 0.9).choose(scores, labels, types)
    per_type = OperatingPoint("recall", 0.9, per_type=True).choose(scores, labels, types)
    loose, strict = (decision_rates(scores, labels, types, t) for t in (overall, per_type))
    assert loose["recall"].value >= 0.9 and loose["recall/faint"].value < 0.9
    assert strict["recall/faint"].value >= 0.9 and strict["recall/crack"].value >= 0.9
    assert strict["false_reject_rate"].value >= loose["false_reject_rate"].value
    everything = OperatingPoint("recall", 1.0, per_type=True).choose(scores, labels, types)
    assert decision_rates(scores, labels, types, everything)["recall"].value == 1.0


def test_a_costly_escape_lowers_the_threshold() -> None:
    scores, labels, types = scored()
    cheap = OperatingPoint("cost", escape_cost=0.2).choose(scores, labels, types)
    dear = OperatingPoint("cost", escape_cost=20).choose(scores, labels, types)
    rare = OperatingPoint("cost", escape_cost=20, defect_rate=0.001).choose(scores, labels, types)
    assert dear < cheap <= rare and dear < rare  # a rare defect is not worth false rejects


def test_rejecting_nothing_decides_float32_scores_as_chosen() -> None:
    """A good image scores highest: a false-reject cap of 0 must reject nothing, in the
    float32 the scores have and in the doubles predict compares (a threshold one double-ulp
    above the top score rounds back onto it in float32)."""
    scores = torch.tensor([0.2, 0.9, 0.5, 0.6], dtype=torch.float32)
    labels, types = torch.tensor([0, 0, 1, 1]), ["good", "good", "dent", "dent"]
    threshold = OperatingPoint("false_reject", 0.0).choose(scores, labels, types)
    assert decision_rates(scores, labels, types, threshold)["false_reject_rate"].value == 0
    assert not any(float(score) >= threshold for score in scores)
    cheap_escapes = OperatingPoint("cost", escape_cost=0.1)
    flipped = torch.tensor([0.9, 0.9, 0.1, 0.2])  # defects score low: rejecting costs more
    assert cheap_escapes.choose(flipped, labels, types) > 0.9


def test_a_threshold_between_adjacent_floats_keeps_the_decisions() -> None:
    low = torch.tensor(0.5, dtype=torch.float32)
    high = torch.nextafter(low, torch.tensor(1.0))  # no float32 lies between them
    scores, labels = torch.stack([low, high]), torch.tensor([0, 1])
    threshold = OperatingPoint("recall", 1.0).choose(scores, labels, ["good", "dent"])
    assert threshold == float(high) and float(low) < threshold


def test_the_f1_objective_is_the_f1_max_threshold() -> None:
    scores, labels, types = scored()
    assert OperatingPoint().choose(scores, labels, types) == f1_max(scores, labels)[1]


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"objective": "false_reject"}, "target.*must be a rate"),
        ({"objective": "recall", "target": 1.5}, "target.*must be a rate"),
        ({"objective": "precision"}, "objective"),
        ({"objective": "cost", "defect_rate": 1.0}, "defect_rate"),
    ],
)
def test_bad_operating_points_are_named(settings: dict, match: str) -> None:
    with pytest.raises(SettingError, match=match):
        OperatingPoint(**settings)


def test_validation_without_good_images_is_refused() -> None:
    with pytest.raises(UserError, match="needs good and defective"):
        OperatingPoint("false_reject", 0.1).choose(torch.rand(4), torch.ones(4), ["a"] * 4)


@pytest.mark.parametrize(("hits", "count"), [(40, 40), (0, 20), (7, 41), (19, 20), (1, 3)])
def test_the_interval_is_clopper_pearson(hits: int, count: int) -> None:
    """Each end is where the binomial tail beyond the measured count is 2.5%."""
    rate = Rate(hits, count, "images")
    low, high = rate.interval()
    assert low <= rate.value <= high
    if hits:
        assert binom.sf(hits - 1, count, low) == pytest.approx(0.025, abs=1e-9)
    else:
        assert low == 0.0
    if hits < count:
        assert binom.cdf(hits, count, high) == pytest.approx(0.025, abs=1e-9)
    else:
        assert high == 1.0


def test_the_printed_line_states_the_interval_and_count() -> None:
    line = Rate(40, 40, "defective images").line("held-out recall")
    assert line == "held-out recall 1.000 (95% CI 0.91-1.00, 40 defective images)"


@pytest.mark.parametrize("bound", [0.05, 0.02, 0.005])
def test_the_images_needed_to_confirm_a_target_are_the_fewest_that_do(bound: float) -> None:
    needed = images_to_confirm(bound)
    assert Rate(0, needed, "good images").interval()[1] <= bound
    assert Rate(0, needed - 1, "good images").interval()[1] > bound


def test_the_images_needed_at_a_measured_rate_are_the_fewest_that_confirm_it() -> None:
    """At 2% failures the bound falls steadily with the count: below `needed` none confirms."""

    def upper(count: int) -> float:
        return float(beta.ppf(0.975, 0.02 * count + 1, count - 0.02 * count))

    needed = images_to_confirm(0.05, 0.02)
    assert upper(needed) <= 0.05
    assert all(upper(count) > 0.05 for count in range(1, needed))
    assert images_to_confirm(0.05, 0.05) is None and images_to_confirm(0.05, 0.2) is None
    assert images_to_confirm(0.05, 0.0499999) is None  # past MOST_IMAGES


def test_a_target_too_fine_for_the_held_out_images_is_said() -> None:
    few = {"false_reject_rate": Rate(0, 10, "good images")}
    assert OperatingPoint("false_reject", 0.05).unconfirmed(few) == [
        "held-out images cannot confirm false_reject<=0.05: the 95% CI reaches 0.31 with 10 "
        "good images; 72 good images with no false reject would"
    ]
    some = {"false_reject_rate": Rate(4, 96, "good images")}  # magnetic tile's held-out half
    assert OperatingPoint("false_reject", 0.05).unconfirmed(some) == [
        "held-out images cannot confirm false_reject<=0.05: the 95% CI reaches 0.10 with 96 "
        "good images; about 2642 good images at the measured rate would"
    ]
    at_target = {"false_reject_rate": Rate(5, 100, "good images")}  # meets <=, cannot confirm
    assert (
        OperatingPoint("false_reject", 0.05)
        .unconfirmed(at_target)[0]
        .endswith("no count of good images can at the measured 0.050")
    )
    enough = {"false_reject_rate": Rate(0, 80, "good images")}
    assert OperatingPoint("false_reject", 0.05).unconfirmed(enough) == []
    escapes = {"recall": Rate(40, 40, "defective images"), "recall/crack": Rate(5, 5, "crack")}
    lines = OperatingPoint("recall", 1.0, per_type=True).unconfirmed(escapes)
    assert "no count of defective images can" in lines[0] and "for crack:" in lines[1]
    none_held = {"false_reject_rate": Rate(0, 0, "good images")}
    assert OperatingPoint("false_reject", 0.1).unconfirmed(none_held) == [
        "no held-out good images to confirm false_reject<=0.1"
    ]


def test_tune_changes_only_what_its_flags_name() -> None:
    run_point = OperatingPoint("cost", escape_cost=20.0, defect_rate=0.01)
    flags = argparse.Namespace(objective=None, target=None, per_type=False)
    assert chosen_point(run_point, flags) == run_point
    flags.objective, flags.target = "recall", 0.99
    changed = chosen_point(run_point, flags)
    assert (changed.objective, changed.target, changed.escape_cost) == ("recall", 0.99, 20.0)
    with pytest.raises(UserError, match="add --objective"):
        chosen_point(run_point, argparse.Namespace(objective=None, target=0.1, per_type=False))


def test_bad_nested_settings_are_named_by_their_config_path() -> None:
    for settings, named in (
        ({"objective": "false_reject"}, "threshold.operating_point.target must be a rate"),
        ({"escape_cost": "2x"}, "threshold.operating_point.escape_cost must be a number"),
        ({"foo": 1}, "threshold.operating_point.foo is not a setting"),
    ):
        with pytest.raises(UserError, match=named):
            configured("threshold", lambda s=settings: ThresholdTuning(operating_point=s))


def test_runs_differing_in_tuning_have_different_names() -> None:
    point = "threshold.operating_point"
    names = {
        run_name(compose_config(overrides))
        for overrides in (
            [],
            ["threshold=optuna"],
            ["threshold=optuna", f"{point}.objective=false_reject", f"{point}.target=0.05"],
            ["threshold=optuna", f"{point}.objective=recall", f"{point}.target=1"],
        )
    }
    assert len(names) == 4
    assert any(name.endswith("tuned-false_reject<=0.05") for name in names)


def test_a_recall_target_of_one_per_type_in_a_run(
    synthetic_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two defect types, every validation defect caught, held-out per-type recall reported,
    logged to MLflow with intervals, and predict's decisions and CSV follow the point."""
    point = "threshold.operating_point"
    overrides = [f"data.root={synthetic_root}", f"tracking.root={tmp_path / 'mlruns'}", *TUNED]
    overrides += [f"{point}.objective=recall", f"{point}.target=1.0", f"{point}.per_type=true"]
    cfg = compose_config(overrides)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO), tracked_run(cfg, out) as run_log:
        metrics, _, _ = run(cfg, out, run_log)
    for defect_type in ("scratch", "stain"):
        assert metrics[f"val_image_recall/{defect_type}"] == 1.0
        held_out = metrics[f"held_out_image_recall/{defect_type}"]
        low, high = (
            metrics[f"held_out_image_recall/{defect_type}_ci_{e}"] for e in ("low", "high")
        )
        assert low <= held_out <= high
        assert 0 <= metrics[f"held_out_defect_pixels_found/{defect_type}"] <= 1
    printed = caplog.text
    assert "Operating point recall>=1 per type" in printed
    assert "validation recall 1.000 (95% CI" in printed and "; target >= 1" in printed
    assert "held-out recall of stain" in printed and "held-out false-reject rate" in printed
    tuning = json.loads((out / "tuning.json").read_text())
    assert tuning["operating_point"] == "recall>=1 per type"
    assert tuning["objective"]["rates"]["val"]["recall/stain"]["rate"] == 1.0
    logged = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}").search_runs(
        [
            MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
            .get_experiment_by_name(cfg.tracking.experiment)
            .experiment_id
        ]
    )[0]
    assert logged.data.params["tuned.operating_point"] == "recall>=1 per type"
    assert logged.data.params["threshold.operating_point.objective"] == "recall"
    assert "held_out_image_false_reject_rate_ci_high" in logged.data.metrics
    assert logged.info.run_name.endswith("tuned-recall>=1-per-type")
    extra = json.loads(read_banks(out / BANK_FILE)[2]["extra"])
    assert extra["operating_point"] == "recall>=1 per type"
    assert extra["image_threshold"] == pytest.approx(tuning["image_threshold"])
    predicted = tmp_path / "pred"
    command = [sys.executable, "-m", "patchlab.predict", str(out / BANK_FILE)]
    command += [str(synthetic_root / "bottle" / "test"), "--out", str(predicted)]
    subprocess.run(command, check=True, capture_output=True, cwd=tmp_path)
    with (predicted / "predictions.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert {row["operating_point"] for row in rows} == {"recall>=1 per type"}
    for row in rows:
        assert row["anomalous"] == str(int(float(row["image_score"]) >= extra["image_threshold"]))


def test_two_identical_tuned_runs_into_one_folder_agree(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """With tracking off, the study lives beside the run; the second run replaces it instead
    of continuing it, so both runs give the same tuning.json and metrics."""
    cfg = compose_config([f"data.root={synthetic_root}", "tracking=none", *TUNED])
    out, written = tmp_path / "out", []
    for _ in range(2):
        run(cfg, out)
        metrics = json.loads((out / "metrics.json").read_text())
        timing = ("fit_seconds", "test_seconds", "peak_rss_mb")
        written.append(
            (
                (out / "tuning.json").read_text(),
                {k: v for k, v in metrics.items() if k not in timing},
            )
        )
    assert written[0] == written[1]
    storage = f"sqlite:///{(out / 'optuna.db').resolve()}"
    study = json.loads(written[1][0])["study"]
    assert len(optuna.load_study(study_name=study, storage=storage).trials) == 8
    assert not (Path(cfg.tracking.root) / "optuna.db").exists()


def test_paths_stay_as_the_user_gave_them(synthetic_root: Path, tmp_path: Path) -> None:
    """A data root reached through a symlink: scores.csv names the link, not its target; and
    predict's CSV names each input as given, two same-named files apart."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bottle").symlink_to(synthetic_root / "bottle")
    cfg = compose_config(
        [f"data.root={tmp_path / 'data'}", "tracking=none", "figures.enabled=false"]
    )
    run(cfg, tmp_path / "out")
    with (tmp_path / "out" / "scores.csv").open() as file:
        listed = [row["path"] for row in csv.DictReader(file)]
    assert all(path.startswith(str(tmp_path / "data" / "bottle" / "test")) for path in listed)
    given = ["data/bottle/test/scratch/000.png", "data/bottle/test/stain/000.png"]
    command = [sys.executable, "-m", "patchlab.predict", str(tmp_path / "out" / BANK_FILE)]
    subprocess.run(
        [*command, *given, "--out", "pred"], check=True, capture_output=True, cwd=tmp_path
    )
    with (tmp_path / "pred" / "predictions.csv").open() as file:
        assert [row["path"] for row in csv.DictReader(file)] == given
    maps = sorted(
        p.relative_to(tmp_path / "pred" / "maps")
        for p in (tmp_path / "pred" / "maps").rglob("*.png")
    )
    assert [str(p) for p in maps] == ["scratch/000.png", "stain/000.png"]
