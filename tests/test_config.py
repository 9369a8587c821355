import dataclasses
import typing

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from megatron_exp.config import (
    SCHEMAS,
    CheckpointConfig,
    Config,
    ConfigError,
    ConvertConfig,
    DataConfig,
    GenerateConfig,
    HardwareConfig,
    LambadaConfig,
    LoggerConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RaceConfig,
    RaceTaskConfig,
    RunSpec,
    Schema,
    TokenizerConfig,
    TrainConfig,
    WikiTextConfig,
    check_ranges,
)
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
    assert cfg.data.source == "builtin:bible"
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


# One out-of-range value for every numeric key of every schema section (a new key needs a case here).
OUT_OF_RANGE = {
    ModelConfig: {"hidden": 0, "heads": 0, "layers": -1, "vocab_size": 0, "seq_len": 0, "hidden_dropout": 1.0,
                  "attention_dropout": -0.1, "init_std": 0.0, "layernorm_eps": -1e-5},
    ParallelConfig: {"tp": 0, "dp": 0, "pp": 0, "virtual_stages": 0, "micro_batch": 0, "global_batch": 0,
                     "timeout_s": 0},
    OptimizerConfig: {"lr": 0.0, "min_lr": -1e-5, "warmup_iters": -1, "decay_iters": 0, "weight_decay": -0.01,
                      "beta1": 1.0, "beta2": -0.5, "eps": 0.0, "clip_grad": -1.0},
    TokenizerConfig: {"vocab_size": 0},
    DataConfig: {"seq_len": 0, "num_proc": 0},
    HardwareConfig: {"peak_tflops": 0.0, "memory_gb": -8.0, "devices_per_node": 0},
    LoggerConfig: {"init_timeout_s": 0},
    TrainConfig: {"iterations": 0, "log_interval": 0, "eval_interval": -1, "eval_iters": 0, "test_iters": 0,
                  "seed": -1},
    CheckpointConfig: {"interval": -1, "keep": -1},
    ConvertConfig: {"tp": 0, "pp": 0, "virtual_stages": 0, "dp": 0},
    WikiTextConfig: {"seq_len": 0, "stride": 0, "batch_size": 0},
    LambadaConfig: {"seq_len": 0, "batch_size": 0, "max_examples": 0},
    RaceTaskConfig: {"seq_len": 0, "max_qa_len": 0, "epochs": 0, "warmup_fraction": 1.5, "max_questions": 0},
    RaceConfig: {"seed": -1, "log_interval": 0},
    GenerateConfig: {"max_new_tokens": 0, "temperature": -0.5, "top_k": -1, "top_p": 0.0, "seed": -1},
}  # fmt: skip


def _sections(schema, seen=None) -> set[type]:
    seen = set() if seen is None else seen
    seen.add(schema)
    for f in dataclasses.fields(schema):
        nested = getattr(schema(), f.name) if f.default is dataclasses.MISSING else None
        if isinstance(nested, Schema) and type(nested) not in seen:
            _sections(type(nested), seen)
    return seen


def _numeric_keys(section: type) -> set[str]:
    hints = typing.get_type_hints(section)
    numeric = {int, float, int | None, float | None}
    return {f.name for f in dataclasses.fields(section) if hints[f.name] in numeric}


def test_every_numeric_key_of_every_schema_has_an_out_of_range_case():
    sections = set().union(*(_sections(schema) for schema in SCHEMAS.values()))
    assert {s: _numeric_keys(s) for s in sections if _numeric_keys(s)} == {s: set(v) for s, v in OUT_OF_RANGE.items()}


@pytest.mark.parametrize(
    "section, key, value", [(s, k, v) for s, cases in OUT_OF_RANGE.items() for k, v in cases.items()],
    ids=lambda x: getattr(x, "__name__", str(x)),
)  # fmt: skip
def test_an_out_of_range_value_is_one_line_naming_the_key(section, key, value):
    with pytest.raises(ConfigError, match=rf"^x\.{key}={value} must be ") as failure:
        check_ranges(section(**{key: value}), "x.")
    assert "\n" not in str(failure.value)


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(lr=1e-4, min_lr=2e-4), r"^optimizer.min_lr=0.0002 exceeds optimizer.lr=0.0001: .* set optimizer.min_lr"),
        (dict(warmup_iters=100, decay_iters=50), r"^optimizer.decay_iters=50 is shorter than optimizer.warmup_iters"),
    ],
)
def test_the_schedule_values_are_checked_against_each_other(values, message):
    with pytest.raises(ConfigError, match=message):
        OptimizerConfig(**values).validate()


def test_a_name_outside_its_choices_lists_them():
    with pytest.raises(ConfigError, match=r"^x.arch=gpt3 is unknown: use gpt or bert$"):
        check_ranges(ModelConfig(arch="gpt3"), "x.")


def test_a_resolved_config_is_read_only():
    spec = RunSpec(Config(), "/tmp/run", workers=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.config.parallel.tp = 2
