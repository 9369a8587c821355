import shutil
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist

from megatron_exp.config import ConfigError, ModelConfig
from megatron_exp.models.gpt import GPTModel
from megatron_exp.models.transformer import TransformerLayer
from megatron_exp.parallel import random, state
from megatron_exp.parallel.mappings import gather_last_dim
from megatron_exp.parallel.sharding import merge_state_dicts, shard_specs
from megatron_exp.parallel.state import Group
from megatron_exp.plan import measure_activation_bytes
from tests.distributed import run_on_ranks

NO_DROPOUT = ModelConfig(
    hidden=32, heads=4, layers=2, vocab_size=300, seq_len=16, hidden_dropout=0.0, attention_dropout=0.0
)
TIGHT = dict(rtol=1e-10, atol=1e-12)


def _tokens(step: int) -> torch.Tensor:
    return torch.randint(0, NO_DROPOUT.vocab_size, (3, 16), generator=torch.Generator().manual_seed(step))


def _lm_loss(model: GPTModel, tokens: torch.Tensor):
    logits = model(tokens[:, :-1])
    return logits, model.loss(logits, tokens[:, 1:])


def _check_gpt_equals_serial():
    torch.set_default_dtype(torch.float64)
    tp = state.current().tp
    with state.use(state.SERIAL):
        serial = GPTModel(NO_DROPOUT, seed=5)
    model = GPTModel(NO_DROPOUT, seed=5)
    specs = shard_specs(model)
    vocab = NO_DROPOUT.vocab_size

    ref_logits, ref_loss = _lm_loss(serial, _tokens(0))
    logits, loss = _lm_loss(model, _tokens(0))
    assert logits.shape[-1] == 512 // tp.size  # 300 padded to a multiple of 128 x TP
    torch.testing.assert_close(gather_last_dim(logits, tp)[..., :vocab], ref_logits[..., :vocab], **TIGHT)
    torch.testing.assert_close(loss, ref_loss, **TIGHT)

    first_loss = ref_loss.item()
    ref_loss.backward()
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    ref_grads = {name: p.grad for name, p in serial.named_parameters()}
    for name, grad in grads.items():  # each rank's piece, replicated parameters included
        torch.testing.assert_close(grad, specs[name].shard(ref_grads[name], tp.size, tp.rank, name), **TIGHT)
    every_rank = [None] * tp.size
    dist.all_gather_object(every_rank, grads)
    merged = merge_state_dicts(every_rank, specs)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(merged[name], grad, **TIGHT, msg=name)

    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (serial, model)]
    for step in range(1, 6):
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        _, ref_loss = _lm_loss(serial, _tokens(step % 2))
        _, loss = _lm_loss(model, _tokens(step % 2))
        torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-12, msg=f"loss after step {step}")
        ref_loss.backward()
        loss.backward()
    assert ref_loss.item() < first_loss - 0.5  # the steps did train (two batches, seen alternately)
    serial_state = serial.state_dict()
    for name, p in model.state_dict().items():
        expected = specs[name].shard(serial_state[name], tp.size, tp.rank, name)
        torch.testing.assert_close(p, expected, rtol=1e-9, atol=1e-12, msg=name)

    torch.set_default_dtype(torch.float32)
    with state.use(state.SERIAL):
        serial32 = GPTModel(NO_DROPOUT, seed=5)
    logits32, loss32 = _lm_loss(GPTModel(NO_DROPOUT, seed=5), _tokens(0))
    ref_logits32, ref_loss32 = _lm_loss(serial32, _tokens(0))
    torch.testing.assert_close(gather_last_dim(logits32, tp)[..., :vocab], ref_logits32[..., :vocab])
    torch.testing.assert_close(loss32, ref_loss32)


@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_gpt_at_tp_equals_serial_logits_loss_grads_and_five_adam_steps(tp):
    run_on_ranks(tp, _check_gpt_equals_serial)


