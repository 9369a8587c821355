"""Sequence parallelism is exact: GPT and BERT with layernorms, dropouts and the residual stream on sequence
shards give the serial model's loss terms, every gradient (TP-summed where a replicated parameter saw one shard,
then merged to the serial layout), gradient norm and clipped AdamW steps (fp64, dropout off). With dropout, each TP
rank draws its own masks on its shard, and recomputation reproduces them."""

from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist

from megatron_exp.config import ModelConfig
from megatron_exp.models import build_model
from megatron_exp.models.bert import BERTMultipleChoice
from megatron_exp.models.gpt import GPTModel
from megatron_exp.models.transformer import TransformerLayer
from megatron_exp.parallel import random, state
from megatron_exp.parallel.sharding import is_sequence_parallel, merge_state_dicts, shard_specs
from megatron_exp.training.grad_sync import GradientSync
from megatron_exp.training.optim import optimizer_step
from megatron_exp.training.schedule import MicroBatches
from tests.distributed import run_on_ranks
from tests.training.test_schedule import MICRO, SEQ, TIGHT, _batch, _check_terms, _config

CLIP = 0.05  # below every step's gradient norm here: clipping scales every step, so the norm must be right


def _merged(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every TP rank's tensors by parameter name, put together in the serial layout."""
    every_rank = [None] * state.current().tp.size
    dist.all_gather_object(every_rank, tensors)
    return merge_state_dicts(every_rank, shard_specs(model))


def _check_matches_serial(arch: str, layernorm: str):
    torch.set_default_dtype(torch.float64)
    grid = state.current()
    cfg = ModelConfig(**{**vars(_config(arch, 2)), "layernorm": layernorm})
    with state.use(state.SERIAL):
        serial = build_model(cfg, seed=7)
    model = build_model(cfg, seed=7, sequence_parallel=True)
    tagged = {name for name, p in model.named_parameters() if is_sequence_parallel(p)}
    expected_tags = {"position_embedding", "layers.0.attention.proj.bias", "layers.1.mlp.fc2.bias",
                     "layers.1.mlp_norm.weight"}  # fmt: skip
    expected_tags.add("final_norm.weight" if layernorm == "pre" else "embedding_norm.bias")
    if arch == "bert":
        expected_tags |= {"token_type_embedding", "mlm_dense.weight", "mlm_norm.weight"}
    assert expected_tags <= tagged and not any("qkv" in n or "fc1" in n or n.startswith("pooler") for n in tagged)
    batch = _batch(arch, 0)
    hidden = model.encode(*batch.inputs.values())
    assert hidden.shape == (MICRO, SEQ // grid.tp.size, cfg.hidden)  # this rank's sequence shard

    serial_schedule, schedule = MicroBatches(serial, nullcontext), MicroBatches(model, nullcontext)
    sync = GradientSync(model, grid)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01) for m in (serial, model)]
    for step in range(3):
        batches = [_batch(arch, 2 * step + i) for i in range(2)]
        expected = serial_schedule.train(batches)
        terms = schedule.train(batches)
        sync()
        _check_terms(terms, expected, grid, f"step {step}")
        merged = _merged(model, {name: p.grad for name, p in model.named_parameters()})
        for name, p in serial.named_parameters():
            torch.testing.assert_close(merged[name], p.grad, **TIGHT, msg=f"grad of {name}, step {step}")
        serial_norm, _ = optimizer_step(optimizers[0], list(serial.parameters()), CLIP, state.SERIAL)
        norm, _ = optimizer_step(optimizers[1], list(model.parameters()), CLIP, grid)
        assert serial_norm > CLIP
        torch.testing.assert_close(norm, serial_norm, rtol=1e-12, atol=0, msg=f"gradient norm, step {step}")
    merged = _merged(model, model.state_dict())
    for name, tensor in serial.state_dict().items():
        torch.testing.assert_close(merged[name], tensor, **TIGHT, msg=f"{name} after 3 steps")


def test_gpt_with_sequence_parallelism_at_tp2_equals_serial():
    run_on_ranks(2, _check_matches_serial, "gpt", "pre")


@pytest.mark.slow
@pytest.mark.parametrize("arch, layernorm, tp", [("gpt", "pre", 4), ("bert", "post", 2), ("bert", "pre", 2),
                                                 ("bert", "post", 4)])  # fmt: skip
