#!/usr/bin/env bash
# The weak-scaling study's shape on CPU processes: tiny GPTs growing with TP 1/2/4, then the table and plot.
set -euo pipefail
sweep="outputs/multirun/weak_scaling_cpu_$(date +%Y%m%d_%H%M%S)"
python -m megatron_exp.train -m "experiment=glob(cpu_weak_*)" checkpoint.save_final=false "hydra.sweep.dir=$sweep" "$@"
python -m megatron_exp.analyze "sweep=$sweep" mode=weak
