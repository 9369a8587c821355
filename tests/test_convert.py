"""Resharding between TP degrees and GPT-2 import/export: logits agree to fp32 rounding through every path."""

import contextlib
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_exp.config import ConfigError, ConvertConfig, EvalConfig, ModelConfig
from megatron_exp.convert import convert
from megatron_exp.data.tokenizer import train_bpe
from megatron_exp.models.contract import Batch
from megatron_exp.models.gpt import GPTModel
from megatron_exp.parallel import state
from megatron_exp.parallel.mappings import gather_last_dim
from megatron_exp.parallel.pipeline import PipelineLayout
from megatron_exp.parallel.sharding import shard_specs, split_state_dict
from megatron_exp.tasks import common
from megatron_exp.training import checkpoint
from megatron_exp.training.schedule import Pipeline
from tests.distributed import run_on_ranks
from tests.tasks.test_entry_points import PASSAGES, evaluate

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(name="small", hidden=64, heads=8, layers=2, vocab_size=300, seq_len=32)
TOKENS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits_at(directory: Path) -> torch.Tensor:
    """Full-vocabulary logits of the checkpoint's model at the current grid's TP degree, on the same batch."""
    grid = state.current()
    tp = grid.tp
    model = GPTModel(checkpoint.model_config_of(directory)).eval()
    model.load_state_dict(checkpoint.load_model_state(directory, model, grid))
    with torch.no_grad():
        return gather_last_dim(model(TOKENS), tp)[..., : model.cfg.vocab_size]


def _check_logits(directories: list[Path], expected_file: Path):
    expected = torch.load(expected_file)
    for directory in directories:
        torch.testing.assert_close(_logits_at(directory), expected, msg=str(directory))


@pytest.mark.slow
def test_reshard_tp4_to_1_to_2_keeps_the_logits(tmp_path):
    serial = GPTModel(CFG, seed=3)
    shards = split_state_dict(serial.state_dict(), shard_specs(serial), 4)
    meta = {"tp": 4, "dp": 1, "model": vars(CFG)}
    checkpoint.save_all(tmp_path / "tp4", 0, [{"iteration": 0, "model": s} for s in shards], meta)
    convert(ConvertConfig(source=str(tmp_path / "tp4"), tp=1, output=str(tmp_path / "tp1")))
    convert(ConvertConfig(source=str(tmp_path / "tp1" / "checkpoints"), tp=2, output=str(tmp_path / "tp2")))
    assert checkpoint.read_meta(checkpoint.find_latest(tmp_path / "tp2"))["tp"] == 2

    expected = tmp_path / "expected.pt"
    with torch.no_grad():
        torch.save(serial.eval()(TOKENS)[..., :300], expected)
    saved = [checkpoint.resolve(tmp_path / d) for d in ("tp1", "tp2", "tp4")]
    _check_logits(saved, expected)  # each loaded at TP=1
    for tp in (2, 4):
        run_on_ranks(tp, _check_logits, saved, expected)  # and at TP=2 and TP=4, from any saved degree


def _check_pipelined_logits(directory: Path, expected_file: Path):
    """The checkpoint at this grid's TP x PP layout: the last stage's logits of the pipelined forward."""
    grid = state.current()
    cfg = checkpoint.model_config_of(directory)
    layout = PipelineLayout(grid.pp.size, 1, cfg.layers)
    model = GPTModel(cfg, part=layout.part(grid.pp.rank)).eval()
    model.load_state_dict(checkpoint.load_model_state(directory, model, grid))
    logits = Pipeline(model, grid, layout, "1f1b", contextlib.nullcontext).outputs(Batch({"tokens": TOKENS}, {}))
    if grid.pp.rank == grid.pp.size - 1:
        torch.testing.assert_close(gather_last_dim(logits, grid.tp)[..., : cfg.vocab_size], torch.load(expected_file))


def test_pipeline_layouts_convert_both_ways_and_keep_the_logits(tmp_path):
    cfg = dataclasses.replace(CFG, layers=4)
    serial = GPTModel(cfg, seed=3)
    meta = {"tp": 1, "dp": 1, "model": vars(cfg)}
    checkpoint.save_all(tmp_path / "tp1", 0, [{"iteration": 0, "model": serial.state_dict()}], meta)
    convert(ConvertConfig(source=str(tmp_path / "tp1"), tp=2, pp=2, output=str(tmp_path / "tp2pp2")))
    staged = checkpoint.find_latest(tmp_path / "tp2pp2")
    assert checkpoint.layout_of(checkpoint.read_meta(staged)) == (2, 2, 1)
    stage_keys = [set(checkpoint.load_rank(staged, rank)["model"]) for rank in (0, 2)]  # TP rank 0 of each stage
    assert {"embedding.weight", "position_embedding", "layers.1.mlp.fc1.weight"} <= stage_keys[0]
    assert {"embedding.weight", "final_norm.weight", "layers.2.mlp.fc1.weight"} <= stage_keys[1]  # tied copy
    assert not stage_keys[0] & {"layers.2.mlp.fc1.weight", "final_norm.weight"}
    convert(ConvertConfig(source=str(staged), tp=1, output=str(tmp_path / "back")))
    back = checkpoint.load_rank(checkpoint.find_latest(tmp_path / "back"), 0)["model"]
    for name, tensor in serial.state_dict().items():
        assert torch.equal(back[name], tensor), name
    convert(ConvertConfig(source=str(staged), tp=1, pp=4, output=str(tmp_path / "pp4")))
    pp4 = checkpoint.find_latest(tmp_path / "pp4")
    assert checkpoint.layout_of(checkpoint.read_meta(pp4)) == (1, 4, 1)

    expected = tmp_path / "expected.pt"
    with torch.no_grad():
        torch.save(serial.eval()(TOKENS)[..., :300], expected)
    run_on_ranks(4, _check_pipelined_logits, pp4, expected, pp=4)  # (tp2, pp2) -> (tp1, pp4), run at pp=4
    _check_logits([pp4, checkpoint.find_latest(tmp_path / "back")], expected)  # merged to serial on load
    with pytest.raises(ConfigError, match=r"pp x virtual_stages = 3 x 1 does not divide the model's 4 layers"):
        convert(ConvertConfig(source=str(staged), pp=3, output=str(tmp_path / "bad")))


