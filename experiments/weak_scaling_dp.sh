#!/usr/bin/env bash
# The paper's model + data parallel weak scaling on SLURM (pip install -e ".[slurm]"): each model at its TP degree
# times 64-way DP, global batch 512, i.e. 64/128/256/512 GPUs on 8-GPU nodes. Pass the partition and so on:
#   bash experiments/weak_scaling_dp.sh hydra.launcher.partition=gpu
set -uo pipefail  # a size that fails to submit or run is listed by the analysis, not fatal
sweep="outputs/multirun/weak_scaling_dp_$(date +%Y%m%d_%H%M%S)"
for pair in 1b:1 2b:2 4b:4 8b:8; do
  size=${pair%:*}; tp=${pair#*:}
  python -m megatron_exp.train -m "experiment=weak_${size}_tp${tp}" hydra/launcher=slurm \
    "hydra.launcher.nodes=$((tp * 64 / 8))" parallel.global_batch=512 train.iterations=50 train.eval_interval=0 \
    checkpoint.save_final=false "hydra.sweep.dir=$sweep/${size}" "$@"
done
python -m megatron_exp.analyze "sweep=$sweep" mode=weak  # finds the jobs of all four sizes under $sweep
