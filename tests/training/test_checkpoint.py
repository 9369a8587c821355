"""Checkpoint files on the serial grid: atomic saves, exact resume, and clear errors for broken checkpoints."""

import errno
import io
import json
import logging
import os
import shutil
import time
from dataclasses import asdict

import pytest
import torch

from megatron_exp import preflight
from megatron_exp.config import ConfigError
from megatron_exp.data import token_store
from megatron_exp.data.tokenizer import train_bpe
from megatron_exp.models.gpt import GPTModel
from megatron_exp.parallel import state
from megatron_exp.parallel.sharding import shard_specs, split_state_dict
from megatron_exp.train import _newest_matching_checkpoint, _prepare_data, _resolve_init_from, _resolve_resume
from megatron_exp.training import checkpoint, trainer
from megatron_exp.training.checkpoint import CheckpointError
from tests.conftest import compose_config, training_spec
from tests.distributed import run_on_ranks


def make_config(cache, *overrides):
    """A resolved tiny GPT config with its data cache built."""
    cfg = compose_config(
        [
            "model=gpt_tiny",
            "data.seq_len=32",
            "parallel.micro_batch=4",
            "train.iterations=6",
            "train.log_interval=1",
            "train.eval_interval=0",
            "train.eval_iters=1",
            "train.test_iters=1",
            "checkpoint.interval=3",
            "logger.wandb=false",
            f"data.cache_dir={cache}",
            *overrides,
        ]
    )
    cfg = preflight.resolve(cfg, measure_peak=False)
    token_store.prepare(cfg.data)
    return cfg


def build(cfg, run_dir):
    """The training loop of `cfg` on the current grid (serial outside a multi-rank test), writing into `run_dir`."""
    return trainer.build(training_spec(cfg, run_dir), state.current())


def logged_losses(run_dir) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


def train_losses(cfg, run_dir) -> dict[int, float]:
    build(cfg, run_dir).run()
    return logged_losses(run_dir)


def test_a_resumed_run_equals_an_uninterrupted_one_bitwise(tmp_path, shared_cache, trained_run):
    # Dropout on, so the restored RNG streams matter as much as the weights and Adam's moments.
    uninterrupted = logged_losses(trained_run)  # the config below, trained to 6 without a stop
    train_losses(make_config(shared_cache, "train.iterations=3"), tmp_path / "b")
    resumed = make_config(shared_cache)
    resumed.resume = str(checkpoint.find_latest(tmp_path / "b"))
    losses = train_losses(resumed, tmp_path / "b")
    assert [losses[i] for i in (4, 5, 6)] == [uninterrupted[i] for i in (4, 5, 6)]  # exactly equal


def _resume_matches_uninterrupted(tmp_path, cache, *layout):
    uninterrupted = train_losses(make_config(cache, *layout), tmp_path / "a")
    train_losses(make_config(cache, *layout, "train.iterations=3"), tmp_path / "b")
    resumed = make_config(cache, *layout)
    resumed.resume = str(checkpoint.find_latest(tmp_path / "b"))
    losses = train_losses(resumed, tmp_path / "b")
    if state.current().rank == 0:
        assert [losses[i] for i in (4, 5, 6)] == [uninterrupted[i] for i in (4, 5, 6)]  # exactly equal


@pytest.mark.slow
def test_a_pipeline_resumes_bitwise(tmp_path, shared_cache):
    # Dropout on: each stage restores its own RNG streams, weights and moments from its own shard.
    run_on_ranks(2, _resume_matches_uninterrupted, tmp_path, shared_cache, "parallel.pp=2", tp=1, pp=2)
    meta = checkpoint.read_meta(checkpoint.find_latest(tmp_path / "b"))
    assert checkpoint.layout_of(meta) == (1, 2, 1) and meta["world_size"] == 2


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shared_cache):
    """One 6-iteration run with checkpoints at 3 and 6, trained once for the tests that break a copy of it."""
    run_dir = tmp_path_factory.mktemp("trained")
    build(make_config(shared_cache), run_dir).run()
    return run_dir


def _saved_run(tmp_path, cache, trained_run):
    """A copy of `trained_run` in `tmp_path`, with its config and checkpoints directory."""
    shutil.copytree(trained_run, tmp_path, dirs_exist_ok=True)
    return make_config(cache), checkpoint.checkpoints_root(tmp_path)