def test_converting_a_run_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"holds no complete checkpoint .* or source=hf:<hub name> for a hub model$"):
        convert(ConvertConfig(source=str(tmp_path), tp=2, output=str(tmp_path / "out")))


def test_hugging_face_gpt2_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=32)
    original = transformers.GPT2LMHeadModel(hf_config).eval()
    original.save_pretrained(tmp_path / "hf")
    expected = tmp_path / "expected.pt"
    with torch.no_grad():
        torch.save(original(TOKENS).logits, expected)

    convert(ConvertConfig(source=f"hf:{tmp_path / 'hf'}", tp=2, output=str(tmp_path / "ours")))
    ours = checkpoint.find_latest(tmp_path / "ours")
    run_on_ranks(2, _check_logits, [ours], expected)  # the transformers model's logits, at TP=2

    convert(ConvertConfig(source=str(tmp_path / "ours"), to="hf", output=str(tmp_path / "back")))
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").state_dict()
    for name, tensor in original.state_dict().items():
        assert torch.equal(back[name], tensor), name


def test_the_entry_point_reshards(tmp_path):
    serial = GPTModel(CFG, seed=1)
    meta = {"tp": 1, "dp": 1, "model": vars(CFG)}
    checkpoint.save_all(tmp_path / "run", 0, [{"iteration": 0, "model": serial.state_dict()}], meta)
    command = [sys.executable, "-m", "megatron_exp.convert", f"source={tmp_path / 'run'}", "tp=2"]
    done = subprocess.run([*command, f"output={tmp_path / 'tp2'}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    directory = checkpoint.find_latest(tmp_path / "tp2")
    assert checkpoint.read_meta(directory)["world_size"] == 2
    assert checkpoint.load_rank(directory, 1)["model"]["embedding.weight"].shape == (256, 64)


def test_a_hugging_face_directory_needs_no_hf_prefix(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    hf_config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=32)
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(tmp_path / "hf")
    convert(ConvertConfig(source=str(tmp_path / "hf"), tp=2, output=str(tmp_path / "ours")))
    assert checkpoint.read_meta(checkpoint.find_latest(tmp_path / "ours"))["source"] == str(tmp_path / "hf")


def _run_with_its_tokenizer(run_dir: Path):
    """A run directory as training leaves it: a checkpoint and the tokenizer.json it trained with."""
    serial = GPTModel(CFG, seed=4)
    meta = {"tp": 1, "dp": 1, "model": vars(CFG)}
    checkpoint.save_all(run_dir, 0, [{"iteration": 0, "model": serial.state_dict()}], meta)
    tokenizer = train_bpe(PASSAGES * 20, CFG.vocab_size)
    tokenizer.save(str(run_dir / "tokenizer.json"))
    return tokenizer


@pytest.mark.slow
def test_the_tokenizer_travels_and_converted_weights_evaluate_without_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    tokenizer = _run_with_its_tokenizer(tmp_path / "run")
    ids = tokenizer.encode(PASSAGES[0]).ids

    resharded = convert(ConvertConfig(source=str(tmp_path / "run"), tp=2, output=str(tmp_path / "tp2")))
    found = common.load_tokenizer(EvalConfig(checkpoint=str(tmp_path / "tp2")), resharded, CFG)
    assert found.encode(PASSAGES[0]).ids == ids

    convert(ConvertConfig(source=str(tmp_path / "run"), to="hf", output=str(tmp_path / "hf")))
    fast = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "hf")  # as a transformers user loads it
    assert fast(PASSAGES[0])["input_ids"] == ids and len(fast) == tokenizer.get_vocab_size()

    convert(ConvertConfig(source=str(tmp_path / "hf"), tp=2, output=str(tmp_path / "back")))  # and back
    source = tmp_path / "lambada.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in PASSAGES))
    done = evaluate("lambada", tmp_path / "eval", f"checkpoint={tmp_path / 'back'}", f"task.source={source}",
                    "logger=none")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr  # no tokenizer=: the one that travelled is found
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["examples"] == len(PASSAGES)


def test_a_corrupt_shard_is_one_line_and_exit_2(tmp_path):
    serial = GPTModel(CFG, seed=1)
    shards = split_state_dict(serial.state_dict(), shard_specs(serial), 2)
    meta = {"tp": 2, "dp": 1, "model": vars(CFG)}
    directory = checkpoint.save_all(tmp_path / "run", 0, [{"iteration": 0, "model": s} for s in shards], meta)
    shard = checkpoint.rank_file(directory, 1)
    shard.write_bytes(shard.read_bytes()[:1000])  # cut short, as a full disk leaves it
    command = [sys.executable, "-m", "megatron_exp.convert", f"source={tmp_path / 'run'}", "tp=1"]
    done = subprocess.run([*command, f"output={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    output = (done.stdout + done.stderr).strip().splitlines()
    assert len(output) == 1 and "error:" in output[0] and str(shard) in output[0] and "corrupt" in output[0], output
