"""A run's figures, drawn from what the run computed: no model, no features, no image re-scored.

The job hands over what it holds in memory (outputs, rankings, decisions); the render command
reads the same from a run folder's files:

    patchlab render outputs/bottle/2026-11-28_15-00-00
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from patchlab.artifacts.run_files import (
    CONFIG_FILE,
    OUTPUTS_FILE,
    SCORES_FILE,
    TUNING_FILE,
    TestOutputs,
    load_outputs,
    read_samples,
)
from patchlab.core.metrics import ALL, Evaluation, evaluate_outputs
from patchlab.core.ranking import RankedCounts
from patchlab.data.geometry import geometry_from
from patchlab.data.mvtec import Sample
from patchlab.errors import UserError, command_parser, exit_on_user_error
from patchlab.reporting.image_figures import write_heatmaps
from patchlab.reporting.parallel import beside
from patchlab.reporting.run_figures import Decision, write_run_figures
from patchlab.tuning.operating_point import OperatingPoint
from patchlab.tuning.postprocess import PostProcessing, binarize, maps_at
from patchlab.tuning.split import stratified_split

OPERATING_POINT = {f.name for f in fields(OperatingPoint)}
HEATMAPS_DIR = "heatmaps"  # per-image figures
FIGURES_DIR = "figures"  # the run's RUN_FIGURES


@dataclass
class RunView:
    """Everything a run's figures are drawn from.

    `image` and `pixel` rank the image scores and the maps (None without masks): the run's
    metrics sorted them already, and the curves reuse those sorts.
    """

    outputs: TestOutputs
    samples: list[Sample]
    display: Callable[[torch.Tensor], torch.Tensor]
    decision: Decision
    post: PostProcessing | None
    image: RankedCounts
    pixel: RankedCounts | None

    @classmethod
    def of(
        cls,
        cfg: DictConfig,
        outputs: TestOutputs,
        samples: list[Sample],
        decision: Decision,
        post: PostProcessing | None,
        evaluation: Evaluation,
    ) -> "RunView":
        display = geometry_from(OmegaConf.to_container(cfg.data.geometry, resolve=True)).image
        pixel = evaluation.pixel.get(ALL)
        return cls(outputs, samples, display, decision, post, evaluation.image[ALL], pixel)


def render_run(run_dir: Path, view: RunView, figures: DictConfig) -> list[Path]:
    """Writes heatmaps/ and figures/ into `run_dir`; `figures` is the run's `figures` config.

    The heatmaps are drawn in a forked process beside the run's figures (`parallel.beside`).
    """
    out = view.outputs
    predicted = None
    if view.post is not None:
        predicted = binarize(maps_at(out, view.post.sigma), view.post)
    heatmaps = partial(
        write_heatmaps,
        out,
        view.samples,
        view.display,
        run_dir / HEATMAPS_DIR,
        figures.count,
        figures.selection,
        view.decision.threshold,
        predicted,
    )
    curves = partial(
        write_run_figures,
        out,
        view.samples,
        view.display,
        run_dir / FIGURES_DIR,
        view.decision,
        figures.grid_count,
        view.image,
        view.pixel,
    )
    if figures.count == 0:  # no heatmaps: nothing worth a second process
        return heatmaps() + curves()
    drawn_apart, drawn_here = beside(heatmaps, curves)
    return drawn_apart + drawn_here


def load_run(run_dir: Path) -> tuple[RunView, DictConfig]:
    """A run folder's view and its `figures` settings, from the files the run wrote."""
    missing = [n for n in (CONFIG_FILE, OUTPUTS_FILE, SCORES_FILE) if not (run_dir / n).is_file()]
    if missing:
        raise UserError(f"{run_dir} is not a finished run folder: it has no {', '.join(missing)}")
    cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    outputs = load_outputs(run_dir / OUTPUTS_FILE)
    evaluation = evaluate_outputs(outputs)
    samples = read_samples(run_dir / SCORES_FILE)
    decision, post = Decision(evaluation.metrics["image_f1_max_threshold"]), None
    if (run_dir / TUNING_FILE).is_file():
        tuning = json.loads((run_dir / TUNING_FILE).read_text())
        decision = tuned_decision(tuning, cfg, [sample.defect_type for sample in samples])
        if "post_processing" in tuning:  # absent when tuned without masks (image-only data)
            post = PostProcessing(**tuning["post_processing"])
    return RunView.of(cfg, outputs, samples, decision, post, evaluation), cfg.figures


def tuned_decision(tuning: dict, cfg: DictConfig, types: list[str]) -> Decision:
    """A tuned run's decision, from its tuning.json; the held-out part is split again from the
    run's own settings (the split is seeded), unless it tuned on synthetic images."""
    settings = {k: v for k, v in tuning.get("objective", {}).items() if k in OPERATING_POINT}
    point = OperatingPoint(**settings)
    threshold = cfg.get("threshold") or {}
    judged = None
    if threshold.get("validation", "test_split") == "test_split":
        fraction, seed = threshold.get("val_fraction", 0.5), threshold.get("seed", cfg.seed)
        judged = stratified_split(types, fraction, seed)[1]
    return Decision(tuning["image_threshold"], point, judged)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = command_parser("render", __doc__)
    parser.add_argument("run_dir", type=Path)
    run_dir = parser.parse_args(argv).run_dir
    view, figures = load_run(run_dir)
    print(f"wrote {len(render_run(run_dir, view, figures))} figures")


if __name__ == "__main__":
    main()
