import pytest

from megatron_exp.training import flops


def test_model_flops_match_a_hand_computation():
    # gpt_1b, batch 8, seq 1024, padded vocab 51,200. Expanding 72 B s L h^2 (1 + s/(6h) + V/(12 L h)):
    # 72 B s L h^2 + 12 B s^2 L h + 6 B s V h, i.e. the layers' matmuls, attention scores and the logits.
    b, s, l, h, v = 8, 1024, 40, 1536, 51200
    by_hand = 72 * b * s * l * h * h + 12 * b * s * s * l * h + 6 * b * s * v * h
    assert by_hand == 65_712_999_628_800  # 55.66e12 + 6.18e12 + 3.87e12
    assert flops.model_flops(b, s, l, h, v) == pytest.approx(by_hand, rel=1e-12)


def test_recompute_adds_one_forward_of_the_layers_or_of_the_attention_core_but_not_of_the_logits():
    b, s, l, h, v = 8, 1024, 40, 1536, 51200
    layers = 72 * b * s * l * h * h + 12 * b * s * s * l * h
    logits = 6 * b * s * v * h
    assert flops.hardware_flops(b, s, l, h, v, recompute="none") == pytest.approx(layers + logits)
    assert flops.hardware_flops(b, s, l, h, v, recompute="full") == pytest.approx(layers * 4 / 3 + logits)
    # selective: QK^T and attention over V once more, 2 B s^2 h each per layer: 4 x 8 x 1024^2 x 1536 x 40
    core = 2_061_584_302_080
    assert core == 4 * b * s * s * h * l  # 2.06e12, a third of the 12 B s^2 L h attention term above
    assert flops.hardware_flops(b, s, l, h, v, recompute="selective") == pytest.approx(layers + core + logits)


def test_mfu_is_model_flops_per_second_over_the_devices_peak():
    # 65.7 TFLOP in 0.5 s on 2 devices of 989 TFLOP/s: 65.71 / 0.5 / 2 / 989 = 6.64%
    mfu = flops.utilization(65_712_999_628_800, 0.5, devices=2, peak_tflops=989)
    assert mfu == pytest.approx(65.7129996288 / 0.5 / 2 / 989, rel=1e-9)
    assert round(100 * mfu, 2) == 6.64
