"""A run's figures, drawn from what the run computed: no model, no features, no image re-scored.

The job hands over what it holds in memory (outputs, rankings, decisions); the render command
reads the same from a run folder's files:

    patchlab render outputs/bottle/2026-11-28_15-00-00
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
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
from patchlab.reporting.run_figures import write_run_figures
from patchlab.tuning.postprocess import PostProcessing, binarize, maps_at

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
    image_threshold: float
    post: PostProcessing | None
    image: RankedCounts
    pixel: RankedCounts | None

    @classmethod
    def of(
        cls,
        cfg: DictConfig,
        outputs: TestOutputs,
        samples: list[Sample],
        image_threshold: float,
        post: PostProcessing | None,
        evaluation: Evaluation,
    ) -> "RunView":
        display = geometry_from(OmegaConf.to_container(cfg.data.geometry, resolve=True)).image
        pixel = evaluation.pixel.get(ALL)
        return cls(outputs, samples, display, image_threshold, post, evaluation.image[ALL], pixel)


def render_run(run_dir: Path, view: RunView, figures: DictConfig) -> list[Path]:
    """Writes heatmaps/ and figures/ into `run_dir`; `figures` is the run's `figures` config."""
    out = view.outputs
    predicted = None
    if view.post is not None:
        predicted = binarize(maps_at(out, view.post.sigma), view.post)
    paths = write_heatmaps(
        out,
        view.samples,
        view.display,
        run_dir / HEATMAPS_DIR,
        figures.count,
        figures.selection,
        view.image_threshold,
        predicted,
    )
    return paths + write_run_figures(
        out,
        view.samples,
        view.display,
        run_dir / FIGURES_DIR,
        view.image_threshold,
        figures.grid_count,
        view.image,
        view.pixel,
    )


def load_run(run_dir: Path) -> tuple[RunView, DictConfig]:
    """A run folder's view and its `figures` settings, from the files the run wrote."""
    missing = [n for n in (CONFIG_FILE, OUTPUTS_FILE, SCORES_FILE) if not (run_dir / n).is_file()]
    if missing:
        raise UserError(f"{run_dir} is not a finished run folder: it has no {', '.join(missing)}")
    cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    outputs = load_outputs(run_dir / OUTPUTS_FILE)
    evaluation = evaluate_outputs(outputs)
    threshold, post = evaluation.metrics["image_f1_max_threshold"], None
    if (run_dir / TUNING_FILE).is_file():
        tuning = json.loads((run_dir / TUNING_FILE).read_text())
        threshold = tuning["image_threshold"]
        if "post_processing" in tuning:  # absent when tuned without masks (image-only data)
            post = PostProcessing(**tuning["post_processing"])
    samples = read_samples(run_dir / SCORES_FILE)
    return RunView.of(cfg, outputs, samples, threshold, post, evaluation), cfg.figures


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = command_parser("render", __doc__)
    parser.add_argument("run_dir", type=Path)
    run_dir = parser.parse_args(argv).run_dir
    view, figures = load_run(run_dir)
    print(f"wrote {len(render_run(run_dir, view, figures))} figures")


if __name__ == "__main__":
    main()
