"""GPT-2 weights to and from the Hugging Face `transformers` layout (GPT2LMHeadModel), for the serial model.

Differences handled here: transformers' Conv1D stores weights as [in, out] (ours: [out, in], as nn.Linear);
its fused c_attn orders the output as [all q | all k | all v], ours head by head ([q_0 k_0 v_0 q_1 ...]) so a
TP split hands out whole heads; its vocabulary is unpadded, ours is padded to a multiple of 128. Both use the
tanh GELU, pre-LN blocks, a final layernorm and tied input/output embeddings.
"""

from __future__ import annotations

import torch

from megatron_exp.config import ModelConfig
from megatron_exp.parallel.sharding import padded_vocab_size

# (ours, theirs, transpose) per layer
_LAYER = [
    ("attention_norm.weight", "ln_1.weight", False),
    ("attention_norm.bias", "ln_1.bias", False),
    ("attention.proj.weight", "attn.c_proj.weight", True),
    ("attention.proj.bias", "attn.c_proj.bias", False),
    ("mlp_norm.weight", "ln_2.weight", False),
    ("mlp_norm.bias", "ln_2.bias", False),
    ("mlp.fc1.weight", "mlp.c_fc.weight", True),
    ("mlp.fc1.bias", "mlp.c_fc.bias", False),
    ("mlp.fc2.weight", "mlp.c_proj.weight", True),
    ("mlp.fc2.bias", "mlp.c_proj.bias", False),
]


def model_config(hf_config, name: str = "hf_gpt2") -> ModelConfig:
    """Our ModelConfig for a transformers GPT2Config."""
    if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation {hf_config.activation_function} is not GPT-2's tanh GELU")
    return ModelConfig(
        name=name,
        hidden=hf_config.n_embd,
        heads=hf_config.n_head,
        layers=hf_config.n_layer,
        vocab_size=hf_config.vocab_size,
        seq_len=hf_config.n_positions,
        hidden_dropout=hf_config.resid_pdrop,
        attention_dropout=hf_config.attn_pdrop,
        layernorm_eps=hf_config.layer_norm_epsilon,
    )


def hf_config(cfg: ModelConfig):
    from transformers import GPT2Config

    gpt2_eod = 50256 if cfg.vocab_size == 50257 else None  # GPT-2's <|endoftext|>; unknown for other tokenizers
    return GPT2Config(
        bos_token_id=gpt2_eod,
        eos_token_id=gpt2_eod,
        n_embd=cfg.hidden,
        n_head=cfg.heads,
        n_layer=cfg.layers,
        vocab_size=cfg.vocab_size,
        n_positions=cfg.seq_len,
        resid_pdrop=cfg.hidden_dropout,
        embd_pdrop=cfg.hidden_dropout,
        attn_pdrop=cfg.attention_dropout,
        layer_norm_epsilon=cfg.layernorm_eps,
        activation_function="gelu_new",
    )


def _qkv_to_ours(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[3, heads, head_dim, ...] order -> [heads, 3, head_dim, ...], flattened back."""
    rest = t.shape[1:]
    return t.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def _qkv_to_theirs(t: torch.Tensor, heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def from_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A GPT2LMHeadModel state dict -> our serial state dict (vocabulary padded for TP=1)."""
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    wte = state["wte.weight"]
    rows = padded_vocab_size(cfg.vocab_size, 1)
    ours = {
        "embedding.weight": torch.cat([wte, wte.new_zeros(rows - wte.shape[0], wte.shape[1])]),
        "position_embedding": state["wpe.weight"],
        "final_norm.weight": state["ln_f.weight"],
        "final_norm.bias": state["ln_f.bias"],
    }
    for i in range(cfg.layers):
        theirs = f"h.{i}."
        for mine, name, transpose in _LAYER:
            t = state[theirs + name]
            ours[f"layers.{i}.{mine}"] = t.t() if transpose else t
        ours[f"layers.{i}.attention.qkv.weight"] = _qkv_to_ours(state[theirs + "attn.c_attn.weight"].t(), cfg.heads)
        ours[f"layers.{i}.attention.qkv.bias"] = _qkv_to_ours(state[theirs + "attn.c_attn.bias"], cfg.heads)
    return {k: v.contiguous() for k, v in ours.items()}


def to_hf(ours: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our serial state dict -> a GPT2LMHeadModel state dict (padding rows dropped, lm_head tied)."""
    wte = ours["embedding.weight"][: cfg.vocab_size]
    state = {
        "transformer.wte.weight": wte,
        "transformer.wpe.weight": ours["position_embedding"],
        "transformer.ln_f.weight": ours["final_norm.weight"],
        "transformer.ln_f.bias": ours["final_norm.bias"],
        "lm_head.weight": wte,
    }
    for i in range(cfg.layers):
        theirs = f"transformer.h.{i}."
        for mine, name, transpose in _LAYER:
            t = ours[f"layers.{i}.{mine}"]
            state[theirs + name] = t.t() if transpose else t
        qkv_weight = _qkv_to_theirs(ours[f"layers.{i}.attention.qkv.weight"], cfg.heads)
        state[theirs + "attn.c_attn.weight"] = qkv_weight.t()
        state[theirs + "attn.c_attn.bias"] = _qkv_to_theirs(ours[f"layers.{i}.attention.qkv.bias"], cfg.heads)
    return {k: v.contiguous() for k, v in state.items()}
