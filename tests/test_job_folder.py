"""Sweep job folders: the category, plus the values of whatever else the sweep varies."""

from pathlib import Path

import pytest
from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from patchlab.jobs.job_folder import MAX_NAME, folder_name, job_folder


def hydra_config(sweep: Path, task: list[str], num: int) -> None:
    """The job's Hydra config, as Hydra sets it before naming the job's folder."""
    hydra = OmegaConf.structured(HydraConf)
    hydra.sweep.dir, hydra.overrides.task, hydra.job.num = str(sweep), task, num
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra}))


@pytest.fixture
def sweep_dir(tmp_path: Path):
    """A sweep folder with the multirun.yaml Hydra writes, and this job's Hydra config."""

    def job(original: list[str], mine: list[str], num: int = 0) -> str:
        (tmp_path / "multirun.yaml").write_text(
            OmegaConf.to_yaml({"hydra": {"overrides": {"task": original}}})
        )
        hydra_config(tmp_path, mine, num)
        return job_folder("bottle")

    yield job
    HydraConfig.instance().cfg = None


def test_a_category_sweep_names_folders_by_category(sweep_dir) -> None:
    assert (
        sweep_dir(["category=bottle,cable", "data.root=/d"], ["category=bottle", "data.root=/d"])
        == "bottle"
    )
    assert sweep_dir(["category=glob(*)"], ["category=bottle"]) == "bottle"


def test_other_swept_settings_join_the_name(sweep_dir) -> None:
    original = ["category=bottle", "model.coreset_ratio=0.01,0.1", "data.root=/data/mvtec"]
    mine = ["category=bottle", "model.coreset_ratio=0.01", "data.root=/data/mvtec"]
    assert sweep_dir(original, mine) == "bottle_model.coreset_ratio=0.01"
    paths = ["data.root=/a/b,/c/d"]
    assert sweep_dir(paths, ["data.root=/a/b"]) == "bottle_data.root=-a-b"


def test_without_multirun_yaml_the_job_number_keeps_folders_apart(tmp_path: Path) -> None:
    hydra_config(tmp_path, [], 3)
    try:
        assert job_folder("bottle") == "bottle_3"
    finally:
        HydraConfig.instance().cfg = None


def test_long_names_are_cut_and_stay_apart() -> None:
    one, two = folder_name("x" * 300 + "1"), folder_name("x" * 300 + "2")
    assert len(one) == MAX_NAME and one != two
