"""End to end: train the tiny model briefly, then evaluate its checkpoint with both entry points."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.test_train import ROOT, TINY, train

WIKI = " = Valkyria = \n \n The game 's battle system , the BliTZ system , is carried over . It is 2 @.@ 5 times " * 40
PASSAGES = ["The ship sailed into the harbour and the captain went ashore", "She opened the door and saw her mother"]


def evaluate(task: str, run_dir, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"megatron_exp.tasks.{task}", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_cache):
    run_dir = tmp_path_factory.mktemp("trained")
    done = train(run_dir, *TINY, "train.iterations=5", "logger.wandb=false", cache=shared_cache)
    assert done.returncode == 0, done.stdout + done.stderr
    return run_dir


@pytest.mark.slow
def test_wikitext103_entry_point_gives_the_same_numbers_at_every_layout(tmp_path, trained):
    source = tmp_path / "wiki.test.tokens"
    source.write_text(WIKI)
    losses = {}
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:
        out = tmp_path / f"eval_tp{tp}_pp{pp}"
        done = evaluate("wikitext103", out, f"checkpoint={trained}", f"task.source={source}", "task.seq_len=64",
                        "task.stride=16", f"parallel.tp={tp}", f"parallel.pp={pp}")  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        results = json.loads((out / "results.json").read_text())
        assert results["words"] == len(WIKI.strip().split(" ")) and results["scored_targets"] == results["tokens"] - 1
        assert results["ppl"] == pytest.approx(math.exp(results["loss"]))
        assert math.isfinite(results["word_ppl"]) and (results["tp"], results["pp"]) == (tp, pp)
        assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # a W&B eval run
        assert "word_ppl" in done.stdout + done.stderr  # the printed table
        losses[tp, pp] = results["loss"]
    assert losses[2, 1] == pytest.approx(losses[1, 1], rel=1e-5)
    assert losses[1, 2] == pytest.approx(losses[1, 1], rel=1e-5)


@pytest.mark.slow
def test_lambada_entry_point(tmp_path, trained):
    source = tmp_path / "lambada.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in PASSAGES))
    done = evaluate("lambada", tmp_path / "eval", f"checkpoint={trained}", f"task.source={source}")
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["examples"] == 2 and 0.0 <= results["accuracy"] <= 1.0 and results["strict"] is True
    assert results["ppl_per_token"] == pytest.approx(math.exp(results["loss_per_token"]))
    assert results["ppl_per_passage"] == pytest.approx(math.exp(results["loss_per_passage"]))
    assert list((tmp_path / "eval" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_a_checkpoint_that_does_not_exist_is_a_one_line_error(tmp_path):
    done = evaluate("lambada", tmp_path / "eval", f"checkpoint={tmp_path / 'nothing'}", "task.source=x.jsonl")
    assert done.returncode == 2
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "error:" in line]
    assert len(errors) == 1 and "checkpoint=" in errors[0] and "holds no complete checkpoint" in errors[0]


def test_the_old_batch_key_is_a_one_line_error_naming_the_new_one(tmp_path):
    done = evaluate("wikitext103", tmp_path / "eval", "checkpoint=x", "task.micro_batch=4")
    assert done.returncode == 2
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "error:" in line]
    assert errors == ["error: task.micro_batch was renamed task.batch_size: set task.batch_size=<value> instead"]
