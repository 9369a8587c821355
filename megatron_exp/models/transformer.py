"""A tensor-parallel transformer: attention heads and MLP columns split across TP ranks, and the embeddings and
layer stack that GPT and BERT share.

Per layer and TP group: forward has 2 all-reduces (g after attention, g after the MLP), backward 2 (f before
each). Layernorms, the residual stream and the row-parallel biases are replicated.

With sequence parallelism (Korthikanti et al., 2022) everything between the TP regions runs on this rank's
sequence shard [batch, seq / tp, hidden]: the embeddings leave reduce-scattered, each layer all-gathers before
QKV and the MLP's first matmul and reduce-scatters after the projections (the same bytes as the 2 all-reduces),
and the output layer gathers the final shard into its matmul. Dropout there draws this rank's own masks (the
TP-region stream). Layernorms, row-parallel biases and the position and token-type embeddings then see only the
shard's tokens: they are tagged (`mark_sequence_parallel`) and their gradients summed over TP after backward.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from megatron_exp.config import ModelConfig
from megatron_exp.models.kv_cache import KVCache
from megatron_exp.parallel import random, state
from megatron_exp.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron_exp.parallel.pipeline import ModelPart, whole
from megatron_exp.parallel.sharding import init_normal_shard_, mark_sequence_parallel
from megatron_exp.parallel.state import Group


def output_init_std(cfg: ModelConfig) -> float:
    """Std of the projections that write into the residual stream, scaled so its variance stays O(1) in depth."""
    return cfg.init_std / math.sqrt(2 * cfg.layers)


class ParallelAttention(nn.Module):
    """Self-attention with this rank's heads: causal for GPT, bidirectional over the unpadded tokens for BERT.

    The fused QKV weight is laid out head by head ([q_0 k_0 v_0 q_1 k_1 v_1 ...] along its output rows), so
    splitting its rows into contiguous TP slices hands each rank whole heads.
    """

    def __init__(self, cfg: ModelConfig, tp: Group, recompute_core: bool = False, sequence_parallel: bool = False):
        super().__init__()
        self.local_heads, self.head_dim = cfg.heads // tp.size, cfg.head_dim
        self.dropout, self.causal = cfg.attention_dropout, cfg.causal
        self.recompute_core = recompute_core  # parallel.recompute=selective
        sp = dict(tp=tp, sequence_parallel=sequence_parallel)
        self.qkv = ColumnParallelLinear(cfg.hidden, 3 * cfg.hidden, init_std=cfg.init_std, **sp)
        self.proj = RowParallelLinear(cfg.hidden, cfg.hidden, init_std=output_init_std(cfg), **sp)

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """`padding_mask` [batch, seq], True at real tokens: no query attends to a padding key. With a `cache`
        (decoding), x is the block of tokens after the cached ones, which it attends to with the cache's mask.
        With sequence parallelism x is this rank's sequence shard; the QKV matmul gathers the whole sequence."""
        qkv = self.qkv(x)
        batch, seq, _ = qkv.shape
        qkv = qkv.view(batch, seq, self.local_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each [batch, local_heads, seq, head_dim]
        dropout = self.dropout if self.training else 0.0
        keys = None if padding_mask is None else padding_mask[:, None, None, :]
        causal = self.causal
        if cache is not None:
            k, v, keys = cache.update(self, k, v)
            causal = False  # the cache's mask is causal over its slots
        if self.recompute_core and self.training:
            out = random.checkpoint(self.core, q, k, v, keys, dropout, causal)
        else:
            out = self.core(q, k, v, keys, dropout, causal)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, self.local_heads * self.head_dim))

    @staticmethod
    def core(q, k, v, keys, dropout: float, causal: bool) -> torch.Tensor:
        """softmax(QK^T / sqrt(d)) V with attention dropout, on this TP rank's stream: inside the recomputed
        function, so a replay in backward restores that stream and draws the same mask."""
        with random.tp_region() if dropout > 0 else nullcontext():
            return F.scaled_dot_product_attention(q, k, v, keys, dropout_p=dropout, is_causal=causal)


