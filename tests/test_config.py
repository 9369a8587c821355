import pytest

from megatron_exp.config import ConfigError, ModelConfig


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden=48, heads=6), None),
        (dict(layers=0), r"model.layers=0 must be positive"),
        (dict(hidden=50, heads=4), r"model.hidden=50 is not divisible by model.heads=4: choose heads dividing"),
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
