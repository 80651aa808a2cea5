"""The package layout as a contract: few top-level modules, documented folders, import bans."""

import json
import subprocess
import sys

from helpers.configs import ROOT

PACKAGE = ROOT / "src" / "patchlab"
FRAMEWORKS = {"pytorch_lightning", "lightning", "hydra", "mlflow", "optuna", "omegaconf"}
# Rendering, tuning and the run's files are read by tools that never train: none of them
# may pull Lightning in (it takes seconds to import and drags in its own warnings).
NO_LIGHTNING = [
    "patchlab.render",
    "patchlab.tune",
    "patchlab.report",
    "patchlab.outputs",
    "patchlab.reporting.render",
    "patchlab.reporting.report",
    "patchlab.reporting.summary",
    "patchlab.tuning.study",
    "patchlab.tuning.retune",
    "patchlab.tuning.postprocess",
    "patchlab.tuning.synthetic",
    "patchlab.tuning.split",
]
CORE = sorted(
    ".".join(("patchlab", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(
        ".__init__"
    )
    for path in (PACKAGE / "core").rglob("*.py")
)


def loaded_frameworks(modules: list[str], banned: set[str]) -> dict[str, list[str]]:
    """The banned frameworks in sys.modules after each of `modules`, imported one after
    another in one fresh interpreter: the first module listed with one is the one that
    pulled it in (one interpreter instead of one per module saves a minute of the suite)."""
    code = (
        "import importlib, json, sys\n"
        "found = {}\n"
        f"for module in {modules!r}:\n"
        "    importlib.import_module(module)\n"
        f"    found[module] = sorted({{n.split('.')[0] for n in sys.modules}} & {banned!r})\n"
        "print(json.dumps(found))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout)
    assert list(found) == modules
    return {module: frameworks for module, frameworks in found.items() if frameworks}


def test_the_package_has_at_most_eight_top_level_modules() -> None:
    modules = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(modules) <= 8, modules


def test_the_readme_layout_describes_every_folder() -> None:
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert folders, "no subpackages found"
    for folder in folders:
        assert f"src/patchlab/{folder}/" in layout, folder


def test_reading_tools_import_no_lightning() -> None:
    assert loaded_frameworks(NO_LIGHTNING, {"pytorch_lightning", "lightning"}) == {}


def test_core_loads_no_framework_even_transitively() -> None:
    assert loaded_frameworks(CORE, FRAMEWORKS) == {}


def test_expected_warnings_are_silenced_only_inside_fit_and_test() -> None:
    """Importing the pipeline installs none of our filters; the context manager scopes them."""
    code = (
        "import warnings, patchlab.training.pipeline as p; "
        "from patchlab.training.lightning_module import EXPECTED_WARNINGS as ours, "
        "expected_warnings_silenced; "
        "active = lambda: {f[1].pattern for f in warnings.filters if f[1]} & set(ours); "
        "assert not active(), active(); "
        "ctx = expected_warnings_silenced(); ctx.__enter__(); inside = active(); "
        "ctx.__exit__(None, None, None); "
        "assert inside == set(ours) and not active(), (inside, active())"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