def test_saves_keep_the_newest_k_and_point_latest_at_the_last(tmp_path, shared_cache, trained_run):
    _, root = _saved_run(tmp_path, shared_cache, trained_run)
    assert [d.name for d in checkpoint.complete_checkpoints(root)] == ["iter_0000003", "iter_0000006"]
    assert (root / "latest").read_text() == "iter_0000006"
    meta = checkpoint.read_meta(root / "iter_0000006")
    assert meta["iteration"] == 6 and meta["world_size"] == 1 and meta["model"]["name"] == "gpt_tiny"
    saved = checkpoint.load_rank(root / "iter_0000006", 0)
    assert set(saved) == {"iteration", "model", "optimizer", "loss_scaler", "rng"}


def test_a_crash_in_the_middle_of_a_save_leaves_the_previous_checkpoint(
    tmp_path, shared_cache, trained_run, monkeypatch, caplog
):
    _, root = _saved_run(tmp_path, shared_cache, trained_run)

    def crash(src, dst):
        raise KeyboardInterrupt  # killed after the shards were written, before the rename

    monkeypatch.setattr(checkpoint.os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 9, {"x": torch.zeros(1)}, rank=0, meta={"world_size": 1}, keep=3)
    monkeypatch.undo()
    assert (root / ".tmp_iter_0000009").is_dir()
    with caplog.at_level(logging.WARNING):
        latest = checkpoint.find_latest(tmp_path)
    assert latest == root / "iter_0000006" and "left half-written by an interrupted save" in caplog.text
    assert checkpoint.load_rank(latest, 0)["iteration"] == 6


def test_latest_naming_an_incomplete_checkpoint_falls_back(tmp_path, shared_cache, trained_run, caplog):
    _, root = _saved_run(tmp_path, shared_cache, trained_run)
    os.remove(root / "iter_0000006" / "rank_00000.pt")
    with caplog.at_level(logging.WARNING):
        assert checkpoint.find_latest(tmp_path) == root / "iter_0000003"
    assert "which is incomplete" in caplog.text


def test_a_corrupt_shard_is_an_error_naming_the_file(tmp_path, shared_cache, trained_run):
    cfg, root = _saved_run(tmp_path, shared_cache, trained_run)
    shard = root / "iter_0000006" / "rank_00000.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    cfg.resume = str(root / "iter_0000006")
    with pytest.raises(CheckpointError, match=r"rank_00000.pt cannot be read .* corrupt"):
        build(cfg, tmp_path)


def test_a_checkpoint_of_another_shape_is_an_error_naming_the_file(tmp_path, shared_cache, trained_run):
    _, root = _saved_run(tmp_path, shared_cache, trained_run)
    other = make_config(shared_cache, "model.hidden=128")
    other.resume = str(root / "iter_0000006")
    with pytest.raises(CheckpointError, match=r"rank_00000.pt: its model does not fit this run .*size mismatch"):
        build(other, tmp_path)


def test_init_from_loads_weights_saved_at_another_tp_degree(tmp_path, shared_cache):
    cfg = make_config(shared_cache, "train.iterations=1")
    source = GPTModel(cfg.model, seed=99)
    shards = split_state_dict(source.state_dict(), shard_specs(source), 2)
    meta = {"tp": 2, "dp": 1, "model": asdict(cfg.model)}
    checkpoint.save_all(tmp_path / "weights", 0, [{"iteration": 0, "model": s} for s in shards], meta)

    cfg.checkpoint.init_from = str(tmp_path / "weights")
    cfg.checkpoint.init_from = _resolve_init_from(cfg)
    assert cfg.checkpoint.init_from == str(checkpoint.resolve(tmp_path / "weights"))
    loaded = build(cfg, tmp_path / "run").model.state_dict()
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded[name], tensor), name

    other = make_config(shared_cache, "model.layers=3")
    other.checkpoint.init_from = str(tmp_path / "weights")
    with pytest.raises(
        ConfigError, match=r"checkpoint.init_from=.*the model differs: model.layers=3 \(checkpoint: 2\)"
    ):
        _resolve_init_from(other)


def test_naming_a_checkpoint_with_a_missing_shard_is_an_error_naming_the_file(tmp_path, shared_cache, trained_run):
    cfg, root = _saved_run(tmp_path, shared_cache, trained_run)
    os.remove(root / "iter_0000006" / "rank_00000.pt")
    cfg.resume = str(root / "iter_0000006")
    with pytest.raises(ConfigError, match=r"resume=.*iter_0000006: .*rank_00000.pt is missing: the checkpoint"):
        _resolve_resume(cfg, str(tmp_path / "new"))


