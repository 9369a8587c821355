import pytest

from megatron_exp.config import ConfigError, TokenizerConfig
from megatron_exp.data import tokenizer

TEXT = "Tensor parallelism splits each layer's matrices.\n\n  Ünïcode, tabs\tand   spaces — all kept: 3.14!"


def test_gpt2_tokenizer_from_the_shipped_files_matches_gpt2():
    tok = tokenizer.gpt2(TokenizerConfig(kind="gpt2", vocab_size=50257))
    assert tok.get_vocab_size() == 50257
    assert tok.token_to_id(tokenizer.EOD) == 50256
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.decode(tok.encode(TEXT).ids) == TEXT


def test_trained_bpe_round_trips_any_text_and_puts_eod_first():
    tok = tokenizer.train_bpe(["the quick brown fox jumps over the lazy dog"] * 50, vocab_size=400)
    assert tok.token_to_id(tokenizer.EOD) == 0
    assert 257 < tok.get_vocab_size() <= 400
    assert tok.decode(tok.encode(TEXT).ids) == TEXT  # unseen characters still round trip (byte level)
    assert len(tok.encode("the quick brown fox").ids) < len("the quick brown fox")


def test_vocab_size_smaller_than_the_tokenizer_is_an_error():
    with pytest.raises(ConfigError, match=r"data.tokenizer.vocab_size=1000 is smaller than .* 50257 entries"):
        tokenizer.build(TokenizerConfig(kind="gpt2", vocab_size=1000), [])


def test_missing_gpt2_files_name_the_key(tmp_path):
    cfg = TokenizerConfig(kind="gpt2", vocab_size=50257, vocab_file=str(tmp_path / "encoder.json"))
    with pytest.raises(ConfigError, match=r"data.tokenizer.vocab_file=.*encoder.json is not a file"):
        tokenizer.gpt2(cfg)
    with pytest.raises(ConfigError, match=r"data.tokenizer.kind=word is unknown"):
        tokenizer.build(TokenizerConfig(kind="word"), [])


def test_the_tokenizer_kept_with_a_run_else_gpt2s_for_its_vocabulary_else_none(tmp_path):
    trained = tokenizer.train_bpe(["the quick brown fox jumps over the lazy dog"] * 50, vocab_size=400)
    trained.save(str(tmp_path / "tokenizer.json"))
    assert tokenizer.kept_with(tmp_path, 400).encode(TEXT).ids == trained.encode(TEXT).ids
    assert tokenizer.kept_with(tmp_path / "elsewhere", 50257).encode("Hello world").ids == [15496, 995]
    assert tokenizer.kept_with(tmp_path / "elsewhere", 400) is None