def _check_dropout():
    tp = state.current().tp
    hidden_only = ModelConfig(**{**vars(NO_DROPOUT), "hidden_dropout": 0.3})
    with state.use(state.SERIAL):
        serial = GPTModel(hidden_only, seed=5)
    model = GPTModel(hidden_only, seed=5)
    random.seed(9, tp.rank)
    ref_logits, ref_loss = _lm_loss(serial, _tokens(0))
    random.seed(9, tp.rank)
    logits, loss = _lm_loss(model, _tokens(0))
    # Dropout outside TP regions draws the same masks as the serial model on every TP rank.
    torch.testing.assert_close(gather_last_dim(logits, tp)[..., :300], ref_logits[..., :300])
    torch.testing.assert_close(loss, ref_loss)
    with state.use(state.SERIAL):
        no_dropout = GPTModel(NO_DROPOUT, seed=5)
    assert not torch.allclose(_lm_loss(no_dropout, _tokens(0))[1], loss), "dropout must have been active"

    # Attention dropout runs in the TP region: per-rank masks, yet activations outside stay replicated.
    both = ModelConfig(**{**vars(hidden_only), "attention_dropout": 0.3})
    random.seed(9, tp.rank)
    _, loss = _lm_loss(GPTModel(both, seed=5), _tokens(0))
    losses = [None] * tp.size
    dist.all_gather_object(losses, loss.item())
    assert len(set(losses)) == 1 and torch.isfinite(loss)
    assert loss.item() != ref_loss.item()


def test_dropout_matches_serial_outside_tp_regions():
    run_on_ranks(2, _check_dropout)


_COLLECTIVES = [
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
    "reduce_scatter_tensor", "all_gather_single", "reduce_scatter_single", "broadcast", "all_to_all",
    "all_to_all_single", "reduce", "gather", "scatter",
    "barrier", "send", "recv", "isend", "irecv",
]  # fmt: skip


