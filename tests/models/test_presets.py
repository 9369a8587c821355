"""The model presets in conf/model: they load into the schema, and the paper's sizes have the paper's counts."""

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from megatron_exp.config import ModelConfig
from megatron_exp.models.bert import BERTModel
from megatron_exp.models.gpt import GPTModel
from megatron_exp.parallel import state
from megatron_exp.parallel.sharding import ShardSpec
from tests.conftest import compose_config

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
GPT_PRESETS = sorted(p.stem for p in CONF.glob("gpt_*.yaml"))
BERT_PRESETS = sorted(p.stem for p in CONF.glob("bert_*.yaml"))


def load_preset(name: str, **overrides) -> ModelConfig:
    schema = OmegaConf.structured(ModelConfig)
    preset = OmegaConf.load(CONF / f"{name}.yaml")
    preset.pop("defaults", None)  # BERT presets select a tokenizer: composition, not the model's fields
    return OmegaConf.to_object(OmegaConf.merge(schema, preset, overrides))


def test_every_preset_is_there():
    expected = {"gpt_tiny", "gpt_mini", "gpt_124m", "gpt_355m", "gpt_1b", "gpt_2b", "gpt_4b", "gpt_8b"}
    assert expected <= set(GPT_PRESETS)
    assert {"bert_tiny", "bert_mini", "bert_336m", "bert_1b", "bert_4b"} <= set(BERT_PRESETS)


@pytest.mark.parametrize("name", GPT_PRESETS + BERT_PRESETS)
def test_preset_loads_into_the_schema_and_is_valid(name):
    cfg = load_preset(name)
    cfg.validate(tp=1)
    assert cfg.arch == name.split("_")[0]


@pytest.mark.parametrize(
    "name, unit, paper", [("bert_336m", 1e6, "336"), ("bert_1b", 1e9, "1.3"), ("bert_4b", 1e9, "3.9")]
)
def test_bert_parameter_counts_match_the_papers_sizes(name, unit, paper):
    cfg = load_preset(name, vocab_size=30522)
    with torch.device("meta"):
        count = sum(p.numel() for p in BERTModel(cfg).parameters())
    decimals = len(paper.partition(".")[2])  # the paper's precision
    assert f"{count / unit:.{decimals}f}" == paper


def test_unknown_key_in_a_preset_is_an_error():
    with pytest.raises(Exception, match="hiden"):
        OmegaConf.merge(OmegaConf.structured(ModelConfig), {"hiden": 12})


@pytest.mark.parametrize(
    "name, rounded",
    [("gpt_355m", "0.36"), ("gpt_1b", "1.2"), ("gpt_2b", "2.5"), ("gpt_4b", "4.2"), ("gpt_8b", "8.3")],
)
def test_parameter_counts_follow_the_papers_formula_on_the_meta_device(name, rounded):
    cfg = load_preset(name, vocab_size=51200)  # the paper's padded vocabulary
    with torch.device("meta"):
        model = GPTModel(cfg)
    assert all(p.is_meta for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    l, h, v, s = cfg.layers, cfg.hidden, cfg.vocab_size, cfg.seq_len
    # 12 l h^2 (1 + 13/(12h) + (V+s)/(12 l h)), in integers; the formula leaves out the final layernorm (2h).
    paper = 12 * l * h * h + 13 * l * h + (v + s) * h
    assert count - 2 * h == paper
    assert f"{paper / 1e9:.{len(rounded.split('.')[1])}f}" == rounded
    if name == "gpt_8b":
        assert paper == 8_317_034_496  # DESIGN.md's worked example


@pytest.mark.parametrize(
    "name, rounded, exact",
    [
        ("gpt_39b", "39.1", 39_096_041_472),
        ("gpt_175b", "174.6", 174_615_846_912),
        ("gpt_1t", "1008.0", 1_008_038_758_400),
    ],
)
def test_the_2021_papers_presets_have_its_sizes(name, rounded, exact):
    cfg = load_preset(name, vocab_size=51200)
    assert cfg.seq_len == 2048
    with torch.device("meta"):
        count = sum(p.numel() for p in GPTModel(cfg).parameters())
    assert count == exact and f"{count / 1e9:.1f}" == rounded  # the count the preset's comment states
    assert f"{exact:,}" in (CONF / f"{name}.yaml").read_text()


def _composed_count(name: str, tp: int) -> int:
    """Parameters of the whole model that `model=<name> parallel.tp=<tp>` builds (its preset's tokenizer included),
    counted on the meta device from one TP rank's shard."""
    cfg = compose_config([f"model={name}", f"parallel.tp={tp}"]).model
    model_class = BERTModel if cfg.arch == "bert" else GPTModel
    with torch.device("meta"), state.use(state.virtual(tp=tp)):
        shard = model_class(cfg)
    return sum(p.numel() * (tp if ShardSpec.of(p).dim is not None else 1) for p in shard.parameters())


# A count in a preset's comment: "N parameters" (at TP=1), "N parameters at TP=k", or "N at TP=k".
_STATED = re.compile(r"(\d{1,3}(?:,\d{3})+)( parameters)?(?: at TP=(\d+))?")


def _stated_counts(name: str) -> list[tuple[int, int]]:
    lines = (CONF / f"{name}.yaml").read_text().splitlines()
    comment = " ".join(line.lstrip("# ") for line in lines if line.startswith("#"))
    return [(int(m[1].replace(",", "")), int(m[3] or 1)) for m in _STATED.finditer(comment) if m[2] or m[3]]


@pytest.mark.parametrize("name", GPT_PRESETS + BERT_PRESETS)
def test_every_presets_comment_states_its_parameter_count_with_its_tokenizer(name):
    stated = _stated_counts(name)
    assert stated, f"conf/model/{name}.yaml states no parameter count"
    for count, tp in stated:
        assert _composed_count(name, tp) == count, f"{name} at TP={tp}"


@pytest.mark.parametrize("name", ["gpt_124m", "gpt_355m", "gpt_1b", "gpt_2b", "gpt_4b", "gpt_8b", "gpt_39b"])
def test_the_papers_gpt_presets_select_gpt2s_bpe(name):
    assert compose_config([f"model={name}"]).data.tokenizer.kind == "gpt2"


def test_gpt_8b_at_tp8_pads_the_gpt2_vocabulary_to_the_papers_51200():
    cfg = compose_config(["model=gpt_8b", "parallel.tp=8"]).model  # the preset alone selects GPT-2's BPE
    assert cfg.vocab_size == 50257
    l, h = cfg.layers, cfg.hidden
    paper = 12 * l * h * h + 13 * l * h + (51200 + 1024) * h  # the paper's formula leaves out the final layernorm
    assert paper == 8_317_034_496 and _composed_count("gpt_8b", 8) == paper + 2 * h
