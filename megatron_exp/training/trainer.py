"""Pretraining, as the training core's work: a GPT or BERT, its samples (every DP rank its share of each global
batch), validation during the run and a final test evaluation; a GPT then shows a short sample of its text."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from tokenizers import Tokenizer

from megatron_exp.config import Config, RunSpec
from megatron_exp.data import token_store
from megatron_exp.data.bert_dataset import BERTSamples, Vocabulary
from megatron_exp.data.gpt_dataset import GPTSamples, micro_batch_positions
from megatron_exp.data.tokenizer import EOD
from megatron_exp.hardware import autocast, device_of
from megatron_exp.models import build_model, generation
from megatron_exp.models.contract import Batch
from megatron_exp.parallel import random
from megatron_exp.parallel.pipeline import PipelineLayout, bubble_fraction
from megatron_exp.parallel.sampling import Sampling
from megatron_exp.parallel.sharding import padded_vocab_size
from megatron_exp.parallel.state import ProcessGrid
from megatron_exp.training import checkpoint, flops
from megatron_exp.training.loop import Cadence, Cost, TrainingLoop, reported
from megatron_exp.training.schedule import MicroBatches, Pipeline

log = logging.getLogger(__name__)

# After training, a GPT continues this prompt by up to this many tokens: a glance at what it learned. Sampled, not
# greedy: a small model's greedy text loops on its most likely phrase ("the king of the king of ...").
SAMPLE_PROMPT, SAMPLE_TOKENS = "In the beginning", 32
SAMPLE_TEMPERATURE, SAMPLE_TOP_K, SAMPLE_TOP_P = 0.7, 40, 0.9
GENERATE_COMMAND = "python -m megatron_exp.generate"


def load_samples(cfg: Config) -> dict[str, GPTSamples | BERTSamples]:
    """Train (shuffled), valid and test samples for the model's architecture, from the prepared token cache."""
    by_sentence = cfg.model.arch == "bert"
    cache = token_store.cache_path(cfg.data, by_sentence)
    seed, seq_len = cfg.train.seed, cfg.data.seq_len
    if not by_sentence:
        return {
            split: GPTSamples(token_store.load_tokens(cache, split), seq_len, seed, split == "train", split)
            for split in ("train", "valid", "test")
        }
    vocab = Vocabulary.of(token_store.load_tokenizer(cache))
    samples = {}
    for split in ("train", "valid", "test"):
        tokens, sentences = token_store.load_tokens(cache, split), token_store.load_sentences(cache, split)
        samples[split] = BERTSamples(tokens, *sentences, vocab, seq_len, seed, split == "train", split)
    return samples


