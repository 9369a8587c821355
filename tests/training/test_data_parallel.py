"""TP x PP x DP training equals serial training with the same global batch (dropout off): losses and final
weights, through the whole training entry (config, data, schedule, gradient sync, clipping, Adam)."""

import json

import pytest
import torch

from megatron_exp.training import checkpoint
from tests.distributed import run_on_ranks
from tests.training.test_checkpoint import build, make_config

NO_DROPOUT = ["model.hidden_dropout=0", "model.attention_dropout=0", "train.iterations=3", "parallel.global_batch=8"]
NO_DROPOUT += ["model.layers=4"]  # two chunks of two layers, or four of one (interleaved)


def _train(run_dir, cache, overrides):
    cfg = make_config(cache, *NO_DROPOUT, *overrides)
    build(cfg, run_dir).run()


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r]


def _final_weights(run_dir) -> dict:
    return checkpoint.load_serial_model_state(checkpoint.find_latest(run_dir))  # DP replica 0, stages joined


@pytest.fixture(scope="module")
def serial(tmp_path_factory, shared_cache):
    run_dir = tmp_path_factory.mktemp("serial")
    _train(run_dir, shared_cache, ["parallel.micro_batch=8"])
    return shared_cache, run_dir


@pytest.mark.parametrize(
    "tp, pp, dp, schedule",
    [
        (1, 1, 2, "1f1b"),
        (1, 2, 1, "1f1b"),
        pytest.param(2, 1, 2, "1f1b", marks=pytest.mark.slow),
        pytest.param(1, 2, 1, "interleaved", marks=pytest.mark.slow),
        pytest.param(2, 2, 2, "gpipe", marks=pytest.mark.slow),
    ],
)
def test_every_layout_trains_like_the_serial_model_with_the_same_global_batch(tmp_path, serial, tp, pp, dp, schedule):
    cache, serial_dir = serial
    overrides = [f"parallel.{k}={v}" for k, v in dict(tp=tp, pp=pp, dp=dp, schedule=schedule).items()]
    overrides += ["parallel.micro_batch=2", *(["parallel.virtual_stages=2"] if schedule == "interleaved" else [])]
    run_on_ranks(tp * pp * dp, _train, tmp_path, cache, overrides, tp=tp, pp=pp)
    assert _losses(tmp_path) == pytest.approx(_losses(serial_dir), rel=1e-5)
    expected = _final_weights(serial_dir)
    # fp32 (reductions in another order): Adam divides each gradient element by its own running scale, so an
    # element whose gradient is near zero can move a few 1e-6 apart; everything else agrees to 1e-4
    for name, tensor in _final_weights(tmp_path).items():
        torch.testing.assert_close(
            tensor, expected[name], rtol=1e-4, atol=1e-5, msg=lambda message, name=name: f"{name}: {message}"
        )
