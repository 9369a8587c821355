"""TP x DP training equals serial training with the same global batch (dropout off)."""

import json

import pytest
import torch

from megatron_exp.models.gpt import GPTModel
from megatron_exp.parallel.sharding import merge_state_dicts, shard_specs
from megatron_exp.training import checkpoint
from tests.distributed import run_on_ranks
from tests.training.test_checkpoint import build, make_config

NO_DROPOUT = ["model.hidden_dropout=0", "model.attention_dropout=0", "train.iterations=3", "parallel.global_batch=8"]


def _train(run_dir, cache, overrides):
    cfg = make_config(cache, *NO_DROPOUT, *overrides)
    build(cfg, run_dir).run()


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r]


def _final_weights(run_dir, tp: int) -> dict:
    directory = checkpoint.find_latest(run_dir)
    shards = [checkpoint.load_rank(directory, rank)["model"] for rank in range(tp)]  # DP replica 0
    cfg = make_config(str(run_dir), *NO_DROPOUT)
    with torch.device("meta"):
        specs = shard_specs(GPTModel(cfg.model))
    return merge_state_dicts(shards, specs)


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("data-cache"))
    run_dir = tmp_path_factory.mktemp("serial")
    _train(run_dir, cache, ["parallel.micro_batch=8"])
    return cache, run_dir


@pytest.mark.parametrize("tp, dp", [(1, 2), pytest.param(2, 2, marks=pytest.mark.slow)])
def test_tp_and_dp_training_matches_serial_with_the_same_global_batch(tmp_path, serial, tp, dp):
    cache, serial_dir = serial
    overrides = [f"parallel.tp={tp}", f"parallel.dp={dp}", "parallel.micro_batch=4"]
    run_on_ranks(tp * dp, _train, tmp_path, cache, overrides, tp=tp)
    assert _losses(tmp_path) == pytest.approx(_losses(serial_dir), rel=1e-5)
    expected = _final_weights(serial_dir, tp=1)
    for name, tensor in _final_weights(tmp_path, tp).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-6, msg=name)
