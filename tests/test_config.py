import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from megatron_exp.config import Config, ConfigError, ModelConfig
from tests.conftest import CONF_DIR, compose_config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden=48, heads=6), None),
        (dict(layers=0), r"model.layers=0 must be a positive integer"),
        (
            dict(hidden=50, heads=4),
            r"model.hidden=50 is not divisible by model.heads=4: choose heads dividing",
        ),
        (dict(attention_dropout=1.0), r"model.attention_dropout=1.0 must be in \[0, 1\)"),
    ],
)
def test_model_validation_names_the_key(overrides, message):
    cfg = ModelConfig(**overrides)
    if message is None:
        cfg.validate(tp=2)
    else:
        with pytest.raises(ConfigError, match=message):
            cfg.validate(tp=1)


def test_heads_not_divisible_by_tp_lists_the_degrees_that_work():
    with pytest.raises(ConfigError, match=r"model.heads=12 is not divisible by parallel.tp=8: .*\(1, 2, 3, 4, 6, 12\)"):
        ModelConfig(hidden=96, heads=12).validate(tp=8)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_default_config_composes_into_the_schema():
    cfg = compose_config()
    assert isinstance(cfg, Config)
    assert cfg.model.name == "gpt_mini"
    assert cfg.model.vocab_size == cfg.data.tokenizer.vocab_size == 8192  # the model follows the tokenizer
    assert cfg.data.source == "builtin:python_docs"
    assert cfg.logger.mode == "offline"


@pytest.mark.parametrize(
    "group, option",
    [(g, o) for g in ("model", "parallel", "optimizer", "data", "hardware", "logger") for o in _options(g)]
    + [("data/tokenizer", o) for o in _options("data/tokenizer")],
)
def test_every_option_of_every_group_composes(group, option):
    overrides = [f"{group}={option}"] + (["data.source=/some/file.jsonl"] if option == "local_text" else [])
    cfg = compose_config(overrides)
    if group == "model":
        assert cfg.model.name == option
    if group == "data/tokenizer":
        assert cfg.model.vocab_size == cfg.data.tokenizer.vocab_size


def test_paper_optimizer_values():
    opt = compose_config(["optimizer=adam"]).optimizer
    assert (opt.lr, opt.min_lr, opt.warmup_iters, opt.decay_style) == (1.5e-4, 1e-5, 3000, "cosine")
    assert (opt.weight_decay, opt.clip_grad) == (0.01, 1.0)


def test_a_misspelled_key_is_an_error():
    with pytest.raises(ConfigCompositionException, match="tpp"):
        compose_config(["parallel.tpp=2"])


def test_an_unknown_preset_is_an_error_listing_the_known_ones():
    with pytest.raises(MissingConfigException, match="gpt_9b"):
        compose_config(["model=gpt_9b"])


def test_a_wrongly_typed_value_is_an_error():
    with pytest.raises(ConfigCompositionException, match=r"parallel\.tp"):
        compose_config(["parallel.tp=two"])


@pytest.mark.parametrize("option", _options("experiment"))
def test_scaling_recipes_pair_a_model_with_a_tp_degree(option):
    cfg = compose_config([f"experiment={option}"])
    tp = int(option.rsplit("tp", 1)[1])
    assert cfg.parallel.tp == tp and cfg.model.heads % tp == 0
    if option.startswith("weak_"):
        assert cfg.model.name == f"gpt_{option.split('_')[1]}" and cfg.optimizer.name == "adam"
