"""Reading the user's files so that a bad one is one clear line (a ConfigError naming the file, the line, and what
is wrong with it) before any worker starts, instead of a decoder's or pyarrow's traceback inside one."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_exp.config import ConfigError


def read_text(path: Path, key: str) -> str:
    """A whole UTF-8 text file; `key` is the config key that named it (for the message)."""
    data = _read_bytes(path, key)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(
            f"{key}: {path} is not UTF-8 text (byte {error.start}, line {line}): give a UTF-8 text file (binary files "
            "and other encodings cannot be read)"
        ) from None


def read_json(path: Path, key: str, fields: tuple[str, ...]) -> dict:
    """A file holding one JSON object with (at least) `fields`."""
    text = read_text(path, key)
    try:
        item = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{key}: {path} is not valid JSON (line {error.lineno}: {error.msg})") from None
    missing = [name for name in fields if not isinstance(item, dict) or name not in item]
    if missing:
        raise ConfigError(f"{key}: {path} has no field {missing[0]!r}: each file needs {', '.join(fields)}")
    return item


def read_jsonl(path: Path, key: str, field: str | None = None) -> list:
    """The objects of a JSON-lines file (blank lines skipped), or a JSON array file; with `field`, that field of
    each object, which must be a non-empty string."""
    text = read_text(path, key)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{key}: {path} is not valid JSON (line {error.lineno}: {error.msg})") from None
        numbered = list(enumerate(rows, start=1))
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ConfigError(
                    f"{key}: {path} line {number} is not JSON ({error.msg}): each line must be one JSON object"
                ) from None
    if not numbered:
        raise ConfigError(f"{key}: {path} holds no records: give a file with one JSON object per line")
    if field is None:
        return [row for _, row in numbered]
    values = []
    for number, row in numbered:
        if not isinstance(row, dict) or field not in row:
            have = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ConfigError(f"{key}: {path} line {number} has no field {field!r} (it has {have}): set the field")
        if not isinstance(row[field], str) or not row[field].strip():
            raise ConfigError(f"{key}: {path} line {number}: field {field!r} is blank or not text")
        values.append(row[field])
    return values


def check_corpus_file(path: Path, fmt: str, key: str, field: str) -> None:
    """A training corpus file, read line by line (corpora can be large): text must be UTF-8, JSON lines must parse
    and carry `field`, parquet must be parquet."""
    _read_bytes(path, key, whole=False)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            columns = pq.read_schema(path).names
        except Exception as error:
            raise ConfigError(
                f"{key}: {path} is not a readable parquet file ({type(error).__name__}: {error})"
            ) from None
        if field not in columns:
            raise ConfigError(f"data.text_field={field} is not a column of {path}: columns are {columns}")
        return
    with open(path, "rb") as f:
        if fmt == "json" and f.read(64).lstrip().startswith(b"["):
            read_jsonl(path, key, field)  # a JSON array: parsed whole
            return
        f.seek(0)
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ConfigError(
                    f"{key}: {path} line {number} is not UTF-8 text (byte {error.start} of the line): give UTF-8 "
                    "text (binary files and other encodings cannot be read)"
                ) from None
            if fmt != "json" or not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(
                    f"{key}: {path} line {number} is not JSON ({error.msg}): each line must be one JSON object"
                ) from None
            if not isinstance(row, dict) or field not in row:
                have = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ConfigError(
                    f"data.text_field={field} is not a column of {path} (line {number}): columns are {have}"
                )


def _read_bytes(path: Path, key: str, whole: bool = True) -> bytes:
    """The file's bytes (or nothing, with `whole` false), once it is known to exist and not to be empty."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: {path} is not a file: give the path of an existing file")
    if path.stat().st_size == 0:
        raise ConfigError(f"{key}: {path} is empty: give a file with data in it")
    return path.read_bytes() if whole else b""
