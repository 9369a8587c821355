import pytest
import torch

from megatron_exp.config import ModelConfig
from megatron_exp.models.gpt import GPTModel
from megatron_exp.parallel import state
from megatron_exp.parallel.sharding import (
    REPLICATED,
    ShardSpec,
    merge_state_dicts,
    padded_vocab_size,
    shard_specs,
    split_state_dict,
)

CFG = ModelConfig(hidden=32, heads=4, layers=2, vocab_size=300, seq_len=16)


def test_padded_vocab_sizes_match_the_paper():
    assert padded_vocab_size(50257, 1) == 50304
    assert padded_vocab_size(50257, 8) == 51200  # the paper's padded GPT-2 vocabulary
    assert padded_vocab_size(30522, 1) == 30592
    assert padded_vocab_size(256, 2) == 256


def test_specs_cover_every_parameter_with_the_split_dimension():
    specs = shard_specs(GPTModel(CFG))
    assert specs["embedding.weight"] == ShardSpec(dim=0, vocab_size=300)
    assert specs["layers.0.attention.qkv.weight"] == ShardSpec(dim=0)
    assert specs["layers.0.attention.qkv.bias"] == ShardSpec(dim=0)
    assert specs["layers.0.attention.proj.weight"] == ShardSpec(dim=1)
    assert specs["layers.0.attention.proj.bias"] == REPLICATED
    assert specs["layers.1.mlp.fc1.weight"] == ShardSpec(dim=0)
    assert specs["layers.1.mlp.fc2.weight"] == ShardSpec(dim=1)
    assert specs["position_embedding"] == REPLICATED
    assert specs["final_norm.weight"] == REPLICATED


@pytest.mark.parametrize("tp", [2, 4])
def test_split_then_merge_is_the_identity_and_shards_fit_the_tp_model(tp):
    serial = GPTModel(CFG)
    specs = shard_specs(serial)
    shards = split_state_dict(serial.state_dict(), specs, tp)
    assert len(shards) == tp
    for rank, shard in enumerate(shards):
        with state.use(state.virtual(tp, rank)):
            GPTModel(CFG, seed=1).load_state_dict(shard)  # shapes fit a real TP rank's model
    assert shards[0]["embedding.weight"].shape[0] == padded_vocab_size(300, tp) // tp
    merged = merge_state_dicts(shards, specs)
    assert merged.keys() == serial.state_dict().keys()
    for name, tensor in serial.state_dict().items():
        assert torch.equal(merged[name], tensor), name


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_initialization_does_not_depend_on_tp(tp):
    serial = GPTModel(CFG, seed=7)
    expected = split_state_dict(serial.state_dict(), shard_specs(serial), tp)
    for rank in range(tp):
        with state.use(state.virtual(tp, rank)):
            shard = GPTModel(CFG, seed=7).state_dict()
        for name, tensor in expected[rank].items():
            assert torch.equal(shard[name], tensor), name
    padding = serial.embedding.weight[CFG.vocab_size :]
    assert padding.numel() > 0 and torch.all(padding == 0)


def test_merge_rejects_shards_with_the_wrong_vocabulary_padding():
    serial = GPTModel(CFG)
    specs = shard_specs(serial)
    shards = split_state_dict(serial.state_dict(), specs, 2)
    shards[1]["embedding.weight"] = shards[1]["embedding.weight"][:-128]
    with pytest.raises(ValueError, match=r"embedding.weight: vocab/padding mismatch: 2 shards hold 384 rows"):
        merge_state_dicts(shards, specs)


def test_merge_and_split_name_missing_or_unexpected_keys():
    serial = GPTModel(CFG)
    specs = shard_specs(serial)
    shards = split_state_dict(serial.state_dict(), specs, 2)
    del shards[1]["final_norm.bias"]
    with pytest.raises(KeyError, match=r"shard of TP rank 1 .* missing \['final_norm.bias'\]"):
        merge_state_dicts(shards, specs)
    with pytest.raises(KeyError, match=r"unexpected \['extra'\]"):
        split_state_dict({**serial.state_dict(), "extra": torch.zeros(1)}, specs, 2)


def test_split_rejects_indivisible_dimensions():
    with pytest.raises(ValueError, match=r"w: dimension 0 of shape \(6, 2\) is not divisible by TP size 4"):
        ShardSpec(dim=0).shard(torch.zeros(6, 2), 4, 0, "w")
