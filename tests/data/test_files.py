"""A bad training corpus or input file is one line naming the file and what is wrong, before any worker."""

import json

import pytest

from megatron_exp.config import ConfigError, DataConfig, TokenizerConfig
from megatron_exp.data import corpus
from megatron_exp.data.files import read_jsonl, read_text

CASES = {
    "empty.txt": (b"", r"empty.txt is empty"),
    "binary.txt": (b"ok\n\xff\xfe\x00\x81 not text\n", r"binary.txt line 2 is not UTF-8 text"),
    "broken.jsonl": (b'{"text": "fine"}\n{"text": oops}\n', r"broken.jsonl line 2 is not JSON"),
    "fields.jsonl": (b'{"text": "fine"}\n{"body": "other"}\n', r"text is not a column of .*fields.jsonl \(line 2\)"),
    "fake.parquet": (b"not a parquet file", r"fake.parquet is not a readable parquet file"),
    "blank.txt": (b"\n\n   \n\n", r"has no text \(every document is blank\)"),
}


@pytest.mark.parametrize("name", CASES)
def test_a_bad_corpus_file_is_one_line_naming_it(tmp_path, name):
    content, message = CASES[name]
    (tmp_path / name).write_bytes(content)
    cfg = DataConfig(source=str(tmp_path / name), tokenizer=TokenizerConfig(kind="bpe"))
    with pytest.raises(ConfigError, match=message) as failure:
        corpus.load_splits(cfg)
    assert "\n" not in str(failure.value) and str(failure.value).startswith("data.")


def test_evaluation_inputs_are_read_with_their_line_numbers(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one passage", "another"]) + "\n")
    assert read_jsonl(good, "task.source", "text") == ["one passage", "another"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": "   "}\n')
    with pytest.raises(ConfigError, match=r"^task.source: .*bad.jsonl line 2: field 'text' is blank"):
        read_jsonl(bad, "task.source", "text")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.txt is not UTF-8 text \(byte 3, line 1\)"):
        read_text(tmp_path / "latin1.txt", "task.source")
    with pytest.raises(ConfigError, match=r"missing.txt is not a file"):
        read_text(tmp_path / "missing.txt", "task.source")
