"""Tokenize a corpus once and keep it as one memory-mapped token array per split.

For GPT, documents are concatenated with an end-of-document token after each, so samples may cross document
boundaries (as GPT-2 and Megatron train) while the model still sees where a document ends. For BERT
(`by_sentence`), documents are split into sentences and tokenized without separators; the token count of every
sentence and the sentence count of every document are kept beside the tokens, so sentence pairs can be cut from
one document. The cache lives under
`data.cache_dir`, keyed by everything that determines its contents; it is built in a temporary directory and
renamed into place, so an interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer

from megatron_exp import console
from megatron_exp.config import DataConfig
from megatron_exp.data import corpus, tokenizer

if TYPE_CHECKING:
    from datasets import Dataset

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """Sentences of a document: cut after . ! ? followed by whitespace, and at line breaks (which end headings,
    list items and code lines in plain-text corpora)."""
    return [s for s in (part.strip() for part in _SENTENCE_END.split(text)) if s]


def cache_key(cfg: DataConfig, by_sentence: bool = False) -> str:
    identity = {
        "version": FORMAT_VERSION,
        "layout": "sentences" if by_sentence else "documents",
        "raw": corpus.describe_source(cfg),
        "text_field": cfg.text_field,
        "sample_by": cfg.sample_by,
        "split_fractions": list(cfg.split_fractions),
        "tokenizer": asdict(cfg.tokenizer),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{cfg.name}-{digest}"


def cache_path(cfg: DataConfig, by_sentence: bool = False) -> Path:
    return Path(cfg.cache_dir).expanduser() / cache_key(cfg, by_sentence)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _document_encoder(tok: Tokenizer):
    eod = tok.token_to_id(tokenizer.EOD)

    def encode(batch):
        return {"ids": [[*e.ids, eod] for e in tok.encode_batch(batch["text"])]}

    return encode


def _sentence_encoder(tok: Tokenizer):
    def encode(batch):
        ids, lengths = [], []
        for text in batch["text"]:
            sentences = [e.ids for e in tok.encode_batch(split_sentences(text)) if e.ids]
            ids.append([i for sentence in sentences for i in sentence])
            lengths.append([len(sentence) for sentence in sentences])
        return {"ids": ids, "sentence_lengths": lengths}

    return encode


def _write_tokens(docs: Dataset, encode, dtype: np.dtype, out: Path, num_proc: int) -> dict:
    import datasets  # only a build needs datasets (see corpus.load_splits)
    import pyarrow.compute as pc

    large = len(docs) >= 1000  # worker processes and a progress bar only pay off on large corpora
    num_proc = min(num_proc, len(docs) // 1000) if large else 1
    bars_were_off = datasets.are_progress_bars_disabled()
    if not large:
        datasets.disable_progress_bars()
    try:
        ids = docs.map(
            encode,
            batched=True,
            remove_columns=["text"],
            num_proc=num_proc if num_proc > 1 else None,
            desc=f"tokenizing {out.stem}",
        )
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    count = 0
    sentence_lengths, document_sentences = [], []
    with open(out, "wb") as f:
        for table in ids.with_format("arrow").iter(batch_size=10_000):
            flat = pc.list_flatten(table["ids"]).to_numpy().astype(dtype)
            flat.tofile(f)
            count += len(flat)
            if "sentence_lengths" in table.column_names:
                sentence_lengths.append(pc.list_flatten(table["sentence_lengths"]).to_numpy())
                document_sentences.append(pc.list_value_length(table["sentence_lengths"]).to_numpy())
    if sentence_lengths:
        np.save(out.with_suffix(".sentences.npy"), np.concatenate(sentence_lengths).astype(np.int64))
        np.save(out.with_suffix(".documents.npy"), np.concatenate(document_sentences).astype(np.int64))
    return {"tokens": count, "documents": len(docs)}


def prepare(cfg: DataConfig, by_sentence: bool = False) -> Path:
    """The cache directory for `cfg`, built if missing: tokenizer.json, {train,valid,test}.bin, meta.json (and
    with `by_sentence`, {split}.sentences.npy and {split}.documents.npy)."""
    path = cache_path(cfg, by_sentence)
    if (path / "meta.json").is_file():
        log.info("data: using cached tokens at %s", path)
    else:
        log.info("data: building %s from %s (once; later runs reuse it)", path, cfg.source)
        with console.library_bars_as_lines():  # datasets' bars (reading, tokenizing) in a log file
            _build(cfg, by_sentence, path)
    counts = read_meta(path)["splits"]
    for split in corpus.SPLITS:  # how much text the run learns from, in every run's log
        log.info("data: %s: %d documents, %d tokens", split, counts[split]["documents"], counts[split]["tokens"])
    return path


def _build(cfg: DataConfig, by_sentence: bool, path: Path) -> None:
    splits = corpus.load_splits(cfg)
    started = time.monotonic()
    tok = tokenizer.build(cfg.tokenizer, splits["train"]["text"])
    log.info("data: %s tokenizer of %d entries (%.1f s)", cfg.tokenizer.kind, tok.get_vocab_size(),
             time.monotonic() - started)  # fmt: skip
    encode = _sentence_encoder(tok) if by_sentence else _document_encoder(tok)
    dtype = token_dtype(cfg.tokenizer.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        counts = {s: _write_tokens(d, encode, dtype, tmp / f"{s}.bin", cfg.num_proc) for s, d in splits.items()}
        tok.save(str(tmp / "tokenizer.json"))
        meta = {
            "source": cfg.source,
            "dtype": dtype.name,
            "eod": tok.token_to_id(tokenizer.EOD),
            "by_sentence": by_sentence,
            "vocab_size": tok.get_vocab_size(),
            "splits": counts,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished the same cache first; theirs is as good as ours
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def load_tokens(path: Path, split: str) -> np.ndarray:
    """The split's token stream, memory-mapped (read-only, nothing loaded until used)."""
    meta = read_meta(path)
    return np.memmap(Path(path) / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")


def load_sentences(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(token count of each sentence, sentence count of each document) of a split cached `by_sentence`."""
    return np.load(Path(path) / f"{split}.sentences.npy"), np.load(Path(path) / f"{split}.documents.npy")


def load_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
