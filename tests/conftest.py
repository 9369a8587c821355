import copy
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from megatron_exp.config import Config, RunSpec, register_schemas

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
register_schemas()  # as every entry point does before composing


def compose_config(overrides: list[str] = ()) -> Config:
    """The typed config that `python -m megatron_exp.train <overrides>` would run with (unresolved)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        raw = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_object(raw)


def training_spec(cfg: Config, run_dir) -> RunSpec[Config]:
    """The spec of a resolved training config (a copy: the test may go on changing `cfg`), W&B off."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    workers = cfg.parallel.tp * cfg.parallel.dp * cfg.parallel.pp
    return RunSpec(copy.deepcopy(cfg), str(run_dir), workers)


@pytest.fixture
def cache_dir(tmp_path_factory) -> str:
    """A fresh, empty data cache."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> str:
    """A data cache shared by the tests that train (the embedded corpus is tokenized once per session)."""
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny models in this process: on the shared cores a second thread mostly
    waits, and a tiny forward takes many times longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
