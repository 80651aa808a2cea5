"""The Optuna study's own plots: optimisation history and parameter importances."""

import warnings
from pathlib import Path

import optuna

STUDY_DIR = "tuning"  # in the run folder, beside tuning.json


def write_study_figures(study: optuna.Study, run_dir: Path) -> list[Path]:
    """Writes the study's history and importances as PNGs into `run_dir/tuning/`."""
    import matplotlib
    from matplotlib import pyplot
    from optuna.visualization import matplotlib as plots

    folder = run_dir / STUDY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    # Optuna's plots switch matplotlib to its ggplot style globally; rc_context undoes that so
    # every later figure looks the same whether or not tuning ran before it.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, plot in (
            ("optuna_history.png", plots.plot_optimization_history),
            ("optuna_importances.png", plots.plot_param_importances),
        ):
            axis = plot(study)
            axis.figure.savefig(folder / name, dpi=90, bbox_inches="tight")
            pyplot.close(axis.figure)
            paths.append(folder / name)
    return paths
