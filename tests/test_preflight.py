import pytest

from megatron_exp import preflight
from megatron_exp.config import ConfigError
from tests.conftest import compose_config


def _checked(overrides: list[str], world_size: int | None = None):
    cfg = compose_config(overrides)
    cfg = preflight.resolve(cfg, world_size, measure_peak=False)  # skip the 1 s CPU matmul probe
    preflight.validate(cfg, world_size)
    return cfg


def test_derived_values_are_filled():
    cfg = _checked(["parallel.micro_batch=4", "parallel.tp=2"])
    assert (cfg.hardware.device, cfg.hardware.backend, cfg.hardware.precision) == ("cpu", "gloo", "fp32")
    assert cfg.hardware.memory_gb > 1
    assert (cfg.parallel.dp, cfg.parallel.global_batch) == (1, 4)
    assert cfg.data.seq_len == cfg.model.seq_len
    assert cfg.optimizer.decay_iters == cfg.train.iterations
    joined = _checked(["parallel.tp=2", "parallel.micro_batch=2"], world_size=4)
    assert (joined.parallel.dp, joined.parallel.global_batch) == (2, 4)


@pytest.mark.parametrize(
    "overrides, world_size, message",
    [
        (["model.heads=6", "model.hidden=384", "parallel.tp=4"], None,
         r"^model.heads=6 is not divisible by parallel.tp=4: use a TP degree that divides the head count"),
        (["model.heads=5"], None, r"^model.hidden=256 is not divisible by model.heads=5"),
        (["parallel.global_batch=12"], None,
         r"^parallel.global_batch=12 is not a multiple of parallel.micro_batch x dp = 8 x 1: use 8 or 16$"),
        (["parallel.micro_batch=4", "parallel.global_batch=6"], 2,
         r"parallel.global_batch=6 is not a multiple of parallel.micro_batch x dp = 4 x 2: use 8 or 16"),
        (["data.seq_len=512"], None, r"^data.seq_len=512 exceeds model.seq_len=256 \(learned positions\)"),
        (["parallel.pp=3"], None,
         r"^model.layers=4 is not divisible by parallel.pp x parallel.virtual_stages = 3 x 1: each chunk needs"),
        (["parallel.pp=2", "parallel.virtual_stages=2"], None,
         r"^parallel.virtual_stages=2 needs parallel.schedule=interleaved$"),
        (["parallel.pp=2", "parallel.virtual_stages=2", "parallel.schedule=interleaved", "parallel.global_batch=24"],
         None, r"^parallel.schedule=interleaved needs the micro-batches per step \(3 = global_batch / "),
        (["parallel.virtual_stages=2", "parallel.schedule=interleaved"], None,
         r"^parallel.virtual_stages=2 interleaves pipeline stages, but parallel.pp=1: set parallel.pp > 1$"),
        (["parallel.schedule=zigzag"], None, r"^parallel.schedule=zigzag is unknown"),
        (["parallel.tp=2"], 3, r"parallel.tp x dp x pp = 2 x 1 x 1 = 2 but the job has 3 processes"),
        (["parallel.micro_batch=0"], None, r"^parallel.micro_batch=0 must be a positive integer$"),
        (["hardware=h100"], None, r"^hardware=h100 needs CUDA GPUs but torch sees none: use hardware=cpu"),
        (["optimizer.decay_style=step"], None, r"^optimizer.decay_style=step is unknown"),
        (["parallel.tp=4", "parallel.sequence_parallel=true", "data.seq_len=250"], None,
         r"^data.seq_len=250 is not divisible by parallel.tp=4, which parallel.sequence_parallel=true splits each "
         r"sequence over: set data.seq_len=248 or 252, or parallel.sequence_parallel=false$"),
        (["hardware.params=low"], None,
         r"^hardware.params=low keeps the parameters in the compute precision, but hardware.precision=fp32: set "
         r"hardware.precision=bf16 \(or fp16\), or hardware.params=fp32$"),
    ],
)  # fmt: skip
def test_each_invalid_config_fails_with_one_line_naming_the_key(overrides, world_size, message):
    with pytest.raises(ConfigError, match=message) as failure:
        _checked(overrides, world_size)
    assert "\n" not in str(failure.value)


def test_gpt_8b_at_tp8_does_not_fit_this_machine_and_says_what_would():
    with pytest.raises(ConfigError) as failure:
        _checked(["model=gpt_8b", "parallel.tp=8"])
    message = str(failure.value)
    assert "model=gpt_8b with parallel.tp=8 needs ~133 GB" in message  # 8.32B parameters x 16 bytes
    assert "8.32B parameters" in message and "on each of 8 TP ranks" in message
    assert "run it on 8 GPUs" in message and "\n" not in message


def test_gpu_memory_is_checked_per_device(monkeypatch):
    monkeypatch.setattr(preflight.torch.cuda, "device_count", lambda: 8)
    cfg = compose_config(["model=gpt_8b", "hardware=v100", "parallel.tp=1"])
    cfg = preflight.resolve(cfg)
    # fp16 parameters with fp32 main gradients and weights (hardware.params=auto is low on a GPU): 18 bytes each
    with pytest.raises(ConfigError, match=r"~150 GB .* x 18 bytes; .* each v100 GPU has 32 GB"):
        preflight.validate(cfg)
    cfg.parallel.tp = 8  # the paper's answer: 8-way TP puts ~18.7 GB of state on each 32 GB V100
    preflight.validate(cfg)
    cfg.parallel.tp, cfg.hardware.params = 1, "fp32"  # fp32 parameters under autocast: 16 bytes
    with pytest.raises(ConfigError, match=r"~133 GB .* x 16 bytes; .* each v100 GPU has 32 GB"):
        preflight.validate(cfg)


def test_more_workers_than_gpus_is_an_error(monkeypatch):
    monkeypatch.setattr(preflight.torch.cuda, "device_count", lambda: 4)
    cfg = compose_config(["model=gpt_tiny", "hardware=h100", "parallel.tp=2", "parallel.dp=4"])
    cfg = preflight.resolve(cfg)
    with pytest.raises(ConfigError, match=r"^parallel.tp x parallel.dp = 8 workers need 8 GPUs on this node but 4"):
        preflight.validate(cfg)


def test_parameter_counts_on_the_meta_device():
    cfg = compose_config(["model=gpt_8b", "parallel.tp=8"])
    per_rank, total = preflight.parameter_counts(cfg)
    h, l = 3072, 72
    assert total == 12 * l * h * h + 13 * l * h + (51200 + 1024) * h + 2 * h
    assert per_rank < total / 7
