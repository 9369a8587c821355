"""Tokenize a corpus once and keep it as one memory-mapped token array per split.

Documents are concatenated with an end-of-document token after each, so samples may cross document boundaries
(as GPT-2 and Megatron train) while the model still sees where a document ends. The cache lives under
`data.cache_dir`, keyed by everything that determines its contents; it is built in a temporary directory and
renamed into place, so an interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets import Dataset
from tokenizers import Tokenizer

from megatron_exp.config import DataConfig
from megatron_exp.data import corpus, tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def cache_key(cfg: DataConfig) -> str:
    identity = {
        "version": FORMAT_VERSION,
        "raw": corpus.describe_source(cfg),
        "text_field": cfg.text_field,
        "sample_by": cfg.sample_by,
        "split_fractions": list(cfg.split_fractions),
        "tokenizer": asdict(cfg.tokenizer),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{cfg.name}-{digest}"


def cache_path(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() / cache_key(cfg)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _write_tokens(docs: Dataset, tok: Tokenizer, eod: int, dtype: np.dtype, out: Path, num_proc: int) -> dict:
    def encode(batch):
        return {"ids": [[*e.ids, eod] for e in tok.encode_batch(batch["text"])]}

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
            desc="tokenizing",
        )
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    count = 0
    with open(out, "wb") as f:
        for table in ids.with_format("arrow").iter(batch_size=10_000):
            flat = pc.list_flatten(table["ids"]).to_numpy().astype(dtype)
            flat.tofile(f)
            count += len(flat)
    return {"tokens": count, "documents": len(docs)}


def prepare(cfg: DataConfig) -> Path:
    """The cache directory for `cfg`, built if missing: tokenizer.json, {train,valid,test}.bin, meta.json."""
    path = cache_path(cfg)
    if (path / "meta.json").is_file():
        log.info("data: using cached tokens at %s", path)
        return path
    log.info("data: building %s from %s (once; later runs reuse it)", path, cfg.source)
    splits = corpus.load_splits(cfg)
    tok = tokenizer.build(cfg.tokenizer, splits["train"]["text"])
    eod = tok.token_to_id(tokenizer.EOD)
    dtype = token_dtype(cfg.tokenizer.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        counts = {s: _write_tokens(d, tok, eod, dtype, tmp / f"{s}.bin", cfg.num_proc) for s, d in splits.items()}
        tok.save(str(tmp / "tokenizer.json"))
        meta = {
            "source": cfg.source,
            "dtype": dtype.name,
            "eod": eod,
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
    for split, c in counts.items():
        log.info("data: %s: %d documents, %d tokens", split, c["documents"], c["tokens"])
    return path


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def load_tokens(path: Path, split: str) -> np.ndarray:
    """The split's token stream, memory-mapped (read-only, nothing loaded until used)."""
    meta = read_meta(path)
    return np.memmap(Path(path) / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")


def load_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
