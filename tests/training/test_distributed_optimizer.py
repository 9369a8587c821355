"""The distributed optimizer (ZeRO stage 1) is exact and keeps 1/dp of Adam's state: at dp=2, tp=2 x dp=2 and
pp=2 x dp=2 it gives the serial model's loss terms, gradients (every DP rank's reduced slice, joined), global
gradient norm and clipped AdamW steps (fp64, dropout off); through the training entry it logs the plain
optimizer's losses, resumes bitwise, and its checkpoints load at another DP degree and into the plain optimizer."""

from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist

from megatron_exp.config import OptimizerConfig
from megatron_exp.models import build_model
from megatron_exp.parallel import state
from megatron_exp.parallel.pipeline import PipelineLayout
from megatron_exp.parallel.sharding import shard_specs
from megatron_exp.training import checkpoint
from megatron_exp.training.distributed_optimizer import MOMENTS, DistributedOptimizer
from megatron_exp.training.grad_sync import GradientSync
from megatron_exp.training.optim import DynamicLossScaler, build_optimizer, optimizer_step
from megatron_exp.training.schedule import MicroBatches, Pipeline
from tests.distributed import run_on_ranks
from tests.test_train import records
from tests.training.test_checkpoint import build, make_config, train_losses
from tests.training.test_schedule import TIGHT, _batch, _check_terms, _config

CLIP = 0.05  # below every step's gradient norm here: clipping scales every step


