"""A run resumed at another TP x PP x DP layout continues the uninterrupted run: the same losses (fp32 rounding,
dropout off) and Adam moments that are exactly the merged originals."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from megatron_exp.config import ConfigError, ConvertConfig
from megatron_exp.convert import convert, state_differences
from megatron_exp.models.gpt import GPTModel
from megatron_exp.parallel import state
from megatron_exp.parallel.pipeline import PipelineLayout
from megatron_exp.parallel.sharding import ShardSpec
from megatron_exp.train import _resolve_resume
from megatron_exp.training import checkpoint, reshard
from megatron_exp.training.optim import optimizer_order
from megatron_exp.training.reshard import serial_optimizer_state
from tests.distributed import run_on_ranks
from tests.training.test_checkpoint import build, make_config

RUN = ["model.hidden_dropout=0", "model.attention_dropout=0", "model.layers=4", "train.iterations=10"]
RUN += ["checkpoint.interval=5", "parallel.global_batch=8", "parallel.micro_batch=2"]


def _train(run_dir, cache, overrides, resume=None):
    """Train; a resumed run first saves what it loaded (a checkpoint at the resumed iteration) for the tests."""
    cfg = make_config(cache, *RUN, *overrides)
    cfg.resume = resume
    loop = build(cfg, run_dir)
    if resume:
        loop.save_checkpoint(loop.start_iteration)
    loop.run()


def _losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


@pytest.fixture(scope="module")
def tp2_pp2(tmp_path_factory, shared_cache):
    """10 iterations at tp=2 x pp=2, a checkpoint at 5."""
    run_dir = tmp_path_factory.mktemp("tp2pp2")
    run_on_ranks(4, _train, run_dir, shared_cache, ["parallel.tp=2", "parallel.pp=2"], tp=2, pp=2)
    return run_dir, checkpoint.checkpoints_root(run_dir) / "iter_0000005"


def _merged_originals(saved: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's Adam state from a tp=2 x pp=2 checkpoint's files, merged by hand: the TP shards
    concatenated along the parameter's split dimension (vocabulary padding trimmed to the serial model's), from
    the stage that holds the parameter first (stage 0's word embedding, not the last stage's copy)."""
    cfg = checkpoint.model_config_of(saved)
    serial = {name: (ShardSpec.of(p), p.shape) for name, p in GPTModel(cfg).named_parameters()}
    originals = {}
    for stage, ranks in enumerate([[0, 1], [2, 3]]):  # (pp, dp, tp) order: stage 0 is ranks 0, 1
        with torch.device("meta"), state.use(state.virtual(2, pp=2, pp_rank=stage)):
            part = GPTModel(cfg, part=PipelineLayout(2, 1, cfg.layers).part(stage))
        shards = [checkpoint.load_rank(saved, r)["optimizer"]["state"] for r in ranks]
        for index, name in enumerate(optimizer_order(part)):
            if name in originals:
                continue
            spec, shape = serial[name]
            entry = {"step": shards[0][index]["step"]}
            for key in ("exp_avg", "exp_avg_sq"):
                pieces = [shard[index][key] for shard in shards]
                whole = pieces[0] if spec.dim is None else torch.cat(pieces, dim=spec.dim)
                entry[key] = whole if spec.dim is None else whole.narrow(spec.dim, 0, shape[spec.dim])
            originals[name] = entry
    assert set(originals) == set(serial)
    return originals


def _assert_moments_are(resumed: dict[str, dict[str, torch.Tensor]], originals: dict) -> None:
    assert set(resumed) == set(originals)
    for name, entry in originals.items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(resumed[name][key], entry[key]), f"{key} of {name}"


def _resume(tmp_path, saved, cache, tp, pp, dp, *options):
    layout = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.dp={dp}", *options]
    run_on_ranks(tp * pp * dp, _train, tmp_path, cache, layout, str(saved), tp=tp, pp=pp)
    return _losses(tmp_path)


def _assert_continues(resumed: dict[int, float], uninterrupted: dict[int, float]) -> None:
    assert sorted(resumed) == [6, 7, 8, 9, 10]
    assert [resumed[i] for i in range(6, 11)] == pytest.approx([uninterrupted[i] for i in range(6, 11)], rel=1e-5)


