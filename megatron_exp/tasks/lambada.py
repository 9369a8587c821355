"""`python -m megatron_exp.tasks.lambada checkpoint=...`: zero-shot LAMBADA accuracy, the paper's strict way.

Each passage's target is its whole last word w (text.split()[-1]); the context is the text before w's last
occurrence, stripped; the target tokens are encode(' ' + w). A passage counts as correct only if the greedy
prediction (argmax over the real vocabulary, padding never chosen) is right at every target token. With
task.strict=false the target is only the passage's last token. Also reported: the perplexity of the targets.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from megatron_exp import entry
from megatron_exp.config import EvalConfig, TaskConfig
from megatron_exp.parallel.cross_entropy import vocab_parallel_argmax, vocab_parallel_cross_entropy
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


def example_batch(examples, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded inputs and targets [n, longest] and the mask of target positions. A context too long for
    seq_len loses its oldest tokens."""
    rows = [(context + target)[-(seq_len + 1) :] for context, target in examples]
    width = max(len(r) for r in rows) - 1
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.zeros_like(inputs)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, (_, target)) in enumerate(zip(rows, examples, strict=True)):
        n = len(row) - 1
        inputs[i, :n], targets[i, :n] = torch.tensor(row[:-1]), torch.tensor(row[1:])
        mask[i, n - len(target) : n] = True
    return inputs, targets, mask


@torch.no_grad()
def evaluate(model, task: TaskConfig, inputs: dict, autocast=nullcontext, progress=False) -> dict:
    examples = inputs["examples"]
    device = model.embedding.weight.device
    correct, loss_sum, target_tokens = 0, 0.0, 0
    batches = range(0, len(examples), task.micro_batch)
    for first in tqdm(batches, desc="lambada", disable=not progress, mininterval=5):
        x, y, mask = (t.to(device) for t in example_batch(examples[first : first + task.micro_batch], task.seq_len))
        with autocast():
            logits = model(x)
        losses = vocab_parallel_cross_entropy(logits, y, model.cfg.vocab_size, model.tp)
        hits = vocab_parallel_argmax(logits, model.cfg.vocab_size, model.tp) == y
        correct += int((hits | ~mask).all(dim=1).sum())  # every target token right
        loss_sum += float(losses[mask].sum())
        target_tokens += int(mask.sum())
    return {
        "examples": len(examples),
        "accuracy": correct / len(examples),
        "target_tokens": target_tokens,
        "loss": loss_sum / target_tokens,
        "ppl": math.exp(loss_sum / target_tokens),
        "strict": task.strict,
    }


def build_inputs(cfg: EvalConfig, tokenizer) -> dict:
    texts = common.read_texts(cfg.task)[: cfg.task.max_examples]
    return {"examples": encode(texts, tokenizer, cfg.task.strict)}


@entry.hydra_app("eval_lambada")
def main(raw: DictConfig) -> dict | None:
    return common.main(raw, build_inputs, evaluate)


if __name__ == "__main__":
    main()
