"""Redraws a run's figures from its saved files: no model, no features, no images re-scored.

python -m patchlab.render outputs/bottle/2026-11-28_15-00-00
"""

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from patchlab.core.metrics import f1_max
from patchlab.data.mvtec import ImageTransform
from patchlab.outputs import (
    CONFIG_FILE,
    OUTPUTS_FILE,
    SCORES_FILE,
    TUNING_FILE,
    TestOutputs,
    load_outputs,
    read_samples,
)
from patchlab.reporting.image_figures import write_heatmaps
from patchlab.reporting.run_figures import write_run_figures
from patchlab.tuning.postprocess import PostProcessing, binarize, maps_at

HEATMAPS_DIR = "heatmaps"  # per-image figures
FIGURES_DIR = "figures"  # the run's RUN_FIGURES


def render_run(run_dir: Path, outputs: TestOutputs | None = None) -> list[Path]:
    """Writes heatmaps/ and figures/ in `run_dir` from test_outputs, scores.csv and config.

    A caller that still holds the test outputs passes them, rather than have a second copy
    of every map read back from disk.
    """
    cfg = OmegaConf.load(run_dir / CONFIG_FILE)
    if outputs is None:
        outputs = load_outputs(run_dir / OUTPUTS_FILE)
    samples = read_samples(run_dir / SCORES_FILE)
    display = ImageTransform(
        cfg.data.resize, cfg.data.crop_size, cfg.data.mean, cfg.data.std
    ).display
    tuning_file = run_dir / TUNING_FILE
    predicted = None
    threshold = f1_max(outputs.image_scores, outputs.labels)[1]
    if tuning_file.is_file():
        tuning = json.loads(tuning_file.read_text())
        threshold = tuning["image_threshold"]
        if "post_processing" in tuning:  # absent when tuned without masks (image-only data)
            post = PostProcessing(**tuning["post_processing"])
            predicted = binarize(maps_at(outputs, post.sigma), post)
    figures = cfg.figures
    paths = write_heatmaps(
        outputs,
        samples,
        display,
        run_dir / HEATMAPS_DIR,
        figures.count,
        figures.selection,
        threshold,
        predicted,
    )
    return paths + write_run_figures(
        outputs, samples, display, run_dir / FIGURES_DIR, threshold, figures.grid_count
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path)
    paths = render_run(parser.parse_args().run_dir)
    print(f"wrote {len(paths)} figures")


if __name__ == "__main__":
    main()
