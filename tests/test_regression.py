"""Behaviour pinned across refactors: fixed-seed CPU runs of GPT (tp=2), BERT and RACE fine-tuning, end to end,
must log the per-iteration losses recorded in regression_losses.json (dropout on, so the RNG streams count too).

On the machine kind the numbers were recorded on (same CPU model, torch build and core count) the comparison is
bitwise; elsewhere matmul kernels may round differently, so it falls back to a relative 1e-6. Re-record only for
a deliberate change of behaviour: `python -m tests.test_regression record`.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.tasks.test_entry_points import evaluate
from tests.tasks.test_race import _learnable_race
from tests.test_train import records, train

RECORDED = Path(__file__).with_name("regression_losses.json")
PINNED_DATA = ["data=python_docs", "data.source=builtin:python_docs"]  # the recorded corpus, whatever the default
COMMON = [*PINNED_DATA, "train.log_interval=1", "train.eval_interval=3", "train.eval_iters=2", "train.test_iters=1"]
COMMON += ["logger.wandb=false"]
GPT = ["model=gpt_tiny", "data.seq_len=32", "parallel.tp=2", "parallel.micro_batch=2", "parallel.global_batch=4"]
BERT = ["model=bert_tiny", "data.seq_len=64", "model.seq_len=64", "parallel.micro_batch=4", "optimizer.lr=2e-3"]


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability()}  # fmt: skip


def _bert_vocab(path: Path) -> Path:
    """A WordPiece vocabulary built deterministically from the pinned corpus (training one with `tokenizers` is
    not deterministic: ties between merges fall to hash order)."""
    from pydoc_data.topics import topics

    from tokenizers.normalizers import BertNormalizer

    text = BertNormalizer(lowercase=True).normalize_str(" ".join(topics[name] for name in sorted(topics)))
    counts: dict[str, int] = {}
    for word in re.findall(r"[a-z]+", text):
        counts[word] = counts.get(word, 0) + 1
    chars = sorted({c for c in text if not c.isspace()})
    words = sorted(counts, key=lambda w: (-counts[w], w))[:3000]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    path.write_text("\n".join(dict.fromkeys([*specials, *chars, *(f"##{c}" for c in chars), *words])) + "\n")
    return path


def _losses(run_dir: Path, key: str) -> list[float]:
    return [r[key] for r in records(run_dir) if key in r]


def measure(root: Path, cache: str) -> dict[str, list[float]]:
    """Run the three pinned jobs under `root`; their logged losses by name."""
    root.mkdir(parents=True, exist_ok=True)
    gpt = root / "gpt"
    done = train(gpt, *GPT, *COMMON, "train.iterations=6", cache=cache)
    assert done.returncode == 0, done.stdout + done.stderr
    bert = root / "bert"
    vocab = _bert_vocab(root / "vocab.txt")
    done = train(bert, *BERT, *COMMON, "train.iterations=6", f"data.tokenizer.vocab_file={vocab}", cache=cache)
    assert done.returncode == 0, done.stdout + done.stderr
    race_data = root / "race-data"
    _learnable_race(race_data, {"train": 16, "dev": 8, "test": 8}, ["alpha", "beta"], ["one", "two", "three", "four"])
    race = root / "race"
    done = evaluate("race", race, f"checkpoint={bert}", f"task.source={race_data}", "task.seq_len=64",
                    "task.max_qa_len=24", "task.epochs=2", "optimizer.lr=3e-3", "parallel.micro_batch=2",
                    "parallel.global_batch=4", "log_interval=1", "logger.wandb=false")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return {
        "gpt_tp2_train": _losses(gpt, "train/loss"),
        "gpt_tp2_valid": _losses(gpt, "valid/loss"),
        "bert_train": _losses(bert, "train/loss"),
        "bert_valid_mlm": _losses(bert, "valid/mlm_loss"),
        "race_train": _losses(race, "train/loss"),
        "race_dev_accuracy": _losses(race, "dev/accuracy"),
    }


@pytest.mark.slow
def test_gpt_bert_and_race_runs_log_the_recorded_losses(tmp_path, shared_cache):
    recorded = json.loads(RECORDED.read_text())
    measured = measure(tmp_path, shared_cache)
    assert set(measured) == set(recorded["losses"])
    same_machine = recorded["machine"] == machine()
    for name, expected in recorded["losses"].items():
        assert len(measured[name]) == len(expected) > 0, name
        if same_machine:
            assert measured[name] == expected, name  # bitwise
        else:
            assert measured[name] == pytest.approx(expected, rel=1e-6), name


if __name__ == "__main__" and sys.argv[1:] == ["record"]:
    with tempfile.TemporaryDirectory() as tmp:
        losses = measure(Path(tmp) / "runs", str(Path(tmp) / "cache"))
    RECORDED.write_text(json.dumps({"machine": machine(), "losses": losses}, indent=2) + "\n")
    print(f"recorded {RECORDED}")
