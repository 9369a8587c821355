"""`python -m megatron_exp.generate checkpoint=... prompt="..."`: continue prompts with a GPT checkpoint.

The checkpoint loads at any TP x PP layout (whichever layout it was saved at); its tokenizer is the one kept with
it, as for the evaluations. All prompts go through the model as one batch, left-padded; each TP worker keeps the
KV cache of its heads and its vocabulary slice of the logits, and at pp > 1 each stage its layers and their cache,
the last stage sampling the tokens that every stage feeds next (megatron_exp/models/generation.py).
The texts are printed and written to results.json in the run directory.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from omegaconf import DictConfig

from megatron_exp import entry, hardware
from megatron_exp.config import ConfigError, GenerateConfig, RunSpec, check_ranges
from megatron_exp.data.tokenizer import EOD
from megatron_exp.hardware import device_of
from megatron_exp.models import generation
from megatron_exp.parallel import state
from megatron_exp.parallel.sampling import Sampling
from megatron_exp.tasks import common

log = logging.getLogger("megatron_exp.generate")


def prompts_of(cfg: GenerateConfig) -> list[str]:
    """`prompt` as a list of texts: one text, or a list of them."""
    texts = list(cfg.prompt) if isinstance(cfg.prompt, list | tuple) else [cfg.prompt]
    if not texts:
        raise ConfigError("prompt=[] holds no text: give prompt=<text> or a list of texts")
    return [str(text) for text in texts]


def prepare(composed: GenerateConfig, run_dir: str, joined: bool) -> RunSpec[GenerateConfig]:
    """Check the options, the checkpoint, its model and the prompts (encoded with the checkpoint's tokenizer)."""
    cfg = copy.deepcopy(composed)
    check_ranges(cfg)
    if cfg.top_p > 1:
        raise ConfigError(f"top_p={cfg.top_p} must be in (0, 1]: 1 keeps every token")
    directory, model = common.gpt_checkpoint(cfg, "it does not generate text: give a GPT checkpoint")
    cfg.parallel.dp = 1
    tokenizer = common.load_tokenizer(cfg, directory, model)
    texts = prompts_of(cfg)
    prompts = [tokenizer.encode(text).ids for text in texts]
    room = model.seq_len - cfg.max_new_tokens
    if room < 1:
        raise ConfigError(
            f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the model's {model.seq_len} "
            f"positions: use max_new_tokens < {model.seq_len}"
        )
    for index, ids in enumerate(prompts):
        if not ids:
            raise ConfigError(f"prompt {index + 1} is empty: every prompt needs at least one token")
        if len(ids) > room:
            raise ConfigError(
                f"prompt {index + 1} is {len(ids)} tokens, longer than the model's {model.seq_len} positions - "
                f"max_new_tokens={cfg.max_new_tokens} = {room}: shorten it or lower max_new_tokens"
            )
    workers = cfg.parallel.tp * cfg.parallel.pp
    cfg.hardware = hardware.resolve(cfg.hardware, workers, measure_peak=False)
    stop = tokenizer.token_to_id(EOD) if cfg.stop_at_eod else None
    inputs = {"checkpoint": str(directory), "texts": texts, "prompts": prompts, "stop": stop, "tokenizer": tokenizer}
    return RunSpec(cfg, run_dir, workers, joined, None, inputs)


def generate_rank(spec: RunSpec[GenerateConfig], grid: state.ProcessGrid) -> dict:
    """One rank: its TP shard of its pipeline stage, then the new tokens of every prompt (the same on every
    rank)."""
    cfg, inputs = spec.config, spec.inputs
    device = device_of(cfg.hardware)
    autocast = hardware.autocast(cfg.hardware.precision, device)
    model, pipeline = common.load_stage(Path(inputs["checkpoint"]), grid, device, cfg.parallel, autocast)
    sampling = Sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    tokens, real = generation.pad(inputs["prompts"], side="left")
    new = generation.generate(model, tokens, real, cfg.max_new_tokens, sampling, inputs["stop"], autocast, pipeline)
    return {"new_tokens": new}


def report(spec: RunSpec[GenerateConfig], result: dict) -> dict:
    """The texts, printed and as results.json."""
    cfg, inputs = spec.config, spec.inputs
    samples = [
        {"prompt": text, "completion": inputs["tokenizer"].decode(new), "new_tokens": len(new)}
        for text, new in zip(inputs["texts"], result["new_tokens"], strict=True)
    ]
    shown = "\n".join(f"[{i + 1}] {s['prompt']}{s['completion']}" for i, s in enumerate(samples))
    log.info("generated (%s):\n%s", Path(spec.run_dir) / "results.json", shown)
    settings = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
    return {
        "checkpoint": inputs["checkpoint"],
        "tp": cfg.parallel.tp,
        "pp": cfg.parallel.pp,
        **{key: getattr(cfg, key) for key in settings},
        "samples": samples,
    }


@entry.hydra_app("generate")
def main(raw: DictConfig) -> dict | None:
    return entry.run(raw, GenerateConfig, prepare, generate_rank, report)


if __name__ == "__main__":
    main()
