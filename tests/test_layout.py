"""The package layout as a contract: layers that import downwards only, and framework bans.

ALLOWED lists, for each package (or top-level module), the project packages it may import.
Read top to bottom it is the intended layering: the PatchCore maths at the bottom, the job
that runs a config at the top. An import outside it, or any cycle between packages, fails.
"""

import ast
import json
import subprocess
import sys
from collections import defaultdict

from helpers.configs import ROOT

PACKAGE = ROOT / "src" / "patchlab"
FRAMEWORKS = {"pytorch_lightning", "lightning", "hydra", "mlflow", "optuna", "omegaconf"}
ALIASES = ("predict", "export", "render", "report", "tune")  # `python -m patchlab.<alias>`
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "core": {"errors"},  # PatchCore in plain torch: features, coreset, search, scoring, metrics
    "data": {"errors"},  # image files: scanning, decoding, transforms, download
    "artifacts": {"errors", "core", "data"},  # a run's files, the bank file, the store
    "tuning": {"errors", "core", "artifacts"},  # split, post-processing, the Optuna study
    "deploy": {"errors", "core", "data", "artifacts", "tuning"},  # the detector in use
    "reporting": {"errors", "core", "data", "artifacts", "tuning"},  # figures, summaries
    "training": {"errors", "core", "data", "artifacts"},  # the Lightning layer
    "jobs": {
        "errors",
        "core",
        "data",
        "artifacts",
        "tuning",
        "deploy",
        "reporting",
        "training",
    },  # a config made into a finished, logged run; the only MLflow writer
    "cli": {"errors", "jobs", "deploy", "reporting"},
    "__main__": {"cli"},
    "__init__": set(),
    "predict": {"deploy"},
    "export": {"deploy"},
    "render": {"reporting"},
    "report": {"reporting"},
    "tune": {"jobs"},
}
# Rendering, tuning and the run's files are read by tools that never train: none of them
# may pull Lightning in (it takes seconds to import and drags in its own warnings).
NO_LIGHTNING = [
    "patchlab.render",
    "patchlab.tune",
    "patchlab.report",
    "patchlab.artifacts.run_files",
    "patchlab.artifacts.bank",
    "patchlab.reporting.render",
    "patchlab.reporting.report",
    "patchlab.reporting.summary",
    "patchlab.tuning.study",
    "patchlab.jobs.retune",
    "patchlab.tuning.postprocess",
    "patchlab.tuning.synthetic",
    "patchlab.tuning.split",
    "patchlab.deploy.predict",
]
CORE = sorted(
    ".".join(("patchlab", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(
        ".__init__"
    )
    for path in (PACKAGE / "core").rglob("*.py")
)


def unit(module: str) -> str:
    """`patchlab.core.coreset` -> `core`: the package (or top-level module) it belongs to."""
    return module.split(".")[1] if module.count(".") else "__init__"


def package_edges() -> dict[str, set[str]]:
    """Package -> project packages it imports, from every import statement of every file,
    function-level imports included."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        source = parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.startswith("patchlab.") and unit(name) != source:
                    edges[source].add(unit(name))
        edges.setdefault(source, set())
    return dict(edges)


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every package `start` imports, directly or through others."""
    seen: set[str] = set()
    todo = list(edges.get(start, ()))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += edges.get(node, ())
    return seen


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The groups of packages that import each other, directly or through others."""
    reach = {node: reachable(edges, node) for node in edges}
    groups = {
        tuple(sorted({node} | {other for other in reach[node] if node in reach.get(other, ())}))
        for node in edges
        if node in reach[node]
    }
    return sorted(list(group) for group in groups)


def test_packages_import_downwards_only() -> None:
    edges = package_edges()
    assert set(edges) <= set(ALLOWED), f"packages missing from ALLOWED: {set(edges) - set(ALLOWED)}"
    upward = {source: sorted(targets - ALLOWED[source]) for source, targets in edges.items()}
    assert {k: v for k, v in upward.items() if v} == {}


def test_there_is_no_cycle_between_packages() -> None:
    assert cycles(package_edges()) == []


def test_the_checks_catch_a_cycle_and_an_upward_edge() -> None:
    """What the two tests above would report for the layout before the jobs layer existed."""
    before = {"tracking": {"reporting", "training"}, "reporting": {"tracking"}, "training": set()}
    assert cycles(before) == [["reporting", "tracking"]]
    assert cycles(ALLOWED) == []
    assert "jobs" not in ALLOWED["training"] and "deploy" not in ALLOWED["training"]


def test_top_level_modules_are_the_aliases_and_a_few_shared_ones() -> None:
    modules = sorted(path.stem for path in PACKAGE.glob("*.py"))
    assert modules == sorted([*ALIASES, "__init__", "__main__", "cli", "errors"])


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


def test_reading_tools_import_no_lightning() -> None:
    assert loaded_frameworks(NO_LIGHTNING, {"pytorch_lightning", "lightning"}) == {}


def test_core_loads_no_framework_even_transitively() -> None:
    assert loaded_frameworks(CORE, FRAMEWORKS) == {}


def test_the_docs_describe_every_package() -> None:
    layout = (ROOT / "docs" / "design.md").read_text()
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert folders, "no subpackages found"
    for folder in folders:
        assert f"`{folder}/`" in layout, folder


def test_expected_warnings_are_silenced_only_inside_fit_and_test() -> None:
    """Importing the pipeline installs none of our filters; the context manager scopes them."""
    code = (
        "import warnings, patchlab.jobs.pipeline as p; "
        "from patchlab.training.lightning_module import EXPECTED_WARNINGS as ours, "
        "expected_warnings_silenced; "
        "active = lambda: {f[1].pattern for f in warnings.filters if f[1]} & set(ours); "
        "assert not active(), active(); "
        "ctx = expected_warnings_silenced(); ctx.__enter__(); inside = active(); "
        "ctx.__exit__(None, None, None); "
        "assert inside == set(ours) and not active(), (inside, active())"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
