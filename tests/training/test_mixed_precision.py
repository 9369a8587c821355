"""Mixed precision the Megatron way (training/mixed_precision.py): low-precision parameters, main gradients and main
weights in the dtype the model was built in.

Exactness runs at fp32 parameters with fp64 main weights (the code is generic in the two dtypes): the main weights
after 3 clipped AdamW steps equal a reference that runs the same fp32 model serially, upcasts each micro-batch's
gradients to fp64, sums them and steps a plain fp64 AdamW on fp64 copies: bitwise where the arithmetic is the
same (one rank), to fp32 rounding at dp=2 (plain and distributed optimizer), tp=2 with sequence parallelism and
pp=2 (the tied embedding). Through the training entry, bf16 parameters on CPU: fp32 checkpoints, a resumed run
equal to the uninterrupted one, and the fp32 run's losses to bf16 rounding."""

import math
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist

from megatron_exp.config import OptimizerConfig
from megatron_exp.models import build_model
from megatron_exp.parallel import state
from megatron_exp.parallel.pipeline import PipelineLayout
from megatron_exp.parallel.sharding import ShardSpec, shard_specs
from megatron_exp.training import checkpoint
from megatron_exp.training.distributed_optimizer import DistributedOptimizer
from megatron_exp.training.grad_sync import GradientSync
from megatron_exp.training.mixed_precision import MainWeightsOptimizer
from megatron_exp.training.optim import DynamicLossScaler, adamw, clip_gradients_, optimizer_order
from megatron_exp.training.schedule import MicroBatches, Pipeline
from tests.distributed import run_on_ranks
from tests.test_train import records
from tests.training.test_checkpoint import build, make_config, train_losses
from tests.training.test_schedule import _batch, _config

CLIP = 0.05  # below every step's gradient norm here: clipping scales every step
# fp32 parameters at other layouts sum in other orders; Adam's update (about lr per step and element, whatever the
# gradient's size) carries the gradients' relative rounding into the weights at up to ~1e-4 of lr
FP32_ROUNDING = dict(rtol=1e-5, atol=1e-6)


class Reference:
    """The serial fp32 model, its gradients upcast to fp64 per micro-batch, a plain fp64 AdamW on fp64 copies
    (in the plain optimizer's order, with their parameters' shard specs: the clipping norm sums the same terms)."""

    def __init__(self, model: torch.nn.Module, settings: OptimizerConfig):
        self.model = model
        named = dict(model.named_parameters())
        self.main = {name: torch.nn.Parameter(named[name].detach().clone()) for name in optimizer_order(model)}
        for name, main in self.main.items():
            ShardSpec.of(named[name]).tag(main)
        for p in model.parameters():
            p.data = p.data.float()
        self.optimizer = adamw(self.main.values(), settings)

    def backward(self, batches) -> None:
        for batch in batches:
            loss = self.model.loss_terms(self.model(**batch.inputs), **batch.targets)["loss"] / len(batches)
            loss.backward()
            for name, p in self.model.named_parameters():
                main = self.main[name]
                main.grad = p.grad.double() if main.grad is None else main.grad + p.grad.double()
                p.grad = None

    def step(self) -> None:
        clip_gradients_(list(self.main.values()), CLIP, state.SERIAL)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(self.main[name])


def _check_main_weights_match_the_reference(
    arch: str, micro_batches: int, distributed: bool, sp: bool, recompute: str = "none"
):
    torch.set_default_dtype(torch.float64)
    grid = state.current()
    dp, layers = grid.dp, 2 * grid.pp.size
    cfg, settings = _config(arch, layers), OptimizerConfig(lr=3e-3, weight_decay=0.01)
    layout = PipelineLayout(grid.pp.size, 1, layers)
    with state.use(state.SERIAL):
        reference = Reference(build_model(cfg, seed=7), settings)
    model = build_model(cfg, seed=7, part=layout.part(grid.pp.rank), sequence_parallel=sp, recompute=recompute)
    specs = shard_specs(model)
    if distributed:
        optimizer = DistributedOptimizer(model, settings, grid, torch.float32)
    else:
        optimizer = MainWeightsOptimizer(model, settings, grid, torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    sync = GradientSync(model, grid, flat=optimizer.grads if distributed else None)
    pipelined = grid.pp.size > 1
    schedule = Pipeline(model, grid, layout, "1f1b", nullcontext) if pipelined else MicroBatches(model, nullcontext)
    for step in range(3):
        batches = [
            _batch(arch, (step * micro_batches + i) * dp.size + r) for i in range(micro_batches) for r in range(dp.size)
        ]
        reference.backward(batches)
        schedule.train(batches[dp.rank :: dp.size])
        assert all(p.grad is None for p in model.parameters())  # the hooks freed every fp32 gradient
        sync()
        for name, grad in _main_gradients(model, optimizer).items():
            want = specs[name].shard(reference.main[name].grad, grid.tp.size, grid.tp.rank)
            _assert_close(grad, want, f"{name}'s gradient, step {step}")
        reference.step()
        optimizer.step(CLIP)
    saved = optimizer.main_state_dict()  # what a checkpoint holds: the fp64 main weights
    exact = grid.world_size == 1
    for name, tensor in model.state_dict().items():
        want = specs[name].shard(reference.main[name].detach(), grid.tp.size, grid.tp.rank)
        assert saved[name].dtype == torch.float64 and tensor.dtype == torch.float32
        assert torch.equal(tensor, saved[name].float()), f"{name}: the parameter is its main weight's cast"
        if exact:
            assert torch.equal(saved[name], want), f"{name} after 3 steps"
        else:
            _assert_close(saved[name], want, f"{name} after 3 steps")


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, **FP32_ROUNDING, msg=lambda message: f"{what}: {message}")


