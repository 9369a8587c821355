"""`python -m megatron_exp.tasks.wikitext103 checkpoint=...`: zero-shot WikiText-103 perplexity, the paper's way.

The word-level test file (with <unk>) is detokenized and encoded as one BPE stream of T tokens. Windows of
seq_len + 1 tokens start every `stride` tokens; window 0 scores all its targets and each later window only the
targets no earlier window scored (its last `stride`), so every target t >= 1 is scored exactly once, with at least
seq_len - stride tokens of context. Reported: token loss and perplexity over the T - 1 targets, and the
word-normalized perplexity exp(total / (To - 1)) with To the file's word count: the paper's number.
"""

from __future__ import annotations

import math
import re

import torch
from omegaconf import DictConfig

from megatron_exp import console, entry
from megatron_exp.config import ConfigError, WikiTextConfig, WikiTextEvalConfig
from megatron_exp.tasks import common

# The paper's WikiText-103 detokenizer, rule by rule (Megatron-LM tasks/zeroshot_gpt/detokenizer.py, last present at
# commit 164204cd72): its 10.81 was computed on this text. Every rule is a plain left-to-right, non-overlapping
# replacement over the whole file, applied in this order; that plainness is part of the protocol (" , , " loses
# only its first space, an apostrophe pairs with the next one), so no rule is made smarter. The reference also has a
# pattern with literal slashes ("/' [0-9]/") that matches nothing in WikiText; it is left out.
_PAIRS = ("()", "[]", "{}", '""', "''")  # opener, closer: whitespace just inside each pair is dropped
_PUNCTUATION = ":;.!?,"  # " X " becomes "X ", one mark after another


def _tighten(text: str, opener: str, closer: str) -> str:
    """From each opener to the next closer (across newlines, blind to nesting), no whitespace just inside."""
    span = re.compile(f"{re.escape(opener)}([^{re.escape(closer)}]*){re.escape(closer)}")
    return span.sub(lambda match: opener + match[1].strip() + closer, text)


def detokenize(text: str) -> str:
    """The word-level file as the paper's detokenizer turns it into running text (byte for byte)."""
    text = text.replace("s '", "s'")  # plural possessive: the players ' union
    for separator in "-,.":  # inside words and numbers: well @-@ known, 1 @,@ 000, 2 @.@ 5
        text = text.replace(f" @{separator}@ ", separator)
    for mark in _PUNCTUATION:
        text = text.replace(f" {mark} ", f"{mark} ")
    for opener, closer in _PAIRS:
        text = _tighten(text, opener, closer)
    for width in (4, 3, 2):  # heading markers: = = Title = =
        text = text.replace(" ".join("=" * width), "=" * width)
    text = text.replace(" \u00b0 ", "\u00b0")  # 15 ° C
    text = text.replace(" \n", "\n").replace("\n ", "\n")  # one space either side of a newline
    text = text.replace(" N ", " 1 ")  # the number placeholder
    return text.replace(" 's", "'s")


DETOKENIZERS = {"paper": detokenize, "none": lambda text: text}


def word_count(text: str) -> int:
    """To: the space-separated words of the word-level file (245,566 for the test set)."""
    return len(text.strip().split(" "))


def windows(num_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_scored): a window reads tokens[start:end] and scores targets with index >= first_scored."""
    if not 0 < stride <= seq_len:
        raise ConfigError(f"task.stride={stride} must be between 1 and the sequence length {seq_len}")
    spans, scored_up_to = [], 0  # targets 1..scored_up_to are scored
    while scored_up_to < num_tokens - 1:
        start = len(spans) * stride
        end = min(start + seq_len + 1, num_tokens)
        spans.append((start, end, scored_up_to + 1))
        scored_up_to = end - 1
    return spans


def window_batch(tokens: list[int], spans, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs and targets [n, seq_len] (short last windows padded) and the mask of scored targets."""
    inputs = torch.zeros(len(spans), seq_len, dtype=torch.long)
    targets = torch.zeros_like(inputs)
    mask = torch.zeros(len(spans), seq_len, dtype=torch.bool)
    for row, (start, end, first_scored) in enumerate(spans):
        piece = torch.tensor(tokens[start:end])
        n = len(piece) - 1
        inputs[row, :n], targets[row, :n] = piece[:-1], piece[1:]
        mask[row, :n] = torch.arange(start + 1, start + 1 + n) >= first_scored
    return inputs, targets, mask


@torch.no_grad()
def evaluate(scores: common.TokenScores, task: WikiTextConfig, inputs: dict, progress=False) -> dict:
    """The loss of every target, `task.batch_size` windows per forward (the same on every TP rank). A window has
    the same tokens and width whatever shares its forward, and the losses are summed exactly (math.fsum, so in no
    particular order): the batch size changes nothing this harness computes."""
    tokens, seq_len = inputs["tokens"], task.seq_len
    spans = windows(len(tokens), seq_len, task.stride)
    scored_losses = []
    batches = range(0, len(spans), task.batch_size)
    for first in console.progress(batches, desc="wikitext103", unit="batches", enabled=progress):
        batch = window_batch(tokens, spans[first : first + task.batch_size], seq_len)
        x, y, mask = (t.to(scores.device) for t in batch)
        losses, _ = scores(x, y)
        scored_losses.append(losses[mask].double().cpu())
    scored = torch.cat(scored_losses)
    total, num_tokens, words = math.fsum(scored.tolist()), len(tokens), inputs["words"]
    return {
        "tokens": num_tokens,
        "scored_targets": len(scored),
        "words": words,
        "loss": total / len(scored),
        "ppl": math.exp(total / len(scored)),
        "word_ppl": math.exp(total / (words - 1)),  # the paper's number
        "seq_len": seq_len,
        "stride": task.stride,
    }


def build_inputs(cfg: WikiTextEvalConfig, tokenizer) -> dict:
    text = "".join(common.read_texts(cfg.task))  # hub rows are lines that keep their newline
    detokenized = DETOKENIZERS[cfg.task.detokenizer](text)
    tokens = tokenizer.encode(detokenized).ids
    if len(tokens) < 2:
        raise ConfigError(
            f"task.source={cfg.task.source} holds {len(tokens)} token(s): nothing to score (a target needs a token "
            "before it); give the WikiText-103 test file"
        )
    return {"tokens": tokens, "words": word_count(text)}


@entry.hydra_app("eval_wikitext103")
def main(raw: DictConfig) -> dict | None:
    return common.main(raw, WikiTextEvalConfig, build_inputs, evaluate)


if __name__ == "__main__":
    main()
