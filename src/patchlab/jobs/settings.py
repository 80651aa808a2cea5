"""The config checked before anything heavy is imported: every key an argument of its class,
every value within the limits its class declares.

A config error should answer in a second or two, not after torch, Lightning and MLflow have
loaded and the data has been scanned. So this reads each project class from its source file
(the parameter names of its constructor, and its `LIMITS` literal) without importing it; the
class enforces the same limits itself when it is built. Classes from other packages (the
Lightning Trainer) are checked when they are built.
"""

import ast
import difflib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from patchlab.errors import SettingError, UserError, check_limits

PROJECT = "patchlab."
# Arguments the build passes itself; a config file naming one would be overridden silently.
PASSED_BY_BUILD = {
    "model": {"backbone", "sampler", "search"},
    "data": {"holdout"},
    "trainer": {"callbacks"},
}
CONF_DIR = Path(__file__).resolve().parents[3] / "conf"  # the project's, for hints only


OWN_FOLDERS = {  # what a user with their own data meant by an unknown option of these groups
    "category": "for your own folders: category.name={option} data.root=<folder> (docs/data.md)",
}


def check_group_choices(overrides: list[str], conf_dir: Path) -> None:
    """Raises a UserError for a `group=option` override that names no file of the group.

    Hydra's own message is the search path and a list of every option; this one names the
    closest option and, for `category`, how one's own folders are named (`category=botle`
    was meant as `bottle`, or as a folder). Sweep lists are checked item by item; sweep
    functions (`glob(*)`, `range(...)`) are left to Hydra.
    """
    for override in overrides:
        key, equals, value = override.lstrip("+~").partition("=")
        group = conf_dir / key.replace(".", "/")
        if key.startswith("hydra") or not (equals and value and group.is_dir()):
            continue  # not a project group (Hydra's own groups come from its plugins too)
        if any(c in value for c in "()[]{}'\" "):
            continue
        names = sorted(path.stem for path in group.glob("*.yaml"))
        for option in value.split(","):
            if option in names or option == "null":
                continue
            close = difflib.get_close_matches(option, names, n=1)
            hint = f"did you mean {key}={close[0]}?" if close else f"it has {', '.join(names)}."
            own = OWN_FOLDERS.get(key, "").format(option=option)
            raise UserError(
                f"{key}={option}: conf/{key}/ has no {option}.yaml; {hint}"
                + (f" Or, {own}" if own else "")
            )


@dataclass
class Signature:
    """What a class's source says about its settings."""

    parameters: set[str] = field(default_factory=set)
    takes_any: bool = False  # **kwargs
    limits: dict = field(default_factory=dict)


def _function_parameters(function: ast.FunctionDef, signature: Signature) -> None:
    arguments = function.args
    names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
    signature.parameters |= {name for name in names if name != "self"}
    signature.takes_any |= arguments.kwarg is not None


def _class_signature(classes: dict[str, ast.ClassDef], name: str) -> Signature:
    """Parameters (the nearest `__init__`, or dataclass fields) and `LIMITS`, bases first."""
    signature, node = Signature(), classes[name]
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            inherited = _class_signature(classes, base.id)
            signature.limits |= inherited.limits
            signature.parameters, signature.takes_any = inherited.parameters, inherited.takes_any
    dataclass_fields = set()
    for item in node.body:
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            signature.parameters, signature.takes_any = set(), False
            _function_parameters(item, signature)
        target = item.target if isinstance(item, ast.AnnAssign) else None
        if isinstance(item, ast.Assign) and len(item.targets) == 1:
            target = item.targets[0]
        if isinstance(target, ast.Name) and target.id == "LIMITS" and item.value is not None:
            signature.limits |= ast.literal_eval(item.value)
        elif isinstance(target, ast.Name) and isinstance(item, ast.AnnAssign):
            annotation = ast.unparse(item.annotation)
            if "ClassVar" not in annotation:
                dataclass_fields.add(target.id)
    if any(ast.unparse(d).endswith("dataclass") for d in node.decorator_list):
        signature.parameters |= dataclass_fields
    return signature


@cache
def read_signature(target: str) -> Signature | None:
    """The settings of project class or function `target`, read from its source; None for
    others (checked when built)."""
    if not target.startswith(PROJECT):
        return None
    module, _, name = target.rpartition(".")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise UserError(f"_target_ {target!r}: no module {module}")
    tree = ast.parse(Path(spec.origin).read_text())
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    if name in classes:
        return _class_signature(classes, name)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            signature = Signature()
            _function_parameters(node, signature)
            return signature
    raise UserError(f"_target_ {target!r}: {module} has no {name}")


def _target_nodes(node: object, path: str) -> Iterator[tuple[str, DictConfig]]:
    """Every config node with a `_target_`, with its dotted path."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            yield from _target_nodes(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _target_nodes(item, f"{path}[{i}]")


def options_with(group: str, key: str) -> list[str]:
    """The `conf/<group>/` files that set `key`: where a misplaced setting belongs."""
    folder = CONF_DIR / group.removeprefix("data.")
    if not folder.is_dir():
        return []
    return sorted(
        f"{group.removeprefix('data.')}={path.stem}"
        for path in folder.glob("*.yaml")
        if any(line.startswith(f"{key}:") for line in path.read_text().splitlines())
    )


def _check_keys(path: str, node: DictConfig, signature: Signature) -> None:
    if signature.takes_any:
        return
    passed = PASSED_BY_BUILD.get(path, set())
    for key in node:
        if str(key).startswith("_"):
            continue
        if key not in signature.parameters or key in passed:
            takes = sorted(signature.parameters - passed) or ["no settings"]
            elsewhere = options_with(path, str(key))
            hint = f"; it is a setting of {', '.join(elsewhere)}" if elsewhere else ""
            raise UserError(
                f"{path}.{key} is not a setting of {node._target_} (it takes: "
                f"{', '.join(takes)}){hint}"
            )


def check_settings(cfg: DictConfig) -> None:
    """Every key under a `_target_` must be an argument of that target, and every value within
    its limits; raises a UserError naming the first that is not."""
    for path, node in _target_nodes(cfg, ""):
        signature = read_signature(node._target_)
        if signature is None:
            continue
        _check_keys(path, node, signature)
        values = OmegaConf.to_container(node, resolve=True)
        try:
            check_limits(signature.limits, values)
        except SettingError as error:
            raise UserError(error.named(lambda setting, path=path: f"{path}.{setting}")) from error
