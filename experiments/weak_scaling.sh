#!/usr/bin/env bash
# The paper's weak-scaling study on one 8-GPU node: gpt_1b/2b/4b/8b at TP 1/2/4/8, then the scaling table and plot.
set -euo pipefail
sweep="outputs/multirun/weak_scaling_$(date +%Y%m%d_%H%M%S)"
python -m megatron_exp.train -m "experiment=glob(weak_*)" train.iterations=50 train.eval_interval=0 \
  checkpoint.save_final=false "hydra.sweep.dir=$sweep" "$@"
python -m megatron_exp.analyze "sweep=$sweep" mode=weak
