"""A bad evaluation input is one line naming the file and what is wrong, before any worker starts."""

import pytest

from megatron_exp.config import (
    ConfigError,
    LambadaConfig,
    LambadaEvalConfig,
    TokenizerConfig,
    WikiTextConfig,
    WikiTextEvalConfig,
)
from megatron_exp.data.tokenizer import gpt2
from megatron_exp.tasks import lambada, wikitext103

GPT2 = gpt2(TokenizerConfig(kind="gpt2"))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"lambada.jsonl is empty"),
        (b'{"text": "one two"}\n{"text": "three\n', r"line 2 is not JSON"),
        (b'{"text": "one two"}\n{"body": "three four"}\n', r"line 2 has no field 'text' \(it has \['body'\]\)"),
        (b'{"text": "one two"}\n{"text": "   "}\n', r"line 2: field 'text' is blank or not text"),
        (b'{"text": "caf\xe9 au lait"}\n', r"is not UTF-8 text \(byte 13, line 1\)"),
        (b"\n\n", r"holds no records"),
        (b'{"text": "one two"}\n{"text": "alone"}\n', r"passage 2 \('alone'\) has no context before its target"),
    ],
)
def test_bad_lambada_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "lambada.jsonl"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as error:
        lambada.build_inputs(LambadaEvalConfig(task=LambadaConfig(source=str(path))), GPT2)
    assert "\n" not in str(error.value) and ("task.source" in str(error.value))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"wiki.test.tokens is empty"),
        (b" = Valkyria = \n\xff\xfe", r"is not UTF-8 text \(byte 15, line 2\)"),
        (b" \n \n", r"holds 1 token\(s\): nothing to score"),
    ],
)
def test_bad_wikitext_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "wiki.test.tokens"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as error:
        wikitext103.build_inputs(WikiTextEvalConfig(task=WikiTextConfig(source=str(path))), GPT2)
    assert "\n" not in str(error.value) and "task.source" in str(error.value)
