import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_exp.config import ConfigError, DataConfig, TokenizerConfig
from megatron_exp.data import corpus, token_store

DOCS = [f"Document number {i} talks about topic {i % 7} at some length. " * (1 + i % 3) for i in range(40)]


def _config(source: str, cache_dir: str, **kw) -> DataConfig:
    return DataConfig(
        name="test", source=source, cache_dir=cache_dir, tokenizer=TokenizerConfig(kind="bpe", vocab_size=512), **kw
    )


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    return path


def test_build_writes_every_document_followed_by_eod(jsonl, cache_dir):
    path = token_store.prepare(_config(str(jsonl), cache_dir, text_field="body"))
    meta = token_store.read_meta(path)
    assert meta["dtype"] == "uint16" and meta["eod"] == 0
    assert sum(s["documents"] for s in meta["splits"].values()) == len(DOCS)
    tok = token_store.load_tokenizer(path)
    seen = []
    for split in ("train", "valid", "test"):
        tokens = token_store.load_tokens(path, split)
        assert len(tokens) == meta["splits"][split]["tokens"] and tokens[-1] == meta["eod"]
        pieces = np.split(np.asarray(tokens), np.flatnonzero(tokens == meta["eod"]) + 1)[:-1]
        assert len(pieces) == meta["splits"][split]["documents"]
        seen += [tok.decode(p[:-1].tolist()) for p in pieces]
    assert sorted(seen) == sorted(DOCS)  # the splits partition the documents, losslessly


def test_the_cache_is_reused_and_keyed_by_its_inputs(jsonl, cache_dir, monkeypatch):
    cfg = _config(str(jsonl), cache_dir, text_field="body")
    first = token_store.prepare(cfg)
    monkeypatch.setattr(corpus, "load_splits", lambda cfg: pytest.fail("the cache should have been reused"))
    assert token_store.prepare(cfg) == first
    other = _config(str(jsonl), cache_dir, text_field="body")
    other.tokenizer.vocab_size = 600
    assert token_store.cache_path(other) != first


def test_an_interrupted_build_leaves_nothing_behind(jsonl, cache_dir, monkeypatch):
    cfg = _config(str(jsonl), cache_dir, text_field="body")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(token_store, "_write_tokens", crash)
    with pytest.raises(KeyboardInterrupt):
        token_store.prepare(cfg)
    assert not token_store.cache_path(cfg).exists()
    assert list(token_store.cache_path(cfg).parent.iterdir()) == []


def test_plain_text_and_parquet_sources(tmp_path, cache_dir):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(DOCS))
    meta = token_store.read_meta(token_store.prepare(_config(str(text), cache_dir)))
    assert sum(s["documents"] for s in meta["splits"].values()) == len(DOCS)  # one document per paragraph

    folder = tmp_path / "parquet"
    folder.mkdir()
    pq.write_table(pa.table({"text": DOCS[:20]}), folder / "a.parquet")
    pq.write_table(pa.table({"text": DOCS[20:]}), folder / "b.parquet")
    meta = token_store.read_meta(token_store.prepare(_config(str(folder), cache_dir)))
    assert sum(s["documents"] for s in meta["splits"].values()) == len(DOCS)


def test_missing_data_and_wrong_fields_are_clear_errors(tmp_path, jsonl, cache_dir):
    with pytest.raises(ConfigError, match=r"^data.source=.*nothing.txt matches no data files"):
        token_store.prepare(_config(str(tmp_path / "nothing.txt"), cache_dir))
    with pytest.raises(ConfigError, match=r"data.text_field=text is not a column .* columns are \['body', 'id'\]"):
        token_store.prepare(_config(str(jsonl), cache_dir))
    with pytest.raises(ConfigError, match=r"data.source=builtin:novels is unknown"):
        token_store.prepare(_config("builtin:novels", cache_dir))


def test_python_docs_is_pythons_documentation():
    splits = corpus.load_splits(DataConfig(source="builtin:python_docs", split_fractions=[0.8, 0.1, 0.1]))
    sizes = {name: len(ds) for name, ds in splits.items()}
    assert sum(sizes.values()) >= 70 and sizes["valid"] >= 5 and sizes["test"] >= 5
    assert sum(len(t) for t in splits["train"]["text"]) > 300_000


def test_large_corpora_are_tokenized_by_several_processes_with_the_same_result(tmp_path):
    many = [f"Passage {i}: {DOCS[i % len(DOCS)]}" for i in range(2400)]
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in many))
    counts = {}
    for processes in (1, 2):
        cfg = _config(str(path), str(tmp_path / f"cache{processes}"), num_proc=processes)
        built = token_store.prepare(cfg)
        counts[processes] = token_store.read_meta(built)["splits"]
        tokens = {s: np.asarray(token_store.load_tokens(built, s)) for s in ("train", "valid", "test")}
        if processes == 1:
            serial_tokens = tokens
    assert counts[1] == counts[2] and counts[2]["train"]["documents"] > 2000  # 2 workers were used (>= 2000 docs)
    assert all(np.array_equal(serial_tokens[s], tokens[s]) for s in tokens)


def test_the_default_corpus_is_two_bible_translations_split_by_chapter():
    splits = corpus.load_splits(DataConfig(source="builtin:bible", split_fractions=[0.96, 0.02, 0.02]))
    headings = {name: [text.partition("\n")[0] for text in docs["text"]] for name, docs in splits.items()}
    assert sum(map(len, headings.values())) == 2 * 1189  # every chapter of the 66 books, in WEB and in ASV
    assert headings["train"][0] == "Genesis 1" and 40 <= len(headings["valid"]) <= 60
    chapters = {name: set(h) for name, h in headings.items()}  # ASV's "Song of Solomon" is WEB's "Song of Songs"
    assert not (chapters["train"] & chapters["valid"]) and not (chapters["train"] & chapters["test"])
    text = "".join(splits["train"]["text"])
    assert len(text) > 7_500_000 and not set("`[]\u2019") & set(text)  # apostrophes as ', no translators' marks
    assert "In the beginning God created the heavens and the earth." in text
