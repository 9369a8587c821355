"""Pipeline schedules are exact: every stage's split of the model, run by the pipeline executor, gives the serial
model's loss terms, every gradient and the same optimizer steps (fp64, dropout off), for GPT and BERT, every
schedule, and pipelines combined with TP (and with sequence parallelism: stages pass sequence shards)."""

import collections
from contextlib import nullcontext

import pytest
import torch

from megatron_exp.config import ModelConfig
from megatron_exp.models import build_model
from megatron_exp.models.contract import Batch
from megatron_exp.parallel import state
from megatron_exp.parallel.pipeline import PipelineLayout, peak_in_flight
from megatron_exp.parallel.sharding import shard_specs
from megatron_exp.training.grad_sync import GradientSync
from megatron_exp.training.loop import reported
from megatron_exp.training.optim import optimizer_step
from megatron_exp.training.schedule import MicroBatches, Pipeline
from tests.distributed import run_on_ranks

SEQ, VOCAB, MICRO = 12, 200, 2
TIGHT = dict(rtol=1e-9, atol=1e-11)


def _config(arch: str, layers: int) -> ModelConfig:
    return ModelConfig(
        arch=arch, hidden=32, heads=4, layers=layers, vocab_size=VOCAB, seq_len=SEQ, hidden_dropout=0.0,
        attention_dropout=0.0, layernorm="pre" if arch == "gpt" else "post",
    )  # fmt: skip


def _batch(arch: str, index: int) -> Batch:
    g = torch.Generator().manual_seed(index)
    tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
    if arch == "gpt":
        return Batch({"tokens": tokens[:, :-1]}, {"targets": tokens[:, 1:]})
    padding = torch.arange(SEQ)[None, :] < torch.tensor([[SEQ], [SEQ - 3]])
    inputs = {
        "tokens": tokens[:, :-1],
        "token_types": (torch.arange(SEQ)[None, :] >= SEQ // 2).long().expand(MICRO, -1) * padding,
        "padding_mask": padding,
    }
    targets = {
        "mlm_targets": tokens[:, 1:],
        "mlm_mask": (torch.rand(MICRO, SEQ, generator=g) < 0.3).double() * padding,
        "sop_labels": torch.randint(0, 2, (MICRO,), generator=g),
    }
    return Batch(inputs, targets)


def _check_pipeline_matches_serial(
    arch: str, schedule: str, virtual: int, micro_batches: int, layers: int, recompute: str, sp: bool = False
):
    torch.set_default_dtype(torch.float64)
    grid = state.current()
    cfg = _config(arch, layers)
    layout = PipelineLayout(grid.pp.size, virtual, layers)
    with state.use(state.SERIAL):
        serial = build_model(cfg, seed=7)
    model = build_model(cfg, seed=7, part=layout.part(grid.pp.rank), recompute=recompute, sequence_parallel=sp)
    specs = shard_specs(model)
    assert set(model.part.layers) == set(layout.part(grid.pp.rank).layers)
    serial_state = serial.state_dict()
    for name, tensor in model.state_dict().items():  # the weights depend on the seed, not on the layout
        torch.testing.assert_close(tensor, specs[name].shard(serial_state[name], grid.tp.size, grid.tp.rank), **TIGHT)

    serial_schedule = MicroBatches(serial, nullcontext)
    pipeline = Pipeline(model, grid, layout, schedule, nullcontext)
    sync = GradientSync(model, grid)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.01) for m in (serial, model)]
    dp = grid.dp.size
    for step in range(3):  # the serial model takes the whole global batch, each DP replica its share
        batches = [_batch(arch, (step * micro_batches + i) * dp + r) for i in range(micro_batches) for r in range(dp)]
        expected = serial_schedule.train(batches)
        terms = pipeline.train(batches[grid.dp.rank :: dp])
        sync()
        _check_terms(terms, expected, grid, f"step {step}")
        serial_grads = {name: p.grad for name, p in serial.named_parameters()}
        for name, p in model.named_parameters():  # every stage's gradients, the last stage's embedding copy too
            want = specs[name].shard(serial_grads[name], grid.tp.size, grid.tp.rank)
            torch.testing.assert_close(p.grad, want, **TIGHT, msg=f"grad of {name}, step {step}")
        norms = [
            optimizer_step(opt, list(m.parameters()), 100.0, g)[0]
            for opt, m, g in ((optimizers[0], serial, state.SERIAL), (optimizers[1], model, grid))
        ]
        # the norm is summed in fp32, over the stages in another order than serially (clipping is off here: a
        # clipping factor rounded to fp32 would move the fp64 weights by more than TIGHT)
        torch.testing.assert_close(norms[1], norms[0], rtol=1e-6, atol=0, msg=f"global gradient norm, step {step}")
    serial_state = serial.state_dict()
    for name, tensor in model.state_dict().items():
        want = specs[name].shard(serial_state[name], grid.tp.size, grid.tp.rank)
        torch.testing.assert_close(tensor, want, **TIGHT, msg=f"{name} after 3 steps")

    evaluation = [_batch(arch, 100 + i) for i in range(micro_batches)]
    expected = serial_schedule.evaluate(evaluation)
    _check_terms(pipeline.evaluate(evaluation), expected, grid, "evaluation")


