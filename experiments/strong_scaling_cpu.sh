#!/usr/bin/env bash
# The strong-scaling study's shape on CPU processes: one small model at TP 1/2/4, speedup over TP=1.
set -euo pipefail
sweep="outputs/multirun/strong_scaling_cpu_$(date +%Y%m%d_%H%M%S)"
python -m megatron_exp.train -m model=gpt_mini parallel.tp=1,2,4 parallel.micro_batch=4 data.seq_len=128 \
  train.iterations=20 train.eval_interval=0 checkpoint.save_final=false "hydra.sweep.dir=$sweep" "$@"
python -m megatron_exp.analyze "sweep=$sweep" mode=strong
