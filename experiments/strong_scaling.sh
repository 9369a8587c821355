#!/usr/bin/env bash
# The paper's strong-scaling study: the 1.2B model at batch 8 on 1/2/4/8 GPUs (TP), reported as speedup over TP=1.
set -euo pipefail
sweep="outputs/multirun/strong_scaling_$(date +%Y%m%d_%H%M%S)"
python -m megatron_exp.train -m model=gpt_1b optimizer=adam parallel.tp=1,2,4,8 parallel.micro_batch=8 \
  train.iterations=50 train.eval_interval=0 checkpoint.save_final=false "hydra.sweep.dir=$sweep" "$@"
python -m megatron_exp.analyze "sweep=$sweep" mode=strong