@pytest.mark.parametrize("tp, pp, dp, options", [
    pytest.param(1, 1, 2, (), marks=pytest.mark.slow),
    pytest.param(4, 1, 1, (), marks=pytest.mark.slow),
    pytest.param(1, 4, 1, (), marks=pytest.mark.slow),
    pytest.param(1, 1, 2, ("parallel.distributed_optimizer=true",), marks=pytest.mark.slow),
])  # fmt: skip
def test_a_run_resumed_at_another_layout_continues_the_uninterrupted_run(
    tmp_path, shared_cache, tp2_pp2, tp, pp, dp, options
):
    """The losses of iterations 6-10, and the Adam state the resumed run loaded (what it saved at iteration 5,
    merged), which is the original shards' merged by hand, bit for bit."""
    run_dir, saved = tp2_pp2
    _assert_continues(_resume(tmp_path, saved, shared_cache, tp, pp, dp, *options), _losses(run_dir))
    loaded = checkpoint.checkpoints_root(tmp_path) / "iter_0000005"
    _assert_moments_are(serial_optimizer_state(loaded), _merged_originals(saved))


@pytest.mark.slow
def test_the_resumed_adam_moments_are_the_merged_originals_exactly(tmp_path, shared_cache, tp2_pp2):
    """At tp=1 x pp=1, in this process: the optimizer's own state after the resume."""
    _, saved = tp2_pp2
    cfg = make_config(shared_cache, *RUN)
    cfg.resume = str(saved)
    loop = build(cfg, tmp_path)
    assert loop.start_iteration == 5
    names = optimizer_order(loop.model)
    resumed = {names[i]: entry for i, entry in loop.optimizer.state_dict()["state"].items()}
    _assert_moments_are(resumed, _merged_originals(saved))


def _count_opened_files(monkeypatch) -> Counter:
    opened, load_rank = Counter(), checkpoint.load_rank

    def counted(directory, rank, mmap=False):
        opened[rank, mmap] += 1
        return load_rank(directory, rank, mmap)

    monkeypatch.setattr(checkpoint, "load_rank", counted)
    return opened


@pytest.mark.slow
def test_a_rank_of_the_new_layout_opens_the_files_it_needs_once(tmp_path, shared_cache, tp2_pp2, monkeypatch):
    """Memory-mapped, each once: all four for a serial rank, which holds every stage's parameters. Stage 1 of a
    pp=2 layout reads its layers from the saved stage 1's files, and from stage 0's only the tied word embedding
    (the first stage's copy): what a rank reads is its own parameters, not the model's other stages."""
    _, saved = tp2_pp2
    opened = _count_opened_files(monkeypatch)
    cfg = make_config(shared_cache, *RUN)
    cfg.resume = str(saved)
    build(cfg, tmp_path)
    assert opened == {(rank, True): 1 for rank in range(4)}
    opened.clear()
    with torch.device("meta"), state.use(state.virtual(1, pp=2, pp_rank=1)):
        stage_1 = GPTModel(cfg.model, part=PipelineLayout(2, 1, 4).part(1))
    shards = checkpoint.SavedShards(saved)
    weights = shards.weights_for(stage_1, state.Group(size=1, rank=0))
    moments = reshard.shard_optimizer_state(reshard.SavedAdam(shards), stage_1, state.Group(size=1, rank=0), [{}, {}])
    assert set(weights) == set(optimizer_order(stage_1)) and len(moments["state"]) == len(weights)
    assert opened == {(rank, True): 1 for rank in range(4)}
    from_stage_0 = {name for name in weights if shards.stage_of[name] == 0}
    assert from_stage_0 == {"embedding.weight"}  # the word embedding (positions live on stage 0 only)


@pytest.fixture(scope="module")
def dp2_distributed_optimizer(tmp_path_factory, shared_cache):
    """10 iterations at dp=2 with the distributed optimizer (Adam state in flat slices), a checkpoint at 5."""
    run_dir = tmp_path_factory.mktemp("dp2distopt")
    run_on_ranks(2, _train, run_dir, shared_cache, ["parallel.dp=2", "parallel.distributed_optimizer=true"], tp=1)
    return run_dir, checkpoint.checkpoints_root(run_dir) / "iter_0000005"


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp, dp, options", [
    (2, 1, 1, ("parallel.distributed_optimizer=false",)),
    (1, 2, 2, ("parallel.distributed_optimizer=true",)),
])  # fmt: skip
def test_a_distributed_optimizer_checkpoint_resumes_at_another_tp_or_pp(
    tmp_path, shared_cache, dp2_distributed_optimizer, tp, pp, dp, options
):
    run_dir, saved = dp2_distributed_optimizer
    _assert_continues(_resume(tmp_path, saved, shared_cache, tp, pp, dp, *options), _losses(run_dir))
    loaded = checkpoint.checkpoints_root(tmp_path) / "iter_0000005"
    assert state_differences(serial_optimizer_state(loaded), serial_optimizer_state(saved), "adam") == []


