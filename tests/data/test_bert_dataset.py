import itertools
import json

import numpy as np
import pytest

from megatron_exp.config import ConfigError, DataConfig, TokenizerConfig
from megatron_exp.data import token_store
from megatron_exp.data.bert_dataset import BERTSamples, Vocabulary, _fit, sentence_runs
from megatron_exp.data.tokenizer import train_bpe

SYLLABLES = ["ka", "lo", "mi", "ren", "tus", "vi", "do", "sha", "pel", "quor", "bin", "ga"]


def _generated_corpus(documents: int = 60, seed: int = 0) -> list[str]:
    """Documents of sentences of made-up words (1-4 syllables), so a small WordPiece splits many words."""
    rng = np.random.default_rng(seed)

    def word():
        return "".join(rng.choice(SYLLABLES, size=rng.integers(1, 5)))

    def sentence():
        return " ".join(word() for _ in range(rng.integers(3, 12))).capitalize() + rng.choice([".", "!", "?"])

    return [" ".join(sentence() for _ in range(rng.integers(2, 12))) for _ in range(documents)]


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert-data")
    source = root / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in _generated_corpus()))
    cfg = DataConfig(
        name="generated",
        source=str(source),
        cache_dir=str(root / "cache"),
        split_fractions=[0.8, 0.1, 0.1],
        tokenizer=TokenizerConfig(kind="wordpiece", vocab_size=120),
    )
    return token_store.prepare(cfg, by_sentence=True)


def _samples(path, seq_len=64, seed=0, split="train") -> BERTSamples:
    vocab = Vocabulary.of(token_store.load_tokenizer(path))
    tokens = token_store.load_tokens(path, split)
    return BERTSamples(tokens, *token_store.load_sentences(path, split), vocab, seq_len, seed, split=split)


def test_sentence_runs_close_at_the_target_or_the_document_end_with_two_sentences():
    lengths = np.array([3, 4, 5, 2, 7, 1, 1])
    documents = np.array([4, 1, 2])  # the middle document has one sentence: no pair can come from it
    assert sentence_runs(lengths, documents, target=6).tolist() == [[0, 2], [2, 4], [5, 7]]


def test_fit_trims_the_longer_segment_token_by_token():
    def one_at_a_time(a, b, room):  # the rule, literally
        while a + b > room:
            a, b = (a - 1, b) if a > b else (a, b - 1)
        return a, b

    for a, b, room in itertools.product(range(30), range(30), range(50)):
        assert _fit(a, b, room) == one_at_a_time(a, b, room), (a, b, room)


def test_split_sentences():
    text = "First one. Second one!  Third?\nA heading\n\nLast line"
    assert token_store.split_sentences(text) == ["First one.", "Second one!", "Third?", "A heading", "Last line"]


def test_cache_keeps_sentence_and_document_counts(corpus_cache):
    meta = token_store.read_meta(corpus_cache)
    assert meta["by_sentence"]
    for split in ("train", "valid", "test"):
        lengths, documents = token_store.load_sentences(corpus_cache, split)
        assert lengths.sum() == meta["splits"][split]["tokens"] == len(token_store.load_tokens(corpus_cache, split))
        assert len(documents) == meta["splits"][split]["documents"] and documents.sum() == len(lengths)


def _original(sample) -> np.ndarray:
    ids = sample["ids"].copy()
    ids[sample["positions"]] = sample["targets"]
    return ids


def test_masking_statistics_and_whole_words(corpus_cache):
    data = _samples(corpus_cache)
    v = data.vocab
    special = {v.cls, v.sep, v.pad}
    real = chosen = as_mask = kept = randomized = partial_words = 0
    continuation_pieces = 0
    for position in range(1500):
        s = data.sample(position)
        ids, original, positions = s["ids"], _original(s), s["positions"]
        real += len(ids)
        chosen += len(positions)
        assert not set(original[positions]) & special  # [CLS]/[SEP] are never chosen
        sep = np.flatnonzero(original == v.sep)
        assert original[0] == v.cls and len(sep) == 2 and sep[1] == len(ids) - 1
        np.testing.assert_array_equal(ids[original != ids], ids[positions][original[positions] != ids[positions]])
        as_mask += int((ids[positions] == v.mask).sum())
        kept += int((ids[positions] == original[positions]).sum())
        randomized += int(((ids[positions] != v.mask) & (ids[positions] != original[positions])).sum())
        # whole words: a continuation piece is chosen exactly when the piece before it is
        selected = np.zeros(len(ids), dtype=bool)
        selected[positions] = True
        continues = v.continues_word[original] & (np.arange(len(ids)) > 0)
        continues &= ~np.isin(np.roll(original, 1), list(special))
        continuation_pieces += int(continues.sum())
        partial_words += int((selected[continues] != selected[np.flatnonzero(continues) - 1]).sum())
    assert continuation_pieces > 1000  # the corpus really has multi-piece words
    assert partial_words == 0
    assert chosen / real == pytest.approx(0.15, abs=0.01)
    assert as_mask / chosen == pytest.approx(0.8, abs=0.03)
    assert kept / chosen == pytest.approx(0.1, abs=0.02)
    assert randomized / chosen == pytest.approx(0.1, abs=0.02)


def _contains(stream: np.ndarray, piece: np.ndarray) -> bool:
    starts = np.flatnonzero(stream[: len(stream) - len(piece) + 1] == piece[0])
    return any(np.array_equal(stream[s : s + len(piece)], piece) for s in starts)


def test_sentence_order_pairs_types_and_padding(corpus_cache):
    data = _samples(corpus_cache, seq_len=48)
    stream = np.asarray(token_store.load_tokens(corpus_cache, "train"), dtype=np.int64)
    v = data.vocab
    labels = []
    for position in range(300):
        s = data.sample(position)
        original = _original(s)
        first_sep = int(np.flatnonzero(original == v.sep)[0])
        a, b = original[1:first_sep], original[first_sep + 1 : -1]
        assert len(a) and len(b) and len(original) <= 48
        # in corpus order the pair is A then B; swapped (label 1), B then A
        assert _contains(stream, np.concatenate([b, a]) if s["sop"] else np.concatenate([a, b]))
        np.testing.assert_array_equal(s["types"], (np.arange(len(original)) > first_sep).astype(np.int64))
        labels.append(s["sop"])
    assert np.mean(labels) == pytest.approx(0.5, abs=0.08)

    inputs, targets = data.micro_batch(range(4))
    lengths = inputs["padding_mask"].sum(1)
    for row, length in enumerate(lengths.tolist()):
        assert (inputs["tokens"][row, length:] == v.pad).all() and (inputs["token_types"][row, length:] == 0).all()
        assert not targets["mlm_mask"][row, length:].any()


def test_samples_are_deterministic_per_position_and_remasked_in_later_epochs(corpus_cache):
    data, again = _samples(corpus_cache), _samples(corpus_cache)
    for position in (0, 7):
        first, second = data.sample(position), again.sample(position)
        np.testing.assert_array_equal(first["ids"], second["ids"])
        np.testing.assert_array_equal(first["positions"], second["positions"])
    unshuffled = BERTSamples(data.tokens, *token_store.load_sentences(corpus_cache, "train"), data.vocab, 64, 0, False)
    later = unshuffled.sample(len(unshuffled))  # the same sentence run, one epoch later
    assert not np.array_equal(unshuffled.sample(0)["positions"], later["positions"])


def test_bert_needs_a_wordpiece_vocabulary():
    with pytest.raises(ConfigError, match="data/tokenizer=wordpiece_8k"):
        Vocabulary.of(train_bpe(["some text for a tiny byte-level vocabulary"], 300))