@contextmanager
def _recording(calls: list):
    """Record every torch.distributed collective called in the block as (name, group, numel): numel of its largest
    tensor argument (the whole activation, for an all-gather or reduce-scatter of its shards)."""
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}

    def recorder(name):
        def call(*args, **kwargs):
            sizes = [a.numel() for a in args if isinstance(a, torch.Tensor)]
            numel = max(sizes) if sizes else None
            calls.append((name, kwargs.get("group"), numel))
            return originals[name](*args, **kwargs)

        return call

    for name in _COLLECTIVES:
        setattr(dist, name, recorder(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def _check_communication():
    tp = state.current().tp
    cfg = NO_DROPOUT
    batch, seq = 3, 16
    layer = TransformerLayer(cfg, tp)
    x = torch.randn(batch, seq, cfg.hidden, requires_grad=True)
    with _recording([]) as forward:
        y = layer(x)
    with _recording([]) as backward:
        y.sum().backward()
    one_activation = ("all_reduce", tp.handle, batch * seq * cfg.hidden)
    assert forward == [one_activation] * 2, forward  # g after attention, g after the MLP
    assert backward == [one_activation] * 2, backward  # f before attention, f before the MLP

    model = GPTModel(cfg)
    with _recording([]) as forward:
        _, loss = _lm_loss(model, _tokens(0))
    with _recording([]) as backward:
        loss.backward()
    assert all(name == "all_reduce" and group is tp.handle for name, group, _ in forward + backward)
    # forward: embedding g + 2 per layer + 2 in the loss (max; target logit and sum of exps together)
    assert [n for *_, n in forward] == [batch * 15 * cfg.hidden] * (1 + 2 * cfg.layers) + [batch * 15, 2 * batch * 15]
    # backward: f before the output layer + 2 per layer
    assert [n for *_, n in backward] == [batch * 15 * cfg.hidden] * (1 + 2 * cfg.layers)


def test_exactly_the_papers_collectives():
    run_on_ranks(2, _check_communication)


DROPOUT = ModelConfig(**{**vars(NO_DROPOUT), "hidden_dropout": 0.2, "attention_dropout": 0.2})


def check_recompute_matches_none(build, loss_of, mode: str) -> None:
    """`build(recompute)`'s loss and every gradient under `mode` equal those without recomputation, in fp64 with
    dropout on: the same seeds give the same masks only if recomputation replays both dropout streams."""
    check_same_loss_and_gradients([lambda: build("none"), lambda: build(mode)], loss_of)


def check_same_loss_and_gradients(builds, loss_of) -> None:
    """The two models `builds` make give the same loss and every gradient in fp64, from the same dropout seeds."""
    results = []
    for build in builds:
        model = build().double()
        random.seed(11, model.tp.rank)
        loss = loss_of(model)
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}))
    (loss, grads), (other_loss, other_grads) = results
    torch.testing.assert_close(other_loss, loss, **TIGHT)
    assert other_grads.keys() == grads.keys() and all(g is not None for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(other_grads[name], grad, **TIGHT, msg=name)


def _gpt_recompute_matches_none(mode: str) -> None:
    check_recompute_matches_none(
        lambda recompute: GPTModel(DROPOUT, recompute=recompute, seed=2), lambda m: _lm_loss(m, _tokens(0))[1], mode
    )


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_same_loss_and_gradients(mode):
    _gpt_recompute_matches_none(mode)


def _check_recompute_at_tp():
    for mode in ("selective", "full"):
        _gpt_recompute_matches_none(mode)


def test_recompute_at_tp2_gives_the_same_loss_and_gradients():
    run_on_ranks(2, _check_recompute_at_tp)


needs_cpp_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs g++")


def _compiled(model: GPTModel) -> GPTModel:
    """`model` with its layers compiled (train.compile), from a clean dynamo state (no cache of an earlier model
    reaching its recompile limit and leaving a layer eager) and cleared counters (to tell that it compiled)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.compile_layers()
    return model


def _check_compiled_selective_matches_eager(dropout: float) -> None:
    """Selective recomputation under train.compile: the layer's graph breaks around the recomputed core, which
    replays both dropout streams eagerly. Inductor draws its own random numbers unless told to use eager's
    (fallback_random), so with it the compiled layer's residual dropouts draw eager's masks too."""
    cfg = ModelConfig(**{**vars(NO_DROPOUT), "layers": 1, "hidden_dropout": dropout, "attention_dropout": dropout})

    def build() -> GPTModel:
        return GPTModel(cfg, recompute="selective", seed=2)

    with torch._inductor.config.patch(fallback_random=True):
        check_same_loss_and_gradients([build, lambda: _compiled(build())], lambda m: _lm_loss(m, _tokens(0))[1])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the second model did run compiled


@pytest.mark.slow
@needs_cpp_compiler
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_compiled_selective_recompute_gives_the_eager_loss_and_gradients(dropout):
    _check_compiled_selective_matches_eager(dropout)


@pytest.mark.slow
@needs_cpp_compiler
def test_compiled_selective_recompute_at_tp2_gives_the_eager_loss_and_gradients():
    run_on_ranks(2, _check_compiled_selective_matches_eager, 0.2)


@pytest.mark.slow
@needs_cpp_compiler
def test_compiled_selective_recompute_still_frees_the_attention_core():
    """With attention dropout on CPU (the math path keeps the s x s scores), compiled layers keep less for
    backward under selective recomputation than without it."""
    cfg = ModelConfig(**{**vars(DROPOUT), "layers": 1})
    tokens = torch.cat([_tokens(0), _tokens(1)[:, :1]], dim=1)  # 17 tokens: 16 inputs and their targets
    kept = {}
    for mode in ("none", "selective"):
        model = _compiled(GPTModel(cfg, recompute=mode, seed=2).double())
        random.seed(11, 0)
        kept[mode] = measure_activation_bytes(model, tokens)
    assert 0 < kept["selective"] < kept["none"]


def test_bad_shapes_fail_with_the_key_and_a_fix():
    with pytest.raises(ConfigError, match=r"model.heads=6 is not divisible by parallel.tp=4: .*\(1, 2, 3, 6\)"):
        GPTModel(ModelConfig(hidden=48, heads=6), tp=Group(4, 0))
    with pytest.raises(ConfigError, match=r"model.hidden=30 is not divisible by model.heads=4"):
        GPTModel(ModelConfig(hidden=30, heads=4))
    with pytest.raises(ValueError, match=r"longer than model.seq_len=16"):
        GPTModel(NO_DROPOUT)(torch.zeros(1, 17, dtype=torch.long))


def _ring_elements(name: str, numel: int, tp: int) -> float:
    """Elements each rank sends in a ring collective over the whole tensor: an all-reduce is a reduce-scatter
    followed by an all-gather, each (tp - 1) / tp of it."""
    return (2 if name == "all_reduce" else 1) * (tp - 1) / tp * numel


def _check_sequence_parallel_communication():
    tp = state.current().tp
    cfg = NO_DROPOUT
    batch, seq = 3, 16
    x = torch.randn(batch, seq // tp.size, cfg.hidden, requires_grad=True)  # this rank's sequence shard
    whole = batch * seq * cfg.hidden
    gather, scatter = ("all_gather_single", tp.handle, whole), ("reduce_scatter_single", tp.handle, whole)
    traffic = {}
    for sp in (False, True):
        layer = TransformerLayer(cfg, tp, sequence_parallel=sp)
        inputs = x if sp else torch.randn(batch, seq, cfg.hidden, requires_grad=True)
        with _recording([]) as forward:
            y = layer(inputs)
        assert y.shape == inputs.shape
        with _recording([]) as backward:
            y.sum().backward()
        traffic[sp] = forward, backward
    # forward: all-gather before QKV, reduce-scatter after the projection; the same around the MLP
    forward, backward = traffic[True]
    assert forward == [gather, scatter] * 2, forward
    # backward: the conjugates (all-gather of the MLP's output gradient, reduce-scatter of each input gradient),
    # and before each reduce-scatter the all-gather of the saved input shard for the weight gradient (section 4.2.2)
    conjugates = [backward[0], backward[2], backward[3], backward[5]]
    assert conjugates == [gather, scatter, gather, scatter] and [backward[1], backward[4]] == [gather] * 2, backward

    def volume(calls):
        return sum(_ring_elements(name, numel, tp.size) for name, _, numel in calls)

    # the same bytes as the 2 + 2 all-reduces of the layer without SP, plus the 2 re-gathers: 1/tp of the memory
    plain_forward, plain_backward = traffic[False]
    assert volume(forward) == volume(plain_forward) and volume(conjugates) == volume(plain_backward)
    assert volume(backward) == 1.5 * volume(plain_backward)

    model = GPTModel(cfg, sequence_parallel=True)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    with _recording([]) as forward:
        _, loss = _lm_loss(model, tokens)
    with _recording([]) as backward:
        loss.backward()
    assert all(group is tp.handle for _, group, _ in forward + backward)
    # forward: the embedding's reduce-scatter, 4 per layer, the output layer's all-gather, the loss's 2 all-reduces
    loss_reductions = [("all_reduce", tp.handle, batch * seq), ("all_reduce", tp.handle, 2 * batch * seq)]
    assert forward == [scatter] + [gather, scatter] * 2 * cfg.layers + [gather] + loss_reductions, forward
    # backward: the output layer's re-gather and reduce-scatter, 6 per layer, the embedding's all-gather
    names = [name for name, *_ in backward]
    assert names.count("reduce_scatter_single") == 1 + 2 * cfg.layers
    assert names.count("all_gather_single") == 1 + 4 * cfg.layers + 1 and len(names) == 3 + 6 * cfg.layers


def test_sequence_parallelism_trades_each_all_reduce_for_an_all_gather_and_a_reduce_scatter():
    run_on_ranks(2, _check_sequence_parallel_communication)