HIDDEN_DROPOUT = "model.hidden_dropout=0.1"


@pytest.fixture(scope="module")
def tp2_with_dropout(tmp_path_factory, shared_cache):
    """10 iterations at tp=2 with hidden dropout (on the replicated stream), a checkpoint at 5."""
    run_dir = tmp_path_factory.mktemp("tp2dropout")
    run_on_ranks(2, _train, run_dir, shared_cache, ["parallel.tp=2", HIDDEN_DROPOUT], tp=2)
    saved = checkpoint.checkpoints_root(run_dir) / "iter_0000005"
    assert checkpoint.read_meta(saved)["consumed_samples"] == 5 * 8  # the data position, a global sample index
    return run_dir, saved


@pytest.mark.parametrize("tp, converted", [(1, False), pytest.param(4, False, marks=pytest.mark.slow), (1, True)])
def test_at_another_tp_degree_the_replicated_dropout_stream_continues(
    tmp_path, shared_cache, tp2_with_dropout, tp, converted
):
    """Same stages, other TP degree: every rank continues its stage's replicated stream, so the hidden dropout
    masks, and with them the losses, are the uninterrupted run's (re-derived streams would draw other masks)."""
    run_dir, saved = tp2_with_dropout
    if converted:
        saved = convert(ConvertConfig(source=str(saved), tp=tp, output=str(tmp_path / "converted")))
    resumed = _resume(tmp_path / "resumed", saved, shared_cache, tp, 1, 1, HIDDEN_DROPOUT)
    _assert_continues(resumed, _losses(run_dir))


def test_the_loss_scale_carries_over_to_another_layout(tmp_path, shared_cache):
    """fp16's dynamic loss scale (here set to a value no fresh run has) goes on at tp=2 from a serial run."""
    fp16 = ["hardware.precision=fp16", "hardware.params=fp32", "train.iterations=3", "checkpoint.interval=3"]
    _train(tmp_path / "run", shared_cache, fp16)
    saved = checkpoint.find_latest(tmp_path / "run")
    first = checkpoint.load_rank(saved, 0)
    first["loss_scaler"] = {"scale": 1024.0, "clean_steps": 7}
    torch.save(first, checkpoint.rank_file(saved, 0))
    _resume(tmp_path / "resumed", saved, shared_cache, 2, 1, 1, *fp16, "train.iterations=5")
    loaded = checkpoint.load_rank(checkpoint.checkpoints_root(tmp_path / "resumed") / "iter_0000003", 1)
    assert loaded["loss_scaler"] == {"scale": 1024.0, "clean_steps": 7}
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    scales = {r["iteration"]: r["train/loss_scale"] for r in map(json.loads, lines) if "train/loss_scale" in r}
    assert scales == {4: 1024.0, 5: 1024.0}


@pytest.mark.slow
def test_a_changed_model_or_global_batch_is_still_refused_in_one_line(tmp_path, shared_cache, tp2_pp2):
    _, saved = tp2_pp2
    for override, named in (("model.hidden=128", "model.hidden=128 (checkpoint: 64)"),
                            ("parallel.global_batch=16", "parallel.global_batch=16 (checkpoint: 8)")):  # fmt: skip
        cfg = make_config(shared_cache, *RUN, override)
        cfg.resume = str(saved)
        with pytest.raises(ConfigError, match="only the parallel layout may change") as error:
            _resolve_resume(cfg, str(tmp_path))
        assert named in str(error.value) and "\n" not in str(error.value)


def _assert_same_state(a: Path, b: Path) -> None:
    meta = checkpoint.read_meta(a)
    assert checkpoint.layout_of(meta) == checkpoint.layout_of(checkpoint.read_meta(b))
    for rank in range(meta["world_size"]):
        original, back = checkpoint.load_rank(a, rank), checkpoint.load_rank(b, rank)
        back.pop("rng_by_layout", None)
        assert state_differences(original, back, f"rank {rank}") == []


