"""The files a run leaves in its output dir, and the test pass they record.

Framework-free on purpose: rendering, re-tuning and reporting read these files without
importing Lightning, and nothing here runs code on load (safetensors, CSV, JSON).
"""

import csv
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

from safetensors.torch import load_file, save_file

from patchlab.core.outputs import TestOutputs
from patchlab.data.mvtec import Sample

OUTPUTS_FILE = "test_outputs.safetensors"
SCORES_FILE = "scores.csv"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
TUNING_FILE = "tuning.json"


@contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """Yields a temporary name beside `path`, renamed to `path` only when the block completes.

    A process killed while writing (SLURM's SIGTERM, then SIGKILL) leaves a hidden
    `.<name>.partial`, never a truncated file under the name readers look for.
    """
    partial = path.with_name(f".{path.name}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_json(data: dict, path: Path) -> None:
    with written_atomically(path) as partial:
        partial.write_text(json.dumps(data, indent=2))


def save_outputs(outputs: TestOutputs, path: Path) -> None:
    """Caches the test pass so thresholds can be re-tuned and figures redrawn without the model."""
    tensors = {f.name: getattr(outputs, f.name).contiguous() for f in fields(outputs)}
    with written_atomically(path) as partial:
        save_file(tensors, str(partial))


def load_outputs(path: Path) -> TestOutputs:
    return TestOutputs(**load_file(str(path)))


def read_samples(path: Path) -> list[Sample]:
    """The test samples back from scores.csv, in dataset order."""
    with path.open() as file:
        return [Sample(Path(row["path"]), row["defect_type"]) for row in csv.DictReader(file)]


def write_scores_csv(outputs: TestOutputs, samples: list[Sample], path: Path) -> None:
    """One row per test image: where it is (absolute, so the file works from any folder, but
    through the user's symlinks, not their targets), what it is, and how anomalous the model
    found it."""
    with written_atomically(path) as partial, partial.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "defect_type", "label", "image_score"])
        for sample, score in zip(samples, outputs.image_scores, strict=True):
            writer.writerow(
                [os.path.abspath(sample.image), sample.defect_type, sample.label, float(score)]
            )
