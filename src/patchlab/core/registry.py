"""Plug-in points chosen by name: samplers and search indexes are each one class plus one line."""

import inspect
from collections.abc import Callable
from typing import TypeVar

from patchlab.errors import SettingError

T = TypeVar("T")


def build(registry: dict[str, Callable[..., T]], name: str, setting: str, **settings: object) -> T:
    """Builds registry entry `name` from the settings its constructor names.

    Every entry sees the same model settings and takes only those it declares, so adding one
    needs no edit here or in the model: `IVFIndex(ivf_lists, ivf_probes)` picks those two, a
    knob-less index picks none.
    """
    if name not in registry:
        raise SettingError(f"{{{setting}}} must be one of {sorted(registry)}, got {name!r}")
    factory = registry[name]
    accepted = inspect.signature(factory).parameters
    return factory(**{key: value for key, value in settings.items() if key in accepted})
