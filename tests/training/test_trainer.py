"""The trainer in this process on the serial grid: accumulation, precision and failure paths, fast."""

import functools
import json
import logging
from dataclasses import asdict

import pytest
import torch

from megatron_exp import preflight
from megatron_exp.data import token_store
from megatron_exp.data.tokenizer import train_bpe
from megatron_exp.models import build_model
from megatron_exp.parallel import state
from megatron_exp.parallel.pipeline import PipelineLayout
from megatron_exp.training import flops, loop, trainer
from megatron_exp.training.loop import TrainingDiverged, TrainingLoop
from megatron_exp.training.metrics import wandb_settings
from megatron_exp.training.optim import DynamicLossScaler
from tests.conftest import compose_config, training_spec
from tests.distributed import run_on_ranks


def _trainer(tmp_path, cache: str, *overrides: str) -> TrainingLoop:
    cfg = compose_config(
        [
            "model=gpt_tiny",
            "model.hidden_dropout=0",
            "model.attention_dropout=0",
            "data.seq_len=32",
            "parallel.micro_batch=4",
            "train.iterations=4",
            "train.log_interval=1",
            "train.eval_interval=0",
            "train.eval_iters=2",
            "train.test_iters=2",
            "logger.wandb=false",
            f"data.cache_dir={cache}",
            *overrides,
        ]
    )
    cfg = preflight.resolve(cfg, measure_peak=False)
    preflight.validate(cfg)
    token_store.prepare(cfg.data)
    return trainer.build(training_spec(cfg, tmp_path), state.SERIAL)


def run(tmp_path, cache: str, *overrides: str) -> tuple[list[dict], dict]:
    final = _trainer(tmp_path, cache, *overrides).run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "train/loss" in r], final


def _losses(records):
    return [r["train/loss"] for r in records]


def test_gradient_accumulation_equals_one_larger_micro_batch(tmp_path, shared_cache):
    accumulated, final_a = run(tmp_path / "a", shared_cache, "parallel.micro_batch=2", "parallel.global_batch=8")
    single, final_b = run(tmp_path / "b", shared_cache, "parallel.micro_batch=8", "parallel.global_batch=8")
    assert _losses(accumulated) == pytest.approx(_losses(single), rel=1e-5)
    assert final_a["test/loss"] == pytest.approx(final_b["test/loss"], rel=1e-5)
    assert _losses(single)[-1] < _losses(single)[0]
    assert [r["tokens_seen"] for r in single] == [iteration * 8 * 32 for iteration in (1, 2, 3, 4)]  # batch x seq


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_trains_the_same_model(tmp_path, shared_cache, mode):
    plain, _ = run(tmp_path / "a", shared_cache)
    recomputed, _ = run(tmp_path / "b", shared_cache, f"parallel.recompute={mode}", "hardware.peak_tflops=1")
    assert _losses(recomputed) == pytest.approx(_losses(plain), rel=1e-6)
    # HFU counts the recomputed forward (of the layers, or of the attention core), never of the logits.
    b, s, l, h, v = 4, 32, 2, 64, 8192
    ratio = flops.hardware_flops(b, s, l, h, v, recompute=mode) / flops.model_flops(b, s, l, h, v)
    assert 1 < ratio < 4 / 3
    assert recomputed[0]["perf/hfu"] == pytest.approx(recomputed[0]["perf/mfu"] * ratio, rel=1e-9)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_paths_run(tmp_path, shared_cache, precision):
    records, final = run(tmp_path, shared_cache, f"hardware.precision={precision}", "train.iterations=2")
    assert all(0 < loss < 20 for loss in _losses(records)) and final["test/loss"] > 0
    if precision == "fp16":
        assert records[-1]["train/loss_scale"] == 2.0**16  # dynamic loss scaling, no overflow at this size
    else:
        assert "train/loss_scale" not in records[-1]


