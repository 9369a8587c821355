"""`python -m megatron_exp.tasks.lambada checkpoint=...`: zero-shot LAMBADA accuracy, the paper's strict way.

Each passage's target is its whole last word w (text.split()[-1]); the context is the text before w's last
occurrence, stripped; the target tokens are encode(' ' + w). A passage counts as correct only if the greedy
prediction (argmax over the real vocabulary, padding never chosen) is right at every target token. With
task.strict=false the target is only the passage's last token. Also reported: the targets' perplexity per token
(the mean over all target tokens) and per passage (lm-evaluation-harness's lambada_openai definition: the mean over
passages of the whole target's loss). Where the last word follows a newline (7 of the 5,153 test passages)
lm-evaluation-harness, which splits at the last space, has a longer target; here the paper's split holds.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from omegaconf import DictConfig

from megatron_exp import console, entry
from megatron_exp.config import ConfigError, LambadaConfig, LambadaEvalConfig
from megatron_exp.tasks import common


def split_last_word(text: str) -> tuple[str, str]:
    """(context, last word): the context is everything before the word's last occurrence, stripped."""
    word = text.split()[-1]
    return text[: text.rindex(word)].strip(), word


def encode(texts: list[str], tokenizer, strict: bool) -> list[tuple[list[int], list[int]]]:
    """(context ids, target ids) per passage."""
    examples = []
    for text in texts:
        if strict:
            context, word = split_last_word(text)
            examples.append((tokenizer.encode(context).ids, tokenizer.encode(" " + word).ids))
        else:
            ids = tokenizer.encode(text.strip()).ids
            examples.append((ids[:-1], ids[-1:]))
    return examples


def batches(examples, seq_len: int, batch_size: int) -> list[list[int]]:
    """Which examples share a forward: up to `batch_size` of one row length (context + target, cut to seq_len + 1),
    so every example is read at its own width, unpadded, exactly as it would be alone."""
    by_length = defaultdict(list)
    for index, (context, target) in enumerate(examples):
        by_length[min(len(context) + len(target), seq_len + 1)].append(index)
    return [
        group[first : first + batch_size]
        for _, group in sorted(by_length.items())
        for first in range(0, len(group), batch_size)
    ]


def example_batch(examples, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs and targets [n, row length - 1] of examples of one row length, and the mask of target positions. A
    context too long for seq_len loses its oldest tokens."""
    rows = torch.tensor([(context + target)[-(seq_len + 1) :] for context, target in examples])
    mask = torch.zeros(rows.shape[0], rows.shape[1] - 1, dtype=torch.bool)
    for row, (_, target) in enumerate(examples):
        mask[row, -len(target) :] = True
    return rows[:, :-1], rows[:, 1:], mask


@torch.no_grad()
def evaluate(scores: common.TokenScores, task: LambadaConfig, inputs: dict, progress=False) -> dict:
    """Accuracy and the targets' perplexity per token and per passage, `task.batch_size` passages per forward.
    Each passage is read as it would be alone and the losses are summed exactly (math.fsum, so in no particular
    order): the batch size changes nothing this harness computes."""
    examples = inputs["examples"]
    correct, token_losses, passage_losses = 0, [], []
    groups = batches(examples, task.seq_len, task.batch_size)
    for indices in console.progress(groups, desc="lambada", unit="batches", enabled=progress):
        x, y, mask = (t.to(scores.device) for t in example_batch([examples[i] for i in indices], task.seq_len))
        losses, predictions = scores(x, y)
        losses, hits = losses.double().cpu(), (predictions == y).cpu()
        correct += int((hits | ~mask).all(dim=1).sum())  # every target token right
        for row_losses, row_mask in zip(losses, mask.cpu(), strict=True):
            target = row_losses[row_mask].tolist()
            token_losses += target
            passage_losses.append(math.fsum(target))  # minus the passage's log-likelihood of its target
    per_token = math.fsum(token_losses) / len(token_losses)
    per_passage = math.fsum(passage_losses) / len(passage_losses)
    return {
        "examples": len(examples),
        "accuracy": correct / len(examples),
        "target_tokens": len(token_losses),
        "loss_per_token": per_token,
        "ppl_per_token": math.exp(per_token),
        "loss_per_passage": per_passage,
        "ppl_per_passage": math.exp(per_passage),  # lm-evaluation-harness's (lambada_openai) perplexity
        "strict": task.strict,
    }


def build_inputs(cfg: LambadaEvalConfig, tokenizer) -> dict:
    texts = common.read_texts(cfg.task)[: cfg.task.max_examples]
    examples = encode(texts, tokenizer, cfg.task.strict)
    for number, (context, _) in enumerate(examples, start=1):
        if not context:
            raise ConfigError(
                f"task.source={cfg.task.source} passage {number} ({texts[number - 1][:40]!r}) has no context before "
                "its target: each passage needs text before its last word"
            )
    return {"examples": examples}


@entry.hydra_app("eval_lambada")
def main(raw: DictConfig) -> dict | None:
    return common.main(raw, LambadaEvalConfig, build_inputs, evaluate)


if __name__ == "__main__":
    main()
