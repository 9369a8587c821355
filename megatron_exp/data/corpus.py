"""Raw documents for train/valid/test, through `datasets`: a builtin corpus (data/builtin.py: the default
needs no download), a hub dataset, or local files.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from megatron_exp.config import ConfigError, DataConfig
from megatron_exp.data import builtin
from megatron_exp.data.files import check_corpus_file

if TYPE_CHECKING:
    from datasets import Dataset

SPLITS = ("train", "valid", "test")
_HUB_SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}
_FORMATS = {
    ".txt": "text", ".text": "text", ".tokens": "text", ".raw": "text", ".md": "text",
    ".json": "json", ".jsonl": "json", ".parquet": "parquet",
}  # fmt: skip


def local_files(source: str) -> list[str]:
    """Files named by a path, a directory (every file of a known format in it) or a glob; sorted."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = [str(p) for p in sorted(path.rglob("*")) if p.suffix in _FORMATS]
    else:
        files = sorted(glob.glob(str(path)))
    if not files:
        raise ConfigError(
            f"data.source={source} matches no data files: give a text/jsonl/parquet file, a directory of them, "
            f"a glob, hub:<dataset name> or builtin:<{'|'.join(builtin.BUILTIN)}>"
        )
    return files


def describe_source(cfg: DataConfig) -> dict:
    """What identifies the raw data, for the cache key: local files by path, size and modification time."""
    if cfg.source.startswith("builtin:"):
        return {"source": cfg.source, "version": builtin.get(cfg.source).version()}
    if cfg.source.startswith("hub:"):
        return {"source": cfg.source, "hub_config": cfg.hub_config}
    return {"files": [(f, os.path.getsize(f), os.path.getmtime(f)) for f in local_files(cfg.source)]}


def _split_by_fraction(docs: Dataset, fractions: list[float], groups: list[str] | None = None) -> dict[str, Dataset]:
    """A seeded shuffle of the documents cut into train/valid/test; valid and test get at least one each. With
    `groups` (one per document), the groups are shuffled and cut instead: a group's documents share a split."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or fractions[0] <= 0:
        raise ConfigError(f"data.split_fractions={fractions} must be three non-negative train/valid/test fractions")
    group_of = np.unique(groups, return_inverse=True)[1] if groups else None
    n = len(docs) if group_of is None else int(group_of.max()) + 1
    if n < 3:
        raise ConfigError(f"data.source has {n} documents: at least 3 are needed for train/valid/test splits")
    total = sum(fractions)
    counts = [max(1, round(n * f / total)) for f in fractions[1:]]
    order = np.random.default_rng(0).permutation(n)
    valid_end = counts[0]
    test_end = valid_end + counts[1]

    def documents(chosen: np.ndarray) -> np.ndarray:
        if group_of is None:
            return chosen
        return np.concatenate([np.flatnonzero(group_of == g) for g in chosen])

    return {
        "valid": docs.select(documents(order[:valid_end])),
        "test": docs.select(documents(order[valid_end:test_end])),
        "train": docs.select(np.sort(documents(order[test_end:]))),
    }


def _text_only(ds: Dataset, field: str, source: str) -> Dataset:
    if field not in ds.column_names:
        raise ConfigError(f"data.text_field={field} is not a column of {source}: columns are {ds.column_names}")
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    return ds.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)


def load_splits(cfg: DataConfig) -> dict[str, Dataset]:
    """Documents of each split as a Dataset with one `text` column."""
    # Imported here, when a cache is built: importing datasets (pandas, pyarrow) adds ~0.5 s to the start of every
    # process that imports this module, the launching process and each worker of every job among them.
    from datasets import Dataset, DatasetDict, load_dataset

    if cfg.source.startswith("builtin:"):
        groups, texts = zip(*builtin.get(cfg.source).documents(), strict=True)
        return _split_by_fraction(Dataset.from_dict({"text": list(texts)}), cfg.split_fractions, list(groups))

    if cfg.source.startswith("hub:"):
        name = cfg.source.removeprefix("hub:")
        try:
            loaded = load_dataset(name, cfg.hub_config)
        except Exception as error:  # offline, unknown name, bad config: all end the same way for the user
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(
                f"data.source={cfg.source} could not be loaded from the hub ({first_line}); check the name, "
                "data.hub_config and the network, or point data.source at local files"
            ) from error
    else:
        files = local_files(cfg.source)
        formats = {_FORMATS.get(Path(f).suffix, "text") for f in files}
        if len(formats) > 1:
            raise ConfigError(f"data.source={cfg.source} mixes formats {sorted(formats)}: use one format")
        fmt = formats.pop()
        for file in files:
            check_corpus_file(Path(file), fmt, "data.source", cfg.text_field)
        options = {"sample_by": cfg.sample_by} if fmt == "text" else {}
        try:
            loaded = DatasetDict({"train": load_dataset(fmt, data_files=files, split="train", **options)})
        except Exception as error:  # what the checks above did not foresee, still as one line
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ConfigError(f"data.source={cfg.source} could not be read ({first_line})") from error

    found = {split: next((loaded[n] for n in names if n in loaded), None) for split, names in _HUB_SPLIT_NAMES.items()}
    if found["train"] is None:
        raise ConfigError(f"data.source={cfg.source} has no train split (splits: {list(loaded)})")
    found = {split: _text_only(ds, cfg.text_field, cfg.source) if ds else None for split, ds in found.items()}
    if found["valid"] is None or found["test"] is None:
        found = _split_by_fraction(_not_blank(found["train"], "train", cfg), cfg.split_fractions)
    return {split: _not_blank(docs, split, cfg) for split, docs in found.items()}


def _not_blank(docs: Dataset, split: str, cfg: DataConfig) -> Dataset:
    if len(docs) == 0:
        raise ConfigError(
            f"data.source={cfg.source}: the {split} split has no text (every document is blank): give a corpus with "
            "text in it"
        )
    return docs