class Pretraining:
    """The model at this rank's place in the grid, and the micro-batches that this DP rank reads."""

    def __init__(self, cfg: Config, grid: ProcessGrid):
        self.cfg, self.grid = cfg, grid
        par = cfg.parallel
        self.accumulation = par.global_batch // (par.micro_batch * grid.dp.size)
        self.layout = PipelineLayout(par.pp, par.virtual_stages, cfg.model.layers)
        with torch.device(device_of(cfg.hardware)):
            recompute, seed, part = par.recompute, cfg.train.seed, self.layout.part(grid.pp.rank)
            self.model = build_model(
                cfg.model, recompute=recompute, seed=seed, part=part, sequence_parallel=par.sequence_parallel
            )
        if cfg.train.compile:
            self.model.compile_layers()
        if cfg.checkpoint.init_from and not cfg.resume:
            directory = Path(cfg.checkpoint.init_from)
            weights = checkpoint.load_model_state(directory, self.model, grid)
            checkpoint.load_into(self.model, weights, directory, "model")
            log.info("initialized the weights from %s", directory)
        self.splits = load_samples(cfg)
        m, seq = cfg.model, cfg.data.seq_len
        vocab = padded_vocab_size(m.vocab_size, grid.tp.size)
        self.cost = Cost(
            tokens=par.global_batch * seq,
            model_flops=flops.model_flops(par.global_batch, seq, m.layers, m.hidden, vocab),
            executed_flops=flops.hardware_flops(par.global_batch, seq, m.layers, m.hidden, vocab, recompute),
        )

    def describe(self) -> str:
        par, layout = self.cfg.parallel, self.layout
        text = (
            f"global batch {par.global_batch} = micro {par.micro_batch} x dp {self.grid.dp.size} x accumulation "
            f"{self.accumulation}, seq {self.cfg.data.seq_len}"
        )
        if layout.stages > 1:
            bubble = bubble_fraction(layout.stages, layout.virtual, self.accumulation)
            text += (
                f" | pipeline: {layout.stages} stages x {layout.virtual} virtual, {len(layout.chunk_layers(0))} "
                f"layers per chunk, {par.schedule} over {self.accumulation} micro-batches, bubble (p - 1) / (v m) "
                f"= {100 * bubble:.1f}%"
            )
        return text

    def _batches(self, split: str, index: int) -> list[Batch]:
        """This DP rank's micro-batches of global batch `index` (0-based) of `split`."""
        par, dp = self.cfg.parallel, self.grid.dp
        batches = []
        for micro in range(self.accumulation):
            positions = micro_batch_positions(index, micro, par.global_batch, par.micro_batch, dp.size, dp.rank)
            batches.append(Batch(*self.splits[split].micro_batch(positions)))
        return batches

    def micro_batches(self, iteration: int) -> list[Batch]:
        return self._batches("train", iteration - 1)

    def evaluate(self, iteration: int, final: bool, schedule: MicroBatches) -> dict[str, float]:
        """Mean loss terms of `eval_iters` validation batches (read from the split's start), and after the last
        iteration of the test split too (its first `test_iters` batches, or all); with their perplexity."""
        train = self.cfg.train
        splits = {"valid": train.eval_iters}
        if final:
            whole = max(1, len(self.splits["test"]) // self.cfg.parallel.global_batch)
            splits["test"] = min(whole, train.test_iters or whole)
        record = {}
        for split, count in splits.items():
            sums = schedule.evaluate([b for i in range(count) for b in self._batches(split, i)])
            values = reported([total / (count * self.accumulation) for total in sums.values()], self.grid)
            means = dict(zip(sums, values, strict=True))
            record |= {f"{split}/{name}": value for name, value in means.items()}
            record[f"{split}/ppl"] = math.exp(min(means[self.model.perplexity_term], 700.0))
        return record

    def checkpoint_meta(self, iteration: int) -> dict:
        """What a resume at another layout must keep: the global batch, and the data position as a global sample
        index (the samples read so far, in the one global order that every DP degree cuts the same way)."""
        global_batch = self.cfg.parallel.global_batch
        return {"global_batch": global_batch, "consumed_samples": iteration * global_batch}


def build(spec: RunSpec[Config], grid: ProcessGrid) -> TrainingLoop:
    """One training rank's loop: the dropout streams seeded, the work built, a checkpoint restored if resuming."""
    cfg = spec.config
    random.seed(cfg.train.seed, grid.tp.rank, device_of(cfg.hardware), stage=grid.pp.rank)
    work = Pretraining(cfg, grid)
    cadence = Cadence(
        iterations=cfg.train.iterations,
        log_interval=cfg.train.log_interval,
        eval_interval=cfg.train.eval_interval,
        checkpoint_interval=cfg.checkpoint.interval,
        keep=cfg.checkpoint.keep,
        save_final=cfg.checkpoint.save_final,
        save_on_signal=bool(cfg.checkpoint.on_signal),
    )
    loop = TrainingLoop(
        work, grid, optimizer=cfg.optimizer, hardware=cfg.hardware, cadence=cadence, run_dir=spec.run_dir,
        wandb=spec.wandb if grid.rank == 0 else None, resume=cfg.resume, pipeline=work.layout,
        schedule=cfg.parallel.schedule, seed=cfg.train.seed,
        distributed_optimizer=cfg.parallel.distributed_optimizer,
    )  # fmt: skip
    if grid.rank == 0:
        log.info(work.describe())
    return loop


def log_sample(spec: RunSpec[Config], model: torch.nn.Module, grid: ProcessGrid) -> None:
    """A GPT's sampled continuation of SAMPLE_PROMPT (seeded by train.seed, so a rerun prints the same text),
    through the generation code (KV cache, vocab-parallel sampling; at pp > 1 through the stages), printed by rank 0.
    One DP replica computes it (they hold the same model)."""
    cfg = spec.config
    if cfg.model.arch != "gpt" or grid.dp.rank != 0:
        return
    if model.sequence_parallel:
        if grid.rank == 0:
            log.info("no sample at parallel.sequence_parallel=true: generate from a checkpoint (%s)", GENERATE_COMMAND)
        return
    tokenizer = Tokenizer.from_file(str(Path(spec.run_dir) / "tokenizer.json"))
    prompt = tokenizer.encode(SAMPLE_PROMPT).ids
    tokens, real = generation.pad([prompt])
    count = min(SAMPLE_TOKENS, cfg.model.seq_len - len(prompt))
    cast = autocast(cfg.hardware.precision, model.device)
    sampling = Sampling(SAMPLE_TEMPERATURE, SAMPLE_TOP_K, SAMPLE_TOP_P, cfg.train.seed)
    pipeline = None
    if grid.pp.size > 1:
        layout = PipelineLayout(grid.pp.size, cfg.parallel.virtual_stages, cfg.model.layers)
        pipeline = Pipeline(model, grid, layout, cfg.parallel.schedule, cast)
    stop = tokenizer.token_to_id(EOD)
    (new,) = generation.generate(
        model, tokens, real, count, sampling, stop_token=stop, autocast=cast, pipeline=pipeline
    )
    if grid.rank == 0:
        settings = f"temperature {sampling.temperature}, top-k {sampling.top_k}, top-p {sampling.top_p}"
        log.info("sample (%s, seed %d): %r", settings, sampling.seed, SAMPLE_PROMPT + tokenizer.decode(new))


def train(spec: RunSpec[Config], grid: ProcessGrid) -> dict:
    """One training rank, start to end; returns the last record (a GPT then logs a sample of its text)."""
    loop = build(spec, grid)
    return loop.run(after=lambda: log_sample(spec, loop.model, grid))
