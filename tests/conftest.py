from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import megatron_exp.train  # noqa: F401 - registers the config schema with Hydra
from megatron_exp.config import Config

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: list[str] = ()) -> Config:
    """The typed config that `python -m megatron_exp.train <overrides>` would run with (unresolved)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_object(raw)


@pytest.fixture
def cache_dir(tmp_path_factory) -> str:
    """A fresh, empty data cache."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> str:
    """A data cache shared by the tests that train (the embedded corpus is tokenized once per session)."""
    return str(tmp_path_factory.mktemp("data-cache"))