def test_an_unreadable_meta_json_is_one_line_for_resume_and_init_from(tmp_path, shared_cache, trained_run):
    cfg, root = _saved_run(tmp_path, shared_cache, trained_run)
    (root / "iter_0000006" / "meta.json").write_text('{"iteration": 6, "world')
    cfg.resume = str(root / "iter_0000006")
    with pytest.raises(ConfigError, match=r"^resume=.*meta.json cannot be read \(JSONDecodeError") as failure:
        _resolve_resume(cfg, str(tmp_path / "new"))
    assert "\n" not in str(failure.value)
    cfg.resume, cfg.checkpoint.init_from = None, str(root / "iter_0000006")
    with pytest.raises(ConfigError, match=r"^checkpoint.init_from=.*meta.json cannot be read"):
        _resolve_init_from(cfg)
    assert checkpoint.find_latest(tmp_path) == root / "iter_0000003"  # a run's newest readable one is still found


def test_a_full_disk_is_named_as_such_and_the_previous_checkpoint_is_kept(
    tmp_path, shared_cache, trained_run, monkeypatch
):
    _, root = _saved_run(tmp_path, shared_cache, trained_run)

    class FullDisk(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "open", lambda *args, **kwargs: FullDisk(), raising=False)
    with pytest.raises(CheckpointError, match=r"^no space left on device writing .*rank_00000.pt: the previous"):
        checkpoint.save(tmp_path, 9, {"x": torch.zeros(100)}, rank=0, meta={"world_size": 1, "model": {}}, keep=3)
    monkeypatch.undo()
    assert checkpoint.find_latest(tmp_path) == root / "iter_0000006"


def test_a_resume_with_another_tokenizer_is_refused_in_one_line(tmp_path, shared_cache):
    """The model's vocab_size can match while the tokenizer does not (trained on other text): the token ids would
    mean other strings, so the resume stops before any worker."""
    cfg = make_config(shared_cache)
    cfg.resume = "outputs/the-run"
    _prepare_data(cfg, str(tmp_path))  # keeps the data's tokenizer with the run, as the first start does
    _prepare_data(cfg, str(tmp_path))  # the same tokenizer: resumes
    train_bpe(["another corpus, with other words and other merges"] * 20, 300).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(
        ConfigError,
        match=r"^resume=outputs/the-run: the data's tokenizer is not the run's \(.*"
        r"tokenizer.json: \d+ vocabulary entries differ or move\): resume with the run's data",
    ) as e:
        _prepare_data(cfg, str(tmp_path))
    assert "\n" not in str(e.value)


def test_resuming_a_finished_run_says_how_to_continue(tmp_path, shared_cache, trained_run):
    cfg, root = _saved_run(tmp_path, shared_cache, trained_run)  # trained to train.iterations=6
    cfg.resume = str(tmp_path)
    with pytest.raises(ConfigError, match=r"is at iteration 6, already train.iterations=6: .*raise train.iterations"):
        _resolve_resume(cfg, str(tmp_path / "new"))
    cfg.train.iterations = 12
    assert _resolve_resume(cfg, str(tmp_path / "new")) == (str(root / "iter_0000006"), str(tmp_path.resolve()))


def test_resume_true_picks_the_newest_run_of_this_model_and_layout(tmp_path, shared_cache, caplog):
    outputs = tmp_path / "outputs"
    ours = make_config(shared_cache, "train.iterations=12")
    for name, hidden in (("older", 64), ("newer", 128)):  # the newer run is of another model
        cfg = make_config(shared_cache, f"model.hidden={hidden}")
        meta = {"tp": 1, "dp": 1, "model": asdict(cfg.model)}
        checkpoint.save_all(outputs / name, 4, [{"iteration": 4, "model": {}}], meta)
        time.sleep(0.05)  # distinct modification times
    with caplog.at_level(logging.INFO):
        picked = _newest_matching_checkpoint(ours, outputs)
    assert picked == outputs / "older" / "checkpoints" / "iter_0000004" and "continuing" in caplog.text
    other = make_config(shared_cache, "model.layers=5")
    with pytest.raises(ConfigError, match=r"no run .* of this model and layout; the newest, .*newer, has model.hidden"):
        _newest_matching_checkpoint(other, outputs)
