import pytest
import torch
import torch.distributed as dist
import torch.utils.checkpoint

from megatron_exp.config import ModelConfig
from megatron_exp.models.gpt import GPTModel
from megatron_exp.parallel import random, state
from tests.distributed import run_on_ranks


def _gathered(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return parts


def _check_streams():
    tp = state.current().tp
    random.seed(1234, tp.rank)
    before = torch.rand(8)
    with random.tp_region():
        inside = torch.rand(8)
    after = torch.rand(8)

    ranks_before, ranks_inside, ranks_after = _gathered(before), _gathered(inside), _gathered(after)
    assert torch.equal(ranks_before[0], ranks_before[1]) and torch.equal(ranks_after[0], ranks_after[1])
    assert not torch.equal(ranks_inside[0], ranks_inside[1]), "TP ranks must draw independent masks in a region"

    torch.manual_seed(1234)  # the replicated stream is untouched by the region: same as drawing without it
    assert torch.equal(torch.rand(8), before) and torch.equal(torch.rand(8), after)


def test_tp_region_stream_differs_per_rank_and_the_outside_stream_is_shared():
    run_on_ranks(2, _check_streams)


def test_tp_region_without_seed_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(random, "_stream", random._TPRegionStream())
    with pytest.raises(RuntimeError, match=r"random.seed\(...\) first"), random.tp_region():
        pass


def _loss_and_grads(recompute: str, checkpoint_fn=None, monkeypatch=None):
    cfg = ModelConfig(
        hidden=32, heads=4, layers=3, vocab_size=200, seq_len=16, hidden_dropout=0.3, attention_dropout=0.3
    )
    model = GPTModel(cfg, recompute=recompute, seed=3)
    if checkpoint_fn is not None:
        monkeypatch.setattr(random, "checkpoint", checkpoint_fn)
    random.seed(11, tp_rank=0)
    tokens = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model.loss(model(tokens)[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recomputation_reuses_the_original_dropout_masks(monkeypatch, mode):
    loss, grads = _loss_and_grads("none")
    loss_ckpt, grads_ckpt = _loss_and_grads(mode)
    assert torch.equal(loss, loss_ckpt)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)

    # Control: torch's checkpoint alone replays the replicated stream but not the TP-region stream, so the
    # recomputed attention-dropout masks differ and so do the gradients. The check above can fail.
    def plain(function, *args):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)

    _, grads_plain = _loss_and_grads(mode, checkpoint_fn=plain, monkeypatch=monkeypatch)
    qkv = "layers.0.attention.qkv.weight"
    assert not torch.allclose(grads_plain[qkv], grads[qkv], rtol=1e-3, atol=1e-5)
