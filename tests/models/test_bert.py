import pytest
import torch
import torch.distributed as dist

from megatron_exp.config import ModelConfig
from megatron_exp.models.bert import BERTModel
from megatron_exp.parallel import state
from megatron_exp.parallel.mappings import gather_last_dim
from megatron_exp.parallel.sharding import merge_state_dicts, shard_specs
from tests.distributed import run_on_ranks
from tests.models.test_gpt import check_recompute_matches_none

CFG = ModelConfig(
    arch="bert", hidden=32, heads=4, layers=2, vocab_size=300, seq_len=16, hidden_dropout=0.0, attention_dropout=0.0
)
TIGHT = dict(rtol=1e-10, atol=1e-12)


def _batch(step: int) -> tuple[dict, dict]:
    """Three sequences, two of them padded at the end, with segment B, some masked positions and SOP labels."""
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(5, CFG.vocab_size, (3, 16), generator=g)
    padding_mask = torch.ones(3, 16, dtype=torch.bool)
    padding_mask[1, 11:] = False
    padding_mask[2, 6:] = False
    tokens[~padding_mask] = 0
    token_types = torch.zeros(3, 16, dtype=torch.long)
    token_types[:, 4:] = 1
    token_types[~padding_mask] = 0
    mlm_mask = (torch.rand(3, 16, generator=g) < 0.3) & padding_mask
    mlm_targets = torch.randint(5, CFG.vocab_size, (3, 16), generator=g) * mlm_mask
    inputs = {"tokens": tokens, "token_types": token_types, "padding_mask": padding_mask}
    return inputs, {"mlm_targets": mlm_targets, "mlm_mask": mlm_mask, "sop_labels": torch.tensor([0, 1, 1])}


def _forward(model: BERTModel, step: int):
    inputs, targets = _batch(step)
    outputs = model(**inputs)
    return outputs, model.loss(outputs, **targets)


def _check_bert_equals_serial(cfg: ModelConfig):
    torch.set_default_dtype(torch.float64)
    tp = state.current().tp
    with state.use(state.SERIAL):
        serial = BERTModel(cfg, seed=5)
    model = BERTModel(cfg, seed=5)
    specs = shard_specs(model)

    (ref_mlm, ref_sop), ref_loss = _forward(serial, 0)
    (mlm, sop), loss = _forward(model, 0)
    assert mlm.shape[-1] == 512 // tp.size
    torch.testing.assert_close(gather_last_dim(mlm, tp)[..., :300], ref_mlm[..., :300], **TIGHT)
    torch.testing.assert_close(sop, ref_sop, **TIGHT)
    torch.testing.assert_close(loss, ref_loss, **TIGHT)

    ref_loss.backward()
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    every_rank = [None] * tp.size
    dist.all_gather_object(every_rank, grads)
    merged = merge_state_dicts(every_rank, specs)
    for name, p in serial.named_parameters():
        torch.testing.assert_close(merged[name], p.grad, **TIGHT, msg=name)

    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (serial, model)]
    for step in range(1, 4):
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        _, ref_loss = _forward(serial, step)
        _, loss = _forward(model, step)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-12, msg=f"loss after step {step}")
        ref_loss.backward()
        loss.backward()


@pytest.mark.parametrize("layernorm", ["pre", "post"])
def test_bert_at_tp2_equals_serial_with_padding(layernorm):
    run_on_ranks(2, _check_bert_equals_serial, ModelConfig(**{**vars(CFG), "layernorm": layernorm}))


def _bert_recompute_matches_none(mode: str) -> None:
    dropout = ModelConfig(**{**vars(CFG), "hidden_dropout": 0.2, "attention_dropout": 0.2})
    check_recompute_matches_none(
        lambda recompute: BERTModel(dropout, recompute=recompute, seed=2), lambda m: _forward(m, 0)[1], mode
    )


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_same_loss_and_gradients(mode):
    _bert_recompute_matches_none(mode)


def _check_recompute_at_tp():
    for mode in ("selective", "full"):
        _bert_recompute_matches_none(mode)


def test_recompute_at_tp2_gives_the_same_loss_and_gradients():
    run_on_ranks(2, _check_recompute_at_tp)


def test_padding_is_invisible_to_the_real_tokens():
    """Changing what sits in padded positions changes nothing at the real ones (the mask is applied)."""
    model = BERTModel(CFG, seed=1).eval()
    inputs, _ = _batch(0)
    mlm, sop = model(**inputs)
    inputs["tokens"] = inputs["tokens"].masked_fill(~inputs["padding_mask"], 7)
    mlm_other, sop_other = model(**inputs)
    real = inputs["padding_mask"]
    torch.testing.assert_close(mlm_other[real], mlm[real])
    torch.testing.assert_close(sop_other, sop)
    unmasked = dict(inputs, padding_mask=torch.ones_like(real))
    assert not torch.allclose(model(**unmasked)[1], sop)  # a control: attending to padding would show


def test_bidirectional_unlike_gpt():
    """A later token changes the first position's output in BERT (not causal)."""
    model = BERTModel(CFG, seed=1).eval()
    inputs, _ = _batch(0)
    first = model(**inputs)[0][0, 0]
    inputs["tokens"][0, 5] += 1
    assert not torch.allclose(model(**inputs)[0][0, 0], first)


def test_post_ln_differs_from_pre_ln_and_moves_the_norm():
    pre = BERTModel(CFG, seed=1)
    post = BERTModel(ModelConfig(**{**vars(CFG), "layernorm": "post"}), seed=1)
    assert "final_norm.weight" in pre.state_dict() and "embedding_norm.weight" not in pre.state_dict()
    assert "embedding_norm.weight" in post.state_dict() and "final_norm.weight" not in post.state_dict()
    assert not torch.allclose(_forward(pre, 0)[1], _forward(post, 0)[1])


def test_fine_tuning_model_has_no_pretraining_heads():
    names = set(BERTModel(CFG, pretraining_heads=False).state_dict())
    assert "pooler.weight" in names
    assert not any(n.startswith(("mlm_", "sop_")) for n in names)
