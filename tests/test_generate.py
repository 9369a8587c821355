"""`python -m megatron_exp.generate`: bad input refused before any worker, the command end to end at TP=2 and at
PP=2, and a converted transformers GPT-2 generating what transformers generates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_exp.config import ConfigError, ConvertConfig, GenerateConfig, ModelConfig, ParallelConfig
from megatron_exp.convert import convert
from megatron_exp.data.tokenizer import train_bpe
from megatron_exp.generate import prepare
from megatron_exp.models import build_model
from megatron_exp.models.generation import generate, pad
from megatron_exp.parallel import state
from megatron_exp.tasks import common
from megatron_exp.training import checkpoint
from tests.distributed import run_on_ranks
from tests.tasks.test_entry_points import PASSAGES

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(name="small", hidden=64, heads=8, layers=2, vocab_size=300, seq_len=32, init_std=0.5)
PROMPTS = ["The ship sailed", "She opened the door and saw"]


def _save(run_dir: Path, cfg: ModelConfig) -> None:
    model = build_model(cfg, seed=4)
    meta = {"tp": 1, "dp": 1, "model": vars(cfg)}
    checkpoint.save_all(run_dir, 0, [{"iteration": 0, "model": model.state_dict()}], meta)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A GPT run directory as training leaves it: a checkpoint and its tokenizer.json."""
    run_dir = tmp_path_factory.mktemp("run")
    _save(run_dir, CFG)
    train_bpe(PASSAGES * 20, CFG.vocab_size).save(str(run_dir / "tokenizer.json"))
    return run_dir


def _prepare(tmp_path: Path, **options):
    return prepare(GenerateConfig(**options), str(tmp_path / "generate"), False)


def test_the_prompts_are_encoded_with_the_checkpoints_tokenizer(tmp_path, run_dir):
    spec = _prepare(tmp_path, checkpoint=str(run_dir), prompt=PROMPTS, max_new_tokens=8, parallel=ParallelConfig(tp=2))
    tokenizer = common.load_tokenizer(spec.config, checkpoint.resolve(run_dir), CFG)
    assert spec.inputs["prompts"] == [tokenizer.encode(text).ids for text in PROMPTS]
    assert spec.workers == 2 and spec.config.parallel.dp == 1
    pipelined = _prepare(tmp_path, checkpoint=str(run_dir), prompt="The", max_new_tokens=8,
                         parallel=ParallelConfig(tp=2, pp=2))  # fmt: skip
    assert pipelined.workers == 4
    assert spec.inputs["stop"] == tokenizer.token_to_id("<|endoftext|>")
    one = _prepare(tmp_path, checkpoint=str(run_dir), prompt=PROMPTS[0], max_new_tokens=8, stop_at_eod=False)
    assert one.inputs["texts"] == PROMPTS[:1] and one.inputs["stop"] is None


def test_bad_input_is_one_line_naming_the_key(tmp_path, run_dir):
    _save(tmp_path / "bert", ModelConfig(arch="bert", hidden=32, heads=4, layers=1, vocab_size=300, seq_len=16))
    long = " ".join(PASSAGES * 4)
    cases = [
        ({"checkpoint": str(tmp_path / "none")}, r"checkpoint=.*none holds no complete checkpoint"),
        ({"checkpoint": str(tmp_path / "bert")}, r"holds a bert model: it does not generate text"),
        ({"prompt": ["fine", long]}, r"^prompt 2 is \d+ tokens, longer than the model's 32 positions - max_new_toke"),
        ({"max_new_tokens": 32}, r"^max_new_tokens=32 leaves no room for a prompt in the model's 32 positions"),
        ({"prompt": ""}, r"^prompt 1 is empty"),
        ({"prompt": []}, r"^prompt=\[\] holds no text"),
        ({"parallel": ParallelConfig(pp=3)}, r"^model.layers=2 is not divisible by parallel.pp x parallel.virtual"),
        ({"parallel": ParallelConfig(tp=3)}, r"^model.heads=8 is not divisible by parallel.tp=3"),
        (
            {"parallel": ParallelConfig(tp=2, sequence_parallel=True)},
            r"^parallel.sequence_parallel=true saves activation memory in training only.*: leave it false$",
        ),
        ({"top_p": 1.5}, r"^top_p=1.5 must be in \(0, 1\]"),
        ({"top_p": 0.0}, r"^top_p=0.0 must be > 0"),
        ({"temperature": -1.0}, r"^temperature=-1.0 must be >= 0"),
    ]
    for options, message in cases:
        options = {"checkpoint": str(run_dir), "prompt": "The", "max_new_tokens": 8, **options}
        with pytest.raises(ConfigError, match=message):
            _prepare(tmp_path, **options)


def _command(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_exp.generate", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_missing_checkpoint_exits_2_with_one_line(tmp_path):
    done = _command(tmp_path / "out", f"checkpoint={tmp_path / 'nothing'}", "prompt=Hello")
    assert done.returncode == 2
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "error:" in line]
    assert len(errors) == 1 and "holds no complete checkpoint" in errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)])
def test_the_command_prints_and_saves_the_greedy_continuations(tmp_path, run_dir, tp, pp):
    prompts = json.dumps(PROMPTS)
    done = _command(tmp_path / "out", f"checkpoint={run_dir}", f"prompt={prompts}", "max_new_tokens=10",
                    f"parallel.tp={tp}", f"parallel.pp={pp}")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (results["tp"], results["pp"]) == (tp, pp) and results["temperature"] == 0.0
    assert len(results["samples"]) == 2

    tokenizer = common.load_tokenizer(GenerateConfig(checkpoint=str(run_dir)), checkpoint.resolve(run_dir), CFG)
    model = common.load_model(checkpoint.resolve(run_dir), state.SERIAL, torch.device("cpu"))
    new = generate(model, *pad([tokenizer.encode(text).ids for text in PROMPTS]), 10)
    for sample, text, tokens in zip(results["samples"], PROMPTS, new, strict=True):
        assert sample["prompt"] == text and sample["completion"] == tokenizer.decode(tokens)
        assert f"{text}{sample['completion']}" in done.stdout + done.stderr  # printed


def _check_converted_generates(directory: Path, prompts: list[list[int]], expected: list[list[int]]):
    torch.set_default_dtype(torch.float64)
    model = common.load_model(directory, state.current(), torch.device("cpu"))
    assert generate(model, *pad(prompts), len(expected[0])) == expected


def test_a_converted_transformers_gpt2_generates_the_greedy_tokens_of_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=32,
                                        initializer_range=0.5, bos_token_id=None, eos_token_id=None)  # fmt: skip
    original = transformers.GPT2LMHeadModel(hf_config).eval()
    original.save_pretrained(tmp_path / "hf")
    prompts = [[5, 7, 9], [1, 2, 3, 4, 5, 6], [42]]
    tokens, real = pad(prompts, "left")
    out = original.double().generate(input_ids=tokens, attention_mask=real.long(), max_new_tokens=16,
                                     do_sample=False, pad_token_id=0)  # fmt: skip
    expected = out[:, tokens.shape[1] :].tolist()
    assert all(len(set(row)) > 3 for row in expected)  # a continuation that varies

    directory = convert(ConvertConfig(source=str(tmp_path / "hf"), tp=1, output=str(tmp_path / "ours")))
    model = common.load_model(directory, state.SERIAL, torch.device("cpu")).double()
    assert generate(model, tokens, real, 16) == expected
    run_on_ranks(2, _check_converted_generates, directory, prompts, expected)  # and at TP=2