def _check_matches_serial(arch: str, micro_batches: int, sp: bool):
    torch.set_default_dtype(torch.float64)
    grid = state.current()
    dp, layers = grid.dp, 2 * grid.pp.size
    cfg, settings = _config(arch, layers), OptimizerConfig(lr=3e-3, weight_decay=0.01)
    layout = PipelineLayout(grid.pp.size, 1, layers)
    with state.use(state.SERIAL):
        serial = build_model(cfg, seed=7)
    model = build_model(cfg, seed=7, part=layout.part(grid.pp.rank), sequence_parallel=sp)
    specs = shard_specs(model)
    serial_optimizer, optimizer = build_optimizer(serial, settings), DistributedOptimizer(model, settings, grid)
    sync = GradientSync(model, grid, flat=optimizer.grads)
    serial_schedule = MicroBatches(serial, nullcontext)
    schedule = (
        Pipeline(model, grid, layout, "1f1b", nullcontext) if grid.pp.size > 1 else MicroBatches(model, nullcontext)
    )
    for step in range(3):
        batches = [
            _batch(arch, (step * micro_batches + i) * dp.size + r) for i in range(micro_batches) for r in range(dp.size)
        ]
        expected = serial_schedule.train(batches)
        terms = schedule.train(batches[dp.rank :: dp.size])
        sync()
        _check_terms(terms, expected, grid, f"step {step}")
        joined = torch.empty_like(optimizer.grads)  # every DP rank's reduced slice
        dist.all_gather_single(joined, optimizer.grads.view(dp.size, -1)[dp.rank], group=dp.handle)
        serial_grads = {name: p.grad for name, p in serial.named_parameters()}
        want = [specs[name].shard(serial_grads[name], grid.tp.size, grid.tp.rank) for name, _ in optimizer.layout]
        torch.testing.assert_close(joined[: optimizer.numel], torch.cat([g.reshape(-1) for g in want]), **TIGHT)
        serial_norm, _ = optimizer_step(serial_optimizer, list(serial.parameters()), CLIP, state.SERIAL)
        norm, skipped = optimizer.step(CLIP)
        assert serial_norm > CLIP and skipped.item() == 0.0
        torch.testing.assert_close(norm, serial_norm, rtol=1e-12, atol=0, msg=f"global gradient norm, step {step}")
    serial_state = serial.state_dict()
    for name, tensor in model.state_dict().items():
        want = specs[name].shard(serial_state[name], grid.tp.size, grid.tp.rank)
        torch.testing.assert_close(tensor, want, **TIGHT, msg=f"{name} after 3 steps")

    # Adam's moments: this rank's slice only, 1/dp of what the plain optimizer keeps for the same parameters
    kept = torch.tensor(sum(optimizer.optimizer.state[p][key].numel() for p in optimizer.main for key in MOMENTS))
    assert kept.item() <= 2 * -(-optimizer.numel // dp.size)
    dist.all_reduce(kept, group=dp.handle)
    assert kept.item() == 2 * sum(p.numel() for p in model.parameters())

    if grid.tp.size == grid.pp.size == 1:  # the serial optimizer's state is this position's: this rank cuts its slice
        optimizer.load_state_dict(serial_optimizer.state_dict())
        for key, tensor in _flat_moments(optimizer).items():
            assert torch.equal(tensor, _flat_moments(serial_optimizer)[key][optimizer.start : optimizer.end]), key


@pytest.mark.parametrize(
    "arch, tp, pp, dp, micro_batches, sp",
    [
        ("gpt", 1, 1, 2, 2, False),
        pytest.param("bert", 2, 1, 2, 2, False, marks=pytest.mark.slow),
        pytest.param("gpt", 1, 2, 2, 3, False, marks=pytest.mark.slow),  # the tied embedding's copy on the last stage
        # sequence parallelism: the TP sum of the shard-seen gradients comes before the reduce-scatter
        pytest.param("bert", 2, 1, 2, 2, True, marks=pytest.mark.slow),
    ],
)
def test_the_distributed_optimizer_steps_like_the_serial_model_with_1_over_dp_of_the_moments(
    arch, tp, pp, dp, micro_batches, sp
):
    run_on_ranks(tp * pp * dp, _check_matches_serial, arch, micro_batches, sp, tp=tp, pp=pp)


def _check_overflow_is_agreed():
    grid = state.current()
    torch.manual_seed(0)  # the same weights on both DP replicas
    model = torch.nn.Linear(4, 4)  # 20 parameters: DP rank 0 steps the first 10, rank 1 the rest
    optimizer = DistributedOptimizer(model, OptimizerConfig(lr=0.1), grid)
    scaler = DynamicLossScaler(initial_scale=8.0)
    sync = GradientSync(model, grid, flat=optimizer.grads)
    before = optimizer.params.clone()
    optimizer.grads.fill_(1.0)
    if grid.dp.rank == 0:
        optimizer.grads[15] = torch.inf  # only rank 1's slice overflows once reduced
    sync()
    norm, skipped = optimizer.step(1.0, scaler)
    assert skipped.item() == 1.0 and norm.item() == 0.0 and scaler.scale.item() == 4.0
    assert torch.equal(optimizer.params, before) and not optimizer.grads.any()
    optimizer.grads.fill_(8.0)
    sync()
    norm, skipped = optimizer.step(100.0, scaler)  # unscaled by 4: every gradient is 2.0
    assert skipped.item() == 0.0 and norm.item() == pytest.approx(2.0 * 20**0.5)
    assert not torch.equal(optimizer.params, before)


def test_an_fp16_overflow_in_one_ranks_slice_skips_the_step_on_every_rank():
    run_on_ranks(2, _check_overflow_is_agreed, tp=1)


# --- through the training entry: losses, resume, checkpoints at another DP degree ------------------------------

LAYOUT = ["parallel.dp=2", "parallel.micro_batch=4", "parallel.global_batch=8"]  # dropout on: the RNG streams count
SHARDED = "parallel.distributed_optimizer=true"


def _train_three_runs(root, cache):
    """At dp=2: the distributed optimizer for 6 iterations (checkpoints at 3 and 6), the plain one, and the
    distributed one resumed from the first run's iteration 3."""
    train_losses(make_config(cache, *LAYOUT, SHARDED), root / "sharded")
    train_losses(make_config(cache, *LAYOUT), root / "plain")
    resumed = make_config(cache, *LAYOUT, SHARDED)
    resumed.resume = str(checkpoint.checkpoints_root(root / "sharded") / "iter_0000003")
    train_losses(resumed, root / "resumed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_cache):
    root = tmp_path_factory.mktemp("runs")
    run_on_ranks(2, _train_three_runs, root, shared_cache, tp=1)
    return root, shared_cache


def _losses(run_dir) -> dict[int, float]:
    return {r["iteration"]: r["train/loss"] for r in records(run_dir) if "train/loss" in r}


def _flat_moments(optimizer) -> dict[str, torch.Tensor]:
    """A loop's Adam moments as flat tensors in the flat layout's order, from either optimizer."""
    if isinstance(optimizer, DistributedOptimizer):
        state, parameters = optimizer.optimizer.state, optimizer.main
    else:
        state, parameters = optimizer.state, [p for group in optimizer.param_groups for p in group["params"]]
    return {key: torch.cat([state[p][key].reshape(-1) for p in parameters]) for key in MOMENTS}


def _saved_moments(directory) -> dict[str, torch.Tensor]:
    """A dp=2 checkpoint's moments, flat: the two slices joined, or replica 0's plain state."""
    saved = [checkpoint.load_rank(directory, r)["optimizer"] for r in (0, 1)]
    if "flat_range" in saved[0]:
        return {key: torch.cat([part[key] for part in saved]) for key in MOMENTS}
    entries = [saved[0]["state"][i] for group in saved[0]["param_groups"] for i in group["params"]]
    return {key: torch.cat([entry[key].reshape(-1) for entry in entries]) for key in MOMENTS}


@pytest.mark.slow
def test_training_with_the_distributed_optimizer_logs_the_plain_optimizers_losses_and_resumes_bitwise(runs):
    root, _ = runs
    sharded, plain = _losses(root / "sharded"), _losses(root / "plain")
    assert sorted(sharded) == list(range(1, 7))
    assert [sharded[i] for i in range(1, 7)] == pytest.approx([plain[i] for i in range(1, 7)], rel=1e-5)
    resumed = _losses(root / "resumed")
    assert [resumed[i] for i in (4, 5, 6)] == [sharded[i] for i in (4, 5, 6)]  # exactly equal
    latest = checkpoint.find_latest(root / "sharded")
    slices = [checkpoint.load_rank(latest, r)["optimizer"]["flat_range"] for r in (0, 1)]
    assert slices[0][0] == 0 and slices[0][1] == slices[1][0]  # each rank saved its own half


@pytest.mark.slow
@pytest.mark.parametrize("saved, distributed", [("sharded", False), ("sharded", True), ("plain", True)])
def test_a_dp2_checkpoint_loads_at_dp1_into_either_optimizer_with_the_moments_exactly(runs, saved, distributed):
    root, cache = runs
    directory = checkpoint.checkpoints_root(root / saved) / "iter_0000003"
    cfg = make_config(cache, "parallel.micro_batch=4", "parallel.global_batch=8")
    cfg.parallel.distributed_optimizer, cfg.resume = distributed, str(directory)
    loop = build(cfg, root / f"dp1_{saved}_{distributed}")
    loaded, original = _flat_moments(loop.optimizer), _saved_moments(directory)
    for key in MOMENTS:
        assert torch.equal(loaded[key], original[key]), key
    if not distributed:  # every parameter's moments in its own shape
        optimizer = loop.optimizer
        assert all(optimizer.state[p]["exp_avg"].shape == p.shape for g in optimizer.param_groups for p in g["params"])
    assert loop.start_iteration == 3