def _main_gradients(model, optimizer) -> dict[str, torch.Tensor]:
    """The DP-reduced main gradients by name; the distributed optimizer's joined from every DP rank's slice."""
    if not isinstance(optimizer, DistributedOptimizer):
        return {name: p.main_grad for name, p in model.named_parameters()}
    dp = state.current().dp
    joined = optimizer.grads.clone()
    if dp.size > 1:
        dist.all_gather_single(joined, optimizer.grads.view(dp.size, -1)[dp.rank].clone(), group=dp.handle)
    pieces = joined[: optimizer.numel].split([math.prod(shape) for _, shape in optimizer.layout])
    return {name: piece.view(shape) for (name, shape), piece in zip(optimizer.layout, pieces, strict=True)}


@pytest.fixture
def restores_default_dtype():
    """For the checks run in this process: they set fp64 as the default dtype, which later tests must not see."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.mark.parametrize(
    "arch, tp, pp, dp, micro_batches, distributed, sp",
    [
        ("gpt", 1, 1, 1, 2, False, False),
        ("gpt", 1, 1, 1, 2, True, False),
        ("gpt", 1, 1, 2, 2, False, False),
        ("gpt", 1, 1, 2, 2, True, False),
        # the TP sum of the sequence-parallel gradients, on main gradients
        pytest.param("bert", 2, 1, 1, 2, False, True, marks=pytest.mark.slow),
        pytest.param("bert", 2, 1, 2, 2, True, True, marks=pytest.mark.slow),
        # the tied embedding's gradient summed over the first and last stage, on main gradients
        pytest.param("gpt", 1, 2, 1, 3, False, False, marks=pytest.mark.slow),
        pytest.param("gpt", 1, 2, 2, 3, True, False, marks=pytest.mark.slow),
    ],
)
def test_main_weights_step_like_fp64_adamw_on_the_upcast_gradients_of_the_low_precision_model(
    arch, tp, pp, dp, micro_batches, distributed, sp, restores_default_dtype
):
    if tp * pp * dp == 1:
        _check_main_weights_match_the_reference(arch, micro_batches, distributed, sp)
    else:
        run_on_ranks(tp * pp * dp, _check_main_weights_match_the_reference, arch, micro_batches, distributed, sp,
                     tp=tp, pp=pp)  # fmt: skip


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recomputed_layers_accumulate_into_the_main_gradients_alike(recompute, restores_default_dtype):
    _check_main_weights_match_the_reference("gpt", 2, False, False, recompute)


def test_an_fp16_overflow_in_the_main_gradients_skips_the_step_and_keeps_the_main_weights():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = MainWeightsOptimizer(model, OptimizerConfig(lr=0.1), state.SERIAL, torch.float16)
    scaler = DynamicLossScaler(initial_scale=8.0)
    before = optimizer.main_state_dict()
    before = {name: tensor.clone() for name, tensor in before.items()}
    (model(torch.full((2, 4), 1e4, dtype=torch.float16)).sum() * scaler.scale).backward()  # overflows in fp16
    assert model.weight.grad is None and torch.isinf(optimizer.grads).any()
    norm, skipped = optimizer.step(1.0, scaler)
    assert skipped.item() == 1.0 and norm.item() == 0.0 and scaler.scale.item() == 4.0
    after = optimizer.main_state_dict()
    assert all(torch.equal(after[name], before[name]) for name in before) and not optimizer.grads.any()
    (model(torch.ones(2, 4, dtype=torch.float16)).sum() * scaler.scale).backward()
    norm, skipped = optimizer.step(100.0, scaler)
    assert skipped.item() == 0.0 and norm.item() == pytest.approx((2**2 * 16 + 2**2 * 4) ** 0.5)  # unscaled
    assert not torch.equal(optimizer.main_state_dict()["weight"], before["weight"])


# --- through the training entry: bf16 parameters on CPU ---------------------------------------------------------

BF16 = ["hardware.precision=bf16", "hardware.params=low"]
LAYOUT = ["parallel.dp=2", "parallel.micro_batch=4", "parallel.global_batch=8"]
SMALL_TEST_SPLIT = "data.split_fractions=[0.98,0.01,0.01]"  # the final evaluation reads all of it


@pytest.mark.slow
def test_bf16_parameters_train_like_fp32_save_fp32_main_weights_and_resume_exactly(tmp_path, shared_cache):
    fp32 = train_losses(make_config(shared_cache, SMALL_TEST_SPLIT), tmp_path / "fp32")
    uninterrupted = train_losses(make_config(shared_cache, SMALL_TEST_SPLIT, *BF16), tmp_path / "a")
    assert [uninterrupted[i] for i in range(1, 7)] == pytest.approx([fp32[i] for i in range(1, 7)], rel=2e-2)
    train_losses(make_config(shared_cache, SMALL_TEST_SPLIT, *BF16, "train.iterations=3"), tmp_path / "b")
    latest = checkpoint.find_latest(tmp_path / "b")
    saved = checkpoint.load_rank(latest, 0)["model"]
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}  # the main weights, not their bf16 cast
    resumed = make_config(shared_cache, SMALL_TEST_SPLIT, *BF16)
    resumed.resume = str(latest)
    loop = build(resumed, tmp_path / "b")
    assert {p.dtype for p in loop.model.parameters()} == {torch.bfloat16}
    assert all(torch.equal(main, saved[name]) for name, main in loop.optimizer.main_state_dict().items())
    loop.run()
    losses = {r["iteration"]: r["train/loss"] for r in records(tmp_path / "b") if "train/loss" in r}
    assert [losses[i] for i in (4, 5, 6)] == [uninterrupted[i] for i in (4, 5, 6)]  # exactly equal

    # an fp32 run's checkpoint (the same state dict) continues with bf16 parameters: its weights become the main ones
    across = make_config(shared_cache, SMALL_TEST_SPLIT, *BF16)
    across.resume = str(checkpoint.find_latest(tmp_path / "fp32"))
    weights = checkpoint.load_rank(checkpoint.find_latest(tmp_path / "fp32"), 0)["model"]
    main = build(across, tmp_path / "c").optimizer.main_state_dict()
    assert all(torch.equal(main[name], weights[name]) for name in weights)


def _train_sharded_and_resumed(root, cache):
    """At dp=2 with bf16 parameters: the distributed optimizer for 6 iterations (checkpoints at 3 and 6), and
    resumed from iteration 3; then the plain optimizer loads iteration 6 (each rank's fp32 main slice joined)."""
    sharded = [SMALL_TEST_SPLIT, *BF16, *LAYOUT, "parallel.distributed_optimizer=true"]
    train_losses(make_config(cache, *sharded), root / "sharded")
    resumed = make_config(cache, *sharded)
    resumed.resume = str(checkpoint.checkpoints_root(root / "sharded") / "iter_0000003")
    train_losses(resumed, root / "resumed")
    plain = make_config(cache, SMALL_TEST_SPLIT, *BF16, *LAYOUT)
    plain.resume = str(checkpoint.find_latest(root / "sharded"))
    loop = build(plain, root / "plain")
    saved = checkpoint.load_rank(checkpoint.find_latest(root / "sharded"), state.current().rank)["model"]
    main = loop.optimizer.main_state_dict()
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert all(torch.equal(main[name], saved[name]) for name in saved)
    assert all(torch.equal(p, saved[name].bfloat16()) for name, p in loop.model.named_parameters())


@pytest.mark.slow
def test_the_distributed_optimizer_with_bf16_parameters_resumes_exactly_at_dp2(tmp_path, shared_cache):
    run_on_ranks(2, _train_sharded_and_resumed, tmp_path, shared_cache, tp=1)
    sharded = {r["iteration"]: r["train/loss"] for r in records(tmp_path / "sharded") if "train/loss" in r}
    resumed = {r["iteration"]: r["train/loss"] for r in records(tmp_path / "resumed") if "train/loss" in r}
    assert sorted(sharded) == list(range(1, 7))
    assert [resumed[i] for i in (4, 5, 6)] == [sharded[i] for i in (4, 5, 6)]  # exactly equal
