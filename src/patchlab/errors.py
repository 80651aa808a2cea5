"""Errors the user can fix (missing data, bad config, unreadable file), shown as one message,
and the command-line conventions every `patchlab` tool shares."""

import argparse
import functools
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
    (`{num_neighbors}` -> `model.num_neighbors`), and the plain message shows the bare name.
    """

    def __init__(self, template: str) -> None:
        self.template = template
        super().__init__(self.named())

    def named(self, where: Callable[[str], str] = str) -> str:
        """The message with every `{setting}` replaced by `where(setting)`."""
        return re.sub(r"\{(\w+)\}", lambda match: where(match.group(1)), self.template)


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
            sys.stderr.write(f"Error: {error}\nSet {FULL_ERROR}=1 for the full traceback.\n")
            sys.exit(1)

    return wrapper


def command_parser(command: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of `patchlab <command>`: its module docstring as help, laid out as written."""
    return argparse.ArgumentParser(
        prog=f"patchlab {command}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
