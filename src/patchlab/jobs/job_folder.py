"""A sweep job's folder name: its category, plus the value of every other setting the sweep
varies, so `-m model.coreset_ratio=0.01,0.1` gives `bottle_model.coreset_ratio=0.01` and
`bottle_model.coreset_ratio=0.1` instead of two jobs writing into one `bottle` folder.

`conf/config.yaml` names the folder `${job_folder:${category.name}}`; the resolver reads which
settings the sweep varies from the `multirun.yaml` Hydra writes into the sweep folder before
any job starts (so it works in every launcher's processes), and the job's own values from its
overrides.
"""

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

RESOLVER = "job_folder"
CATEGORY_KEYS = ("category", "category.name")  # the folder's name already says these


def job_folder(category: str) -> str:
    """`category`, then `_key=value` for each other swept setting of this job."""
    hydra = HydraConfig.get()
    sweep = Path(hydra.sweep.dir) / "multirun.yaml"
    if not sweep.is_file():
        return category
    parser = OverridesParser.create()
    original = parser.parse_overrides(list(OmegaConf.load(sweep).hydra.overrides.task))
    swept = {o.key_or_group for o in original if o.is_sweep_override()} - set(CATEGORY_KEYS)
    mine = parser.parse_overrides(list(hydra.overrides.task))
    values = [f"{o.key_or_group}={o.value()}" for o in mine if o.key_or_group in swept]
    return "_".join([category, *values]).replace("/", "-")


def register() -> None:
    """Makes `${job_folder:...}` known to OmegaConf (once per process; Hydra resolves it)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, job_folder)