def test_fp16_overflow_skips_the_step_and_halves_the_scale_until_steps_fit(tmp_path, shared_cache, monkeypatch):
    start = 2.0**30  # far too large: the fp16 gradients overflow until the scale has come down
    monkeypatch.setattr(loop, "DynamicLossScaler", functools.partial(DynamicLossScaler, initial_scale=start))
    records, _ = run(tmp_path, shared_cache, "hardware.precision=fp16", "train.iterations=20")
    skipped = [r["train/skipped_steps"] for r in records]
    assert skipped[:5] == [1] * 5 and skipped[-1] == 0 and set(skipped) == {0, 1}
    assert [r["train/loss_scale"] for r in records] == [start / 2 ** sum(skipped[: i + 1]) for i in range(20)]
    assert all(r["train/grad_norm"] == 0 for r, s in zip(records, skipped, strict=True) if s)  # no step, no norm
    assert all(0 < r["train/grad_norm"] < 100 for r, s in zip(records, skipped, strict=True) if not s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_gpu_training_step_never_waits_for_the_device(tmp_path, shared_cache, precision):
    training = _trainer(tmp_path, shared_cache, f"hardware.precision={precision}")
    training.step(1)  # the first step creates the optimizer's state
    torch.cuda.set_sync_debug_mode("error")  # raises at any call that waits for the GPU
    try:
        training.step(2)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_non_finite_loss_stops_the_run_with_advice(tmp_path, shared_cache):
    # The first step is taken from finite weights; the second loss is computed from the exploded ones.
    with pytest.raises(TrainingDiverged, match=r"loss became nan within iterations 2-2: lower optimizer.lr"):
        run(tmp_path, shared_cache, "optimizer.lr=1e20", "optimizer.warmup_iters=0", "optimizer.clip_grad=0")


def test_the_wandb_run_id_is_kept_in_the_run_directory_across_resumes(tmp_path, shared_cache):
    cfg = compose_config(["logger.mode=offline"])
    first, again = (wandb_settings(cfg.logger, str(tmp_path), asdict(cfg), gpu=False) for _ in range(2))
    assert first["id"] == again["id"] == (tmp_path / "wandb_id").read_text()
    assert first["resume"] == "allow" and first["mode"] == "offline" and first["dir"] == str(tmp_path)
    assert first["config"]["model"]["name"] == "gpt_mini"  # the full resolved config
    assert wandb_settings(compose_config(["logger=none"]).logger, str(tmp_path), {}, gpu=False) is None


def test_a_gpt_run_ends_with_a_seeded_sample_and_a_bert_run_without(tmp_path, caplog, one_thread):
    train_bpe(["The cat sat on the mat. The dog sat on the log."] * 20, 300).save(str(tmp_path / "tokenizer.json"))
    caplog.set_level(logging.INFO, logger=trainer.log.name)
    for preset in ("gpt_tiny", "bert_tiny", "gpt_tiny"):  # the GPT twice: the seeded sample repeats
        cfg = preflight.resolve(compose_config([f"model={preset}", "model.vocab_size=300"]), measure_peak=False)
        model = build_model(cfg.model)
        trainer.log_sample(training_spec(cfg, tmp_path), model, state.SERIAL)
        assert model.training  # left as it was
    first, again = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sample (")]  # GPT's only
    head = "sample (temperature 0.7, top-k 40, top-p 0.9, seed 1234): 'In the beginning"
    assert first.startswith(head) and len(first) > len(head) + 1 and again == first, first


def _check_pipelined_sample_is_the_serial_one(spec):
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    trainer.log.addHandler(handler)
    trainer.log.setLevel(logging.INFO)
    layout = PipelineLayout(spec.config.parallel.pp, 1, spec.config.model.layers)
    grid = state.current()
    trainer.log_sample(spec, build_model(spec.config.model, part=layout.part(grid.pp.rank)), grid)
    if grid.rank == 0:  # rank 0 prints the sample; the same model on one process prints the same
        with state.use(state.SERIAL):
            trainer.log_sample(spec, build_model(spec.config.model), state.SERIAL)
        pipelined, serial = messages
        assert pipelined == serial and serial.startswith("sample (") and len(serial) > 80
    else:
        assert not messages


def test_a_pipelined_gpt_run_ends_with_the_sample_of_its_model(tmp_path, one_thread):
    train_bpe(["The cat sat on the mat. The dog sat on the log."] * 20, 300).save(str(tmp_path / "tokenizer.json"))
    overrides = ["model=gpt_tiny", "model.vocab_size=300", "model.init_std=1.0", "parallel.pp=2"]
    cfg = preflight.resolve(compose_config(overrides), measure_peak=False)
    run_on_ranks(2, _check_pipelined_sample_is_the_serial_one, training_spec(cfg, tmp_path), pp=2)