def _check_terms(terms: dict, expected: dict, grid: state.ProcessGrid, when: str) -> None:
    """The last stage holds the serial model's loss terms (its DP replica's share's); the others zeros, so the
    reported (summed over the stages, averaged over DP, in fp32) values are the serial ones."""
    assert terms.keys() == expected.keys()
    last = grid.pp.rank == grid.pp.size - 1
    for name, value in terms.items() if grid.dp.size == 1 else ():
        want = expected[name] if last else torch.zeros_like(expected[name])
        torch.testing.assert_close(value, want, **TIGHT, check_dtype=last, msg=f"{name}, {when}")
    for name, value in zip(terms, reported(list(terms.values()), grid), strict=True):
        assert value == pytest.approx(expected[name].item(), rel=1e-6), f"reported {name}, {when}"


@pytest.mark.parametrize(
    "arch, pp, tp, dp, schedule, virtual, micro_batches, recompute",
    [
        ("gpt", 2, 1, 1, "1f1b", 1, 4, "none"),
        ("bert", 2, 1, 1, "1f1b", 1, 3, "none"),
        pytest.param("gpt", 2, 1, 1, "gpipe", 1, 3, "none", marks=pytest.mark.slow),
        pytest.param("gpt", 2, 1, 1, "interleaved", 2, 4, "none", marks=pytest.mark.slow),
        pytest.param("gpt", 2, 1, 1, "interleaved", 2, 4, "full", marks=pytest.mark.slow),
        pytest.param("gpt", 2, 1, 1, "1f1b", 1, 4, "selective", marks=pytest.mark.slow),
        pytest.param("bert", 2, 1, 1, "interleaved", 2, 2, "none", marks=pytest.mark.slow),
        pytest.param("gpt", 4, 1, 1, "1f1b", 1, 6, "none", marks=pytest.mark.slow),
        pytest.param("gpt", 2, 2, 1, "1f1b", 1, 3, "none", marks=pytest.mark.slow),
        pytest.param("bert", 2, 2, 1, "gpipe", 1, 2, "none", marks=pytest.mark.slow),
        pytest.param("gpt", 2, 2, 2, "interleaved", 2, 2, "none", marks=pytest.mark.slow),  # 8 processes
        pytest.param("bert", 2, 2, 2, "1f1b", 1, 2, "none", marks=pytest.mark.slow),
    ],
)
def test_a_pipeline_equals_the_serial_model(arch, pp, tp, dp, schedule, virtual, micro_batches, recompute):
    layers = 2 * pp * virtual
    args = (arch, schedule, virtual, micro_batches, layers, recompute)
    run_on_ranks(pp * tp * dp, _check_pipeline_matches_serial, *args, tp=tp, pp=pp)


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, dp, schedule, virtual, micro_batches, recompute",
    [
        ("gpt", 1, "1f1b", 1, 3, "none"),
        ("gpt", 1, "gpipe", 1, 2, "none"),
        ("gpt", 1, "interleaved", 2, 2, "full"),
        ("bert", 1, "1f1b", 1, 2, "none"),
        ("gpt", 2, "interleaved", 2, 2, "none"),  # 8 processes
    ],
)
def test_a_sequence_parallel_pipeline_equals_the_serial_model(arch, dp, schedule, virtual, micro_batches, recompute):
    """tp=2 x pp=2 with sequence parallelism: every stage sends and receives [micro, seq / 2, hidden] shards."""
    args = (arch, schedule, virtual, micro_batches, 4 * virtual, recompute, True)
    run_on_ranks(4 * dp, _check_pipeline_matches_serial, *args, tp=2, pp=2)


class _LiveActivations:
    """Which (chunk, micro-batch) forwards have tensors saved for backward at this moment, and the most at once:
    autograd's saved tensors are wrapped as they are saved and counted until autograd frees them."""

    def __init__(self):
        self.live: collections.Counter = collections.Counter()
        self.peak, self.current = 0, None

    def pack(self, tensor: torch.Tensor) -> "_Saved":
        self.live[self.current] += 1
        self.peak = max(self.peak, len(self.live))
        return _Saved(tensor, self, self.current)

    @staticmethod
    def unpack(saved: "_Saved") -> torch.Tensor:
        return saved.tensor


class _Saved:
    def __init__(self, tensor: torch.Tensor, counter: _LiveActivations, key):
        self.tensor, self.counter, self.key = tensor, counter, key

    def __del__(self):
        self.counter.live[self.key] -= 1
        if not self.counter.live[self.key]:
            del self.counter.live[self.key]


class _CountingPipeline(Pipeline):
    def __init__(self, *args, counter: _LiveActivations):
        super().__init__(*args)
        self.counter = counter

    def _forward(self, action, batch):
        self.counter.current = (action.chunk, action.micro)
        return super()._forward(action, batch)


def _check_live_activations(micro_batches: int):
    grid = state.current()
    for schedule, virtual in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        layout = PipelineLayout(grid.pp.size, virtual, 4)
        model = build_model(_config("gpt", 4), seed=7, part=layout.part(grid.pp.rank))
        counter = _LiveActivations()
        pipeline = _CountingPipeline(model, grid, layout, schedule, nullcontext, counter=counter)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            pipeline.train([_batch("gpt", i) for i in range(micro_batches)])
        assert not counter.live, f"{schedule}: activations left after the step"
        expected = peak_in_flight(layout, schedule, micro_batches, grid.pp.rank)
        assert counter.peak == expected, f"{schedule}, stage {grid.pp.rank}: {counter.peak} != {expected}"


def test_each_stage_holds_the_schedules_in_flight_activations_and_no_more():
    """GPipe keeps all m micro-batches' activations, 1F1B at most p - stage, interleaved its warm-up + 1 chunk
    forwards: counted from the tensors autograd really keeps, at every moment of a step."""
    run_on_ranks(2, _check_live_activations, 4, pp=2)
