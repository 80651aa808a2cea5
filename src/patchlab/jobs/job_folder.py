"""A sweep job's folder name: its category, plus the value of every other setting the sweep
varies, so `-m model.coreset_ratio=0.01,0.1` gives `bottle_model.coreset_ratio=0.01` and
`bottle_model.coreset_ratio=0.1` instead of two jobs writing into one `bottle` folder.

`conf/config.yaml` names the folder `${job_folder:${category.name}}`; the resolver reads which
settings the sweep varies from the `multirun.yaml` Hydra writes into the sweep folder before
any job starts (so it works in every launcher's processes), and the job's own values from its
overrides.
"""

import hashlib
import re
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

RESOLVER = "job_folder"
CATEGORY_KEYS = ("category", "category.name")  # the folder's name already says these
MAX_NAME = 120  # characters; file systems stop at 255 bytes


def job_folder(category: str) -> str:
    """`category`, then `_key=value` for each other swept setting of this job.

    Without a `multirun.yaml` (a sweeper that keeps its search space elsewhere, such as
    Optuna's) the swept settings are unknown: the job number keeps the folders apart.
    """
    hydra = HydraConfig.get()
    sweep = Path(hydra.sweep.dir) / "multirun.yaml"
    if not sweep.is_file():
        return f"{category}_{hydra.job.num}"
    parser = OverridesParser.create()
    original = parser.parse_overrides(list(OmegaConf.load(sweep).hydra.overrides.task))
    swept = {o.key_or_group for o in original if o.is_sweep_override()} - set(CATEGORY_KEYS)
    mine = parser.parse_overrides(list(hydra.overrides.task))
    values = [f"{o.key_or_group}={o.get_value_element_as_str()}" for o in mine]
    chosen = [value for value, o in zip(values, mine, strict=True) if o.key_or_group in swept]
    return folder_name("_".join([category, *chosen]))


def folder_name(name: str) -> str:
    """`name` safe as one folder name: path separators and spaces replaced, and past
    MAX_NAME characters cut, with a digest of the whole so that cut names stay apart."""
    safe = re.sub(r"[^\w.=,+@-]", "-", name)
    if len(safe) <= MAX_NAME:
        return safe
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{safe[: MAX_NAME - 9]}-{digest}"


def register() -> None:
    """Makes `${job_folder:...}` known to OmegaConf (once per process; Hydra resolves it)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, job_folder)