class ParallelMLP(nn.Module):
    """h -> 4h (column-parallel) -> GELU (tanh form, as GPT-2) -> h (row-parallel)."""

    def __init__(self, cfg: ModelConfig, tp: Group, sequence_parallel: bool = False):
        super().__init__()
        sp = dict(tp=tp, sequence_parallel=sequence_parallel)
        self.fc1 = ColumnParallelLinear(cfg.hidden, cfg.ffn_hidden, init_std=cfg.init_std, **sp)
        self.fc2 = RowParallelLinear(cfg.ffn_hidden, cfg.hidden, init_std=output_init_std(cfg), **sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ShardDropout(nn.Dropout):
    """Dropout on the residual stream: replicated activations draw the same mask on every TP rank (the default
    stream); sequence shards (`sequence_parallel`) each draw their own, from the TP-region stream."""

    def __init__(self, p: float, sequence_parallel: bool = False):
        super().__init__(p)
        self.sequence_parallel = sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.sequence_parallel and self.training and self.p > 0):
            return super().forward(x)
        with random.tp_region():
            return super().forward(x)


class TransformerLayer(nn.Module):
    """Pre-LN (default): x + dropout(attention(ln(x))), then the same with the MLP.
    Post-LN (`model.layernorm=post`, the original BERT): ln(x + dropout(attention(x))), then the same.
    With `sequence_parallel`, x is this rank's sequence shard and every step but attention and the MLP runs on it."""

    def __init__(self, cfg: ModelConfig, tp: Group, recompute: str = "none", sequence_parallel: bool = False):
        super().__init__()
        self.post_ln = cfg.layernorm == "post"
        self.attention_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)
        self.attention = ParallelAttention(cfg, tp, recompute == "selective", sequence_parallel)
        self.mlp_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)
        self.mlp = ParallelMLP(cfg, tp, sequence_parallel)
        self.dropout = ShardDropout(cfg.hidden_dropout, sequence_parallel)

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        if self.post_ln:
            x = self.attention_norm(x + self.dropout(self.attention(x, padding_mask, cache)))
            return self.mlp_norm(x + self.dropout(self.mlp(x)))
        x = x + self.dropout(self.attention(self.attention_norm(x), padding_mask, cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class TransformerModel(nn.Module):
    """Word (vocab-parallel) + learned position [+ token type] embeddings, then the layer stack, normalized once:
    after the stack with pre-LN, on the embeddings with post-LN. GPT and BERT add their heads on top.

    `part` is what this pipeline stage holds (default: everything): its chunks' layers, keyed by their global
    index so parameter names (and checkpoints) are the same at every layout; the embeddings on the stage of the
    first chunk; the final norm and the heads on the stage of the last, which also keeps a copy of the word
    embedding for the tied output layer (flagged `pipeline_copy`: the embedding group keeps it equal to the
    first stage's, and the gradient norm counts it once).

    Weights depend on `seed`, not on the layout: every module draws from a generator seeded by the seed and its
    own name. Built under `torch.device("meta")` it allocates nothing and skips initialization (for counting
    and planning). Subclasses add their modules, then call `finish_init`.

    `sequence_parallel` (at TP > 1): the layers' input and output, and a chunk's output in a pipeline, are this
    rank's sequence shard [batch, seq / tp, hidden].
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tp: Group | None,
        recompute: str,
        token_types: int = 0,
        part: ModelPart | None = None,
        sequence_parallel: bool = False,
    ):
        super().__init__()
        self.tp = tp or state.current().tp
        cfg.validate(self.tp.size)
        self.cfg, self.recompute = cfg, recompute
        self.sequence_parallel = sp = sequence_parallel and self.tp.size > 1
        self.part = part or whole(cfg.layers)
        first, last, pre_ln = self.part.embeddings, self.part.head, cfg.layernorm == "pre"
        self.embedding = None
        if first or last:
            self.embedding = VocabParallelEmbedding(
                cfg.vocab_size, cfg.hidden, init_std=cfg.init_std, tp=self.tp, sequence_parallel=sp
            )
            self.embedding.weight.pipeline_copy = not first
        self.position_embedding = nn.Parameter(torch.empty(cfg.seq_len, cfg.hidden)) if first else None
        types = token_types if first else 0
        self.token_type_embedding = nn.Parameter(torch.empty(types, cfg.hidden)) if types else None
        self.embedding_dropout = ShardDropout(cfg.hidden_dropout, sp) if first else None
        self.layers = nn.ModuleDict({str(i): TransformerLayer(cfg, self.tp, recompute, sp) for i in self.part.layers})
        self.final_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps) if last and pre_ln else None
        self.embedding_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps) if first and not pre_ln else None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype, which is also that of the activations passed between pipeline stages."""
        return next(self.parameters()).dtype

    def compile_layers(self) -> None:
        """torch.compile each transformer layer in place (`train.compile`): parameter names, and so checkpoints,
        stay the same, and the embeddings and loss stay eager."""
        random.run_checkpoint_eagerly()
        for layer in self.layers.values():
            layer.compile()

    def finish_init(self, seed: int) -> None:
        if self.sequence_parallel:
            self.mark_sequence_parallel()
        if not next(self.parameters()).is_meta:
            self.init_weights(seed)

    def mark_sequence_parallel(self) -> None:
        """Tag the replicated parameters applied to sequence shards (the row-parallel biases tag themselves): the
        layernorms and the position and token-type embeddings."""
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                for param in module.parameters():
                    mark_sequence_parallel(param)
        for param in (self.position_embedding, self.token_type_embedding):
            if param is not None:
                mark_sequence_parallel(param)

    def hidden_shape(self, tokens: torch.Tensor) -> torch.Size:
        """The shape of a chunk's output for `tokens` [batch, seq]: what pipeline stages send each other."""
        batch, seq = tokens.shape
        return torch.Size((batch, seq // self.tp.size if self.sequence_parallel else seq, self.cfg.hidden))

    def sequence_shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's shard of x's sequence (dim 1) under sequence parallelism, else x (no autograd hook: what
        reaches a parameter through it is tagged for the TP sum)."""
        if not self.sequence_parallel:
            return x
        if x.shape[1] % self.tp.size:
            raise ValueError(f"sequence of {x.shape[1]} tokens is not divisible by parallel.tp={self.tp.size}")
        return x.chunk(self.tp.size, dim=1)[self.tp.rank]

    def generator(self, seed: int, name: str) -> torch.Generator:
        """The random stream of the module (or parameter) called `name`: the same whichever stage builds it."""
        digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
        return torch.Generator(device=self.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Normal(0, init_std) weights (output projections scaled down), zero biases, unit layernorms.

        Each tensor is drawn whole (serial) and then sharded, so every TP degree starts from the same model;
        replicated linear layers (heads) get the same draw on every rank.
        """
        for name in ("position_embedding", "token_type_embedding"):
            if getattr(self, name) is not None:
                init_normal_shard_(getattr(self, name), self.tp, self.cfg.init_std, self.generator(seed, name))
        for name, module in self.named_modules():
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
                module.reset_parameters(self.generator(seed, name))
            elif isinstance(module, nn.Linear):
                module.weight.normal_(0.0, self.cfg.init_std, generator=self.generator(seed, name))
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def is_last(self, chunk: int | None) -> bool:
        """Whether `chunk` (None: the model is on one stage) ends the model, so its output goes to the head."""
        return self.part.head and (chunk is None or chunk == self.part.count - 1)

    def embed(
        self, tokens: torch.Tensor, token_types: torch.Tensor | None = None, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token + position (+ token type) embeddings; `positions` [batch, seq] default to 0, 1, ... in every row.
        With sequence parallelism, those of this rank's sequence shard."""
        if positions is None:
            seq = tokens.shape[1]
            if seq > self.cfg.seq_len:
                raise ValueError(f"sequence of {seq} tokens is longer than model.seq_len={self.cfg.seq_len}")
            x = self.embedding(tokens) + self.sequence_shard(self.position_embedding[None, :seq])
        else:
            x = self.embedding(tokens) + F.embedding(self.sequence_shard(positions), self.position_embedding)
        if token_types is not None:
            x = x + F.embedding(self.sequence_shard(token_types), self.token_type_embedding)
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        return self.embedding_dropout(x)

    def encode(
        self,
        tokens: torch.Tensor,
        token_types: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        *,
        hidden: torch.Tensor | None = None,
        chunk: int | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """tokens [batch, seq] -> hidden states [batch, seq, hidden], replicated on every TP rank (with sequence
        parallelism, this rank's [batch, seq / tp, hidden] shard): through the whole model, or (pipeline) through
        `chunk` only, from the previous chunk's `hidden`. With a `cache` (decoding), tokens are the block after
        the cached ones, at the cache's positions."""
        if cache is not None and self.sequence_parallel:
            raise ValueError("decoding with a KV cache needs a model built without sequence_parallel")
        if chunk in (None, 0):
            x = self.embed(tokens, token_types, None if cache is None else cache.positions)
        else:
            x = hidden
        for index in self.part.chunks[chunk or 0]:
            layer = self.layers[str(index)]
            if self.recompute == "full" and self.training:
                x = random.checkpoint(layer, x, padding_mask)
            else:
                x = layer(x, padding_mask, cache)
        return self.final_norm(x) if self.final_norm is not None and self.is_last(chunk) else x