def test_sequence_parallelism_equals_serial(arch, layernorm, tp):
    run_on_ranks(tp, _check_matches_serial, arch, layernorm)


def _check_multiple_choice_matches_serial():
    """RACE's model: [CLS] of every option pooled from TP rank 0's shard; scores and gradients are serial."""
    torch.set_default_dtype(torch.float64)
    grid = state.current()
    cfg = _config("bert", 2)
    with state.use(state.SERIAL):
        serial = BERTMultipleChoice(cfg, seed=3)
    model = BERTMultipleChoice(cfg, seed=3, sequence_parallel=True)
    inputs = {name: t.view(1, MICRO, SEQ) for name, t in _batch("bert", 0).inputs.items()}  # 1 question, 2 options
    answers = torch.tensor([1])
    losses = [m.loss_terms(m(**inputs), answers)["loss"] for m in (serial, model)]
    torch.testing.assert_close(losses[1], losses[0], **TIGHT)
    for loss in losses:
        loss.backward()
    GradientSync(model, grid)()
    merged = _merged(model, {name: p.grad for name, p in model.named_parameters()})
    for name, p in serial.named_parameters():
        torch.testing.assert_close(merged[name], p.grad, **TIGHT, msg=name)


@pytest.mark.slow
def test_the_multiple_choice_model_with_sequence_parallelism_at_tp2_equals_serial():
    run_on_ranks(2, _check_multiple_choice_matches_serial)


def _check_dropout_on_shards():
    tp = state.current().tp
    cfg = ModelConfig(hidden=32, heads=4, layers=2, vocab_size=300, seq_len=16, hidden_dropout=0.3,
                      attention_dropout=0.2)  # fmt: skip
    tokens = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(0))
    masks, grads = [], []
    for recompute in ("none", "full"):
        model = GPTModel(cfg, seed=5, recompute=recompute, sequence_parallel=True)
        hook = model.layers["0"].dropout.register_forward_hook(lambda _m, _i, out: masks.append(out == 0))
        random.seed(9, tp.rank)
        loss = model.loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        hook.remove()
        grads.append([p.grad for p in model.parameters()])
        losses = [None] * tp.size
        dist.all_gather_object(losses, loss.item())
        assert len(set(losses)) == 1  # the loss stays replicated
    # layer 0's dropout runs twice per forward; recomputation (which stops once backward has what it needs)
    # draws the same masks again
    first, forward, again = masks[:2], masks[2:4], masks[4:]
    pairs = zip(first + again, forward + forward[: len(again)], strict=True)
    assert again and all(torch.equal(a, b) for a, b in pairs)
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(recomputed, plain, rtol=1e-6, atol=1e-7)
    shards = [None] * tp.size
    dist.all_gather_object(shards, masks[0])
    assert not torch.equal(shards[0], shards[1]), "each TP rank must draw its own mask on its shard"
    assert 0.2 < masks[0].float().mean() < 0.4


def test_dropout_on_sequence_shards_differs_per_rank_and_recomputes_the_same():
    run_on_ranks(2, _check_dropout_on_shards)


def _saved_bytes(layer: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the activations that one forward of `layer` keeps for backward (each storage once; the input and
    the weights aside)."""
    storages, ignored = {}, {t.untyped_storage().data_ptr() for t in (x, *layer.parameters())}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in ignored:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x).sum().backward()
    return sum(storages.values())


def _check_activation_memory():
    """Korthikanti et al.'s point: TP alone leaves the layernorms', dropouts' and residual's activations replicated;
    with SP every activation a layer keeps is 1/tp of the serial layer's."""
    tp = state.current().tp
    random.seed(0, tp.rank)
    cfg = ModelConfig(hidden=64, heads=4, layers=1, seq_len=32, hidden_dropout=0.1, attention_dropout=0.1)
    batch, seq = 2, 32
    with state.use(state.SERIAL):
        serial = _saved_bytes(TransformerLayer(cfg, state.SERIAL.tp), torch.randn(batch, seq, cfg.hidden))
    plain = _saved_bytes(TransformerLayer(cfg, tp), torch.randn(batch, seq, cfg.hidden))
    sharded = _saved_bytes(TransformerLayer(cfg, tp, sequence_parallel=True), torch.randn(batch, seq // 2, 64))
    assert sharded == serial / tp.size < plain


def test_sequence_parallelism_keeps_1_over_tp_of_each_layers_activations():
    run_on_ranks(2, _check_activation_memory)
