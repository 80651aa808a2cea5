"""Errors the user can fix (missing data, bad config, unreadable file), shown as one message,
and the command-line conventions every `patchlab` tool shares."""

import argparse
import functools
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

FULL_ERROR = "HYDRA_FULL_ERROR"


class UserError(ValueError):
    """Something wrong in the data or the config; the message says what and how to fix it.

    A ValueError, so code that caught the pre-flight ValueErrors before still catches them.
    """


class SettingError(UserError):
    """A setting with a value the code cannot use, raised where the setting is read.

    The message template writes setting names as `{name}`. The code that raises it knows the
    names but not where a config file keeps them; `named` lets the config layer add that
    (`{num_neighbors}` -> `model.num_neighbors`), and the plain message shows the bare name. A
    nested setting is dotted: `{operating_point.target}`.
    """

    def __init__(self, template: str) -> None:
        self.template = template
        super().__init__(self.named())

    def named(self, where: Callable[[str], str] = str) -> str:
        """The message with every `{setting}` replaced by `where(setting)`."""
        return re.sub(r"\{([\w.]+)\}", lambda match: where(match.group(1)), self.template)


# Limits a setting's value must keep: (operator, operand) pairs, checked by `check_limits`.
# Classes declare them as a literal `LIMITS = {"name": [(">", 0), ("<=", 1)], ...}`, which
# the preflight reads from the source before anything heavy is imported.
Limit = tuple[str, object]
COMPARE = {
    ">": lambda value, bound: value > bound,
    ">=": lambda value, bound: value >= bound,
    "<": lambda value, bound: value < bound,
    "<=": lambda value, bound: value <= bound,
    "in": lambda value, choices: value in choices,
    "multiple of": lambda value, step: value % step == 0,
    "is": lambda value, shape: shape == "[height, width]" and _pixel_pair(value),
}


def _pixel_pair(value: object) -> bool:
    pair = isinstance(value, list | tuple) and len(value) == 2
    return pair and all(isinstance(side, int) and side > 0 for side in value)


def check_limits(limits: dict[str, list[Limit]], values: dict[str, object]) -> None:
    """Raises a SettingError naming the first setting outside its limits; None passes (it
    means "not set"). An operand naming another setting (`("<=", "resize")`) compares with
    that setting's value."""
    for name, rules in limits.items():
        value = values.get(name)
        if value is None:
            continue
        for operator, operand in rules:
            bound = values.get(operand, operand) if isinstance(operand, str) else operand
            if bound is not None and not COMPARE[operator](value, bound):
                wanted = " and ".join(_wanted(op, arg, values) for op, arg in rules)
                raise SettingError(f"{{{name}}} must be {wanted}, got {value!r}")


def _wanted(operator: str, operand: object, values: dict[str, object]) -> str:
    if operator == "is":
        return str(operand)
    if isinstance(operand, str) and operand in values:
        return f"{operator} {{{operand}}} ({values[operand]})"
    return f"{operator} {operand!r}" if isinstance(operand, list | str) else f"{operator} {operand}"


def message(error: BaseException) -> str:
    """The error's own message. One raised in a DataLoader worker reaches the main process
    with the worker's whole traceback in its text; its last line is the message."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def exit_on_user_error(main: Callable[P, R]) -> Callable[P, R]:
    """Prints a UserError as one message and exits with status 1.

    Goes under `@hydra.main`, which would otherwise print the traceback of every chained
    cause ahead of the one useful line. `HYDRA_FULL_ERROR=1` keeps Hydra's full trace.
    """

    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return main(*args, **kwargs)
        except UserError as error:
            if os.environ.get(FULL_ERROR) == "1":
                raise
            sys.stderr.write(
                f"Error: {message(error)}\nSet {FULL_ERROR}=1 for the full traceback.\n"
            )
            sys.exit(1)

    return wrapper


def command_parser(command: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of `patchlab <command>`: its module docstring as help, laid out as written."""
    return argparse.ArgumentParser(
        prog=f"patchlab {command}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def exit_now(code: int = 0) -> None:
    """Ends the process without Python's teardown, once everything is flushed.

    After a run, finalising torch, Lightning and MLflow and freeing a gigabyte object by
    object took 3-7 s, and none of it matters to a run whose files are written, whose MLflow
    run is ended and whose loader workers are gone. A sweep on the joblib launcher ends the
    normal way: its worker processes hold this process's output pipes, and only the teardown
    stops them (skipped, a caller reading the output waited for their idle timeout).
    """
    if "joblib.externals.loky" in sys.modules:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