def _round_trip(saved: Path, tmp_path: Path) -> None:
    """The whole training state to tp=1 x pp=1 x dp=1 and back (verify=true does it too), bit for bit."""
    serial = convert(ConvertConfig(source=str(saved), tp=1, output=str(tmp_path / "serial"), verify=True))
    assert checkpoint.read_meta(serial)["world_size"] == 1 and "exp_avg" in str(checkpoint.load_rank(serial, 0))
    tp, pp, virtual = checkpoint.layout_of(checkpoint.read_meta(saved))
    dp = checkpoint.read_meta(saved)["dp"]
    back = convert(ConvertConfig(source=str(serial), tp=tp, pp=pp, virtual_stages=virtual, dp=dp,
                                 output=str(tmp_path / "back")))  # fmt: skip
    _assert_same_state(saved, back)


@pytest.mark.slow
def test_a_training_checkpoint_converts_to_serial_and_back_bit_for_bit(tmp_path, tp2_pp2):
    _round_trip(tp2_pp2[1], tmp_path)


@pytest.mark.slow
def test_a_converted_training_checkpoint_resumes_the_run(tmp_path, shared_cache, tp2_pp2):
    run_dir, saved = tp2_pp2
    serial = convert(ConvertConfig(source=str(saved), tp=1, output=str(tmp_path / "serial")))
    _train(tmp_path / "resumed", shared_cache, [], str(serial))
    _assert_continues(_losses(tmp_path / "resumed"), _losses(run_dir))


def test_a_serial_training_checkpoint_splits_to_tp2_pp2_and_merges_back_bit_for_bit(tmp_path, shared_cache):
    """The quick subset's check of whole-state conversion (the tp=2 x pp=2 runs above are slow)."""
    _train(tmp_path / "run", shared_cache, ["train.iterations=5"])
    saved = checkpoint.find_latest(tmp_path / "run")
    split = convert(ConvertConfig(source=str(saved), tp=2, pp=2, output=str(tmp_path / "split"), verify=True))
    assert checkpoint.read_meta(split)["world_size"] == 4
    _assert_same_state(saved, convert(ConvertConfig(source=str(split), tp=1, output=str(tmp_path / "back"))))


def test_verify_names_what_a_lossy_conversion_changed(tmp_path, shared_cache, monkeypatch):
    _train(tmp_path / "run", shared_cache, ["train.iterations=3", "checkpoint.interval=3"])
    saved = checkpoint.find_latest(tmp_path / "run")
    exact = reshard.shard_optimizer_state

    def lossy(*args):
        sharded = exact(*args)
        sharded["state"][0]["exp_avg"] += 1e-7  # the first parameter's first moment, nudged on every conversion
        return sharded

    monkeypatch.setattr(reshard, "shard_optimizer_state", lossy)
    with pytest.raises(ConfigError, match=r"differs from .* in 1 place\(s\), e.g. rank 0.optimizer.state.0.exp_avg$"):
        convert(ConvertConfig(source=str(saved), tp=2, output=str(tmp_path / "tp2"), verify=True))


@pytest.mark.slow
def test_tp2_pp2_dp2_round_trips_through_serial_bit_for_bit(tmp_path, shared_cache):
    layout = ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "train.iterations=5"]
    run_on_ranks(8, _train, tmp_path / "run", shared_cache, layout, tp=2, pp=2)
    saved = checkpoint.find_latest(tmp_path / "run")
    assert checkpoint.read_meta(saved)["world_size"] == 8
    _round_trip(saved, tmp_path)


@pytest.mark.slow
def test_a_distributed_optimizer_checkpoint_converts_and_verifies(tmp_path, shared_cache):
    """A dp=2 run's Adam slices are merged on conversion; verify=true compares what the slices mean (every
    parameter's moments, bit for bit) rather than their flat layout, which depends on dp."""
    layout = ["parallel.dp=2", "parallel.distributed_optimizer=true", "train.iterations=5"]
    run_on_ranks(2, _train, tmp_path / "run", shared_cache, layout, tp=1)
    saved = checkpoint.find_latest(tmp_path / "run")
    split = convert(ConvertConfig(source=str(saved), tp=2, output=str(tmp_path / "tp2"), verify=True))
    assert checkpoint.read_meta(split)["world_size"] == 2
    assert state_differences(serial_optimizer_state(saved), serial_optimizer_state(split), "adam") == []
