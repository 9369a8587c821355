"""Cross-entropy and argmax over logits whose vocabulary is split across TP ranks.

The full-vocabulary logits are never gathered: each rank reduces its slice and a few all-reduces of per-token
scalars combine them (a max, then the target logit and the sum of exponentials together). Padding columns
(ids >= vocab_size) are masked to -inf, so they take no probability, no gradient, and are never the argmax:
the loss is the same at every TP degree and padding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_exp.parallel.mappings import all_reduce_
from megatron_exp.parallel.state import Group


def masked_logits(logits: torch.Tensor, vocab_size: int, tp: Group) -> tuple[torch.Tensor, int]:
    """A copy of this rank's logits in fp32 (fp64 stays fp64) with padding columns at -inf, and the rank's
    first vocabulary id (the argmax here and the sampler start from it)."""
    part = logits.shape[-1]
    start = tp.rank * part
    padding = torch.arange(start, start + part, device=logits.device) >= vocab_size
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    return logits.to(compute_dtype).masked_fill(padding, float("-inf")), start


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Few passes over the [tokens, vocab / tp] logits: a max, one subtraction into a new buffer (into the fp32 copy
    when the logits are bf16/fp16), exp in place and a sum; backward scales that buffer in place into the gradient."""

    @staticmethod
    def forward(ctx, logits, target, vocab_size, tp):
        part = logits.shape[-1]
        start = tp.rank * part
        real = min(max(vocab_size - start, 0), part)  # this rank's columns that are real vocabulary entries
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 logits are used as they are
        local_max = x[..., :real].amax(dim=-1) if real else x.new_full(x.shape[:-1], float("-inf"))
        row_max = all_reduce_(local_max, tp, dist.ReduceOp.MAX)

        local_target = target - start
        in_range = (local_target >= 0) & (local_target < part)
        local_target = local_target.masked_fill(~in_range, 0)
        target_logit = x.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).sub_(row_max).masked_fill_(~in_range, 0)

        # low-precision logits were copied to fp32 above: that copy is ours to overwrite (on GPU, the largest buffer)
        shifted = x.sub_(row_max.unsqueeze(-1)) if x is not logits else torch.sub(x, row_max.unsqueeze(-1))
        exp = shifted.exp_()
        exp[..., real:] = 0.0  # padding columns take no probability
        sums = all_reduce_(torch.stack([target_logit, exp.sum(dim=-1)]), tp)
        target_logit, sum_exp = sums[0], sums[1]

        ctx.save_for_backward(exp, sum_exp, local_target, in_range)
        ctx.logits_dtype = logits.dtype
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        exp, sum_exp, local_target, in_range = ctx.saved_tensors
        # d loss / d logits = softmax - one_hot(target) = exp / sum_exp - one_hot; the saved buffer is used once
        grad = exp.mul_((grad_loss / sum_exp).unsqueeze(-1))
        grad.scatter_add_(-1, local_target.unsqueeze(-1), (-grad_loss * in_range).unsqueeze(-1).to(grad.dtype))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, vocab_size: int, tp: Group
) -> torch.Tensor:
    """Per-token loss, -log softmax(logits)[target], from this rank's vocabulary slice of the logits.

    `logits`: [..., padded_vocab / tp]; `target`: [...] ids below `vocab_size`.
    Returns losses [...] in fp32 (fp64 for fp64 logits).
    """
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_size, tp)


@torch.no_grad()
def vocab_parallel_argmax(logits: torch.Tensor, vocab_size: int, tp: Group) -> torch.Tensor:
    """Greedy prediction over the real vocabulary; ties go to the lowest id, as with torch.argmax."""
    masked, start = masked_logits(logits, vocab_size, tp)
    local_max, local_arg = masked.amax(dim=-1), masked.argmax(dim=-1)
    best = all_reduce_(local_max.clone(), tp, dist.ReduceOp.MAX)
    candidate = torch.where(local_max == best, local_arg + start, torch.iinfo(torch.long).max)
    return all_reduce_(candidate, tp, dist.ReduceOp.MIN)
