"""Text generation with a GPT: the prompts in one forward (prefill), then one new token per step through the KV
cache. Every TP rank of the group runs it alike, with its heads' cache and its vocabulary slice of the logits, and
all get the same tokens (the sampler's choice is agreed across the vocabulary shards).

In a pipeline each stage holds its chunks' layers and their cache. Every forward (the prefill, then each step's
one token per row) goes through the stages in turn, the hidden states sent stage to stage; the last stage turns
them into its vocabulary slice of the logits and samples, and broadcasts the chosen tokens over the pipeline
group, so every rank feeds and returns the same tokens. The random stream lives on the last stage only, drawn
in the same order as without a pipeline: a seed gives the same text at every layout."""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

import torch
import torch.distributed as dist

from megatron_exp.models.contract import Batch
from megatron_exp.models.gpt import GPTModel
from megatron_exp.models.kv_cache import KVCache
from megatron_exp.parallel.sampling import GREEDY, Sampler, Sampling
from megatron_exp.parallel.state import ProcessGrid


class StagedForward(Protocol):
    """What decoding needs of a pipeline (training.schedule.Pipeline is one; models/ does not import training/):
    its grid, and one batch forward through the stages giving the last chunk's output there, None elsewhere."""

    grid: ProcessGrid

    def outputs(self, batch: Batch, forward: Callable | None = None) -> object | None: ...


def pad(prompts: list[list[int]], side: str = "left", pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (tokens [batch, longest], real [batch, longest], True at the prompts' tokens), padded on
    `side`; `generate` gives the same answer for either side."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    real = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        columns = slice(longest - len(prompt), longest) if side == "left" else slice(0, len(prompt))
        tokens[row, columns] = torch.tensor(prompt, dtype=torch.long)
        real[row, columns] = True
    return tokens, real


@torch.no_grad()
def generate(
    model: GPTModel,
    tokens: torch.Tensor,
    real: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    stop_token: int | None = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    pipeline: StagedForward | None = None,
) -> list[list[int]]:
    """The new tokens of every row of `tokens` [batch, prompt] (its tokens where `real` is True, padding on
    either side, or both), up to `max_new_tokens` or until `stop_token`, which ends a row and is not returned.
    With a `pipeline`, `model` is this stage's part of it; every rank returns the same tokens.
    Dropout is off while generating (the model's mode is restored after)."""
    lengths = real.sum(dim=-1)
    if int(lengths.min()) == 0:
        raise ValueError("every prompt needs at least one token")
    if int(lengths.max()) + max_new_tokens > model.cfg.seq_len:
        raise ValueError(
            f"a prompt of {int(lengths.max())} tokens + {max_new_tokens} new ones exceeds the model's "
            f"{model.cfg.seq_len} positions"
        )
    device, batch = model.device, tokens.shape[0]
    tokens, real = tokens.to(device), real.to(device)
    last = real.shape[1] - 1 - real.flip(-1).int().argmax(dim=-1)  # each row's last prompt token
    cache = KVCache(batch, real.shape[1] + max_new_tokens - 1, device)  # the last new token is never fed
    sampler = Sampler(sampling, model.cfg.vocab_size, model.tp, device) if model.part.head else None

    def final_hidden(block: torch.Tensor) -> torch.Tensor | None:
        """The final hidden states of `block` [batch, n] (the tokens after the cached ones); None on a stage
        before the last."""
        if pipeline is None:
            with autocast():
                return model.encode(block, cache=cache)
        return pipeline.outputs(Batch({"tokens": block}, {}), functools.partial(model.encode, cache=cache))

    def next_token(hidden: torch.Tensor | None) -> torch.Tensor:
        """The chosen token of every row [batch], on every rank, from the last position's hidden states."""
        if sampler is not None:
            with autocast():
                token = sampler(model.output_logits(hidden))
        else:
            token = torch.empty(batch, dtype=torch.long, device=device)
        if pipeline is not None:
            pp = pipeline.grid.pp
            dist.broadcast(token, group=pp.handle, group_src=pp.size - 1)
        return token

    was_training = model.training
    model.eval()
    try:
        cache.append(real)
        hidden = final_hidden(tokens)
        hidden = None if hidden is None else hidden[torch.arange(batch, device=device), last]
        chosen, stopped = [], torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = next_token(hidden)
            chosen.append(token)
            if stop_token is not None:
                stopped |= token == stop_token
            if step + 1 == max_new_tokens or bool(stopped.all()):
                break
            cache.append(torch.ones(batch, 1, dtype=torch.bool, device=device))
            hidden = final_hidden(token[:, None])
            hidden = None if hidden is None else hidden[:, 0]
    finally:
        model.train(was_training)
    rows = torch.stack(chosen, dim=1).tolist()
    return [row[: row.index(stop_token)] if stop_token in row else row for row in rows]
