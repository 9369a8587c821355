#!/usr/bin/env bash
# The 2021 PTD-P paper's layouts (Narayanan et al., Table 1 and the ZeRO-3 comparison): first the plan of each on
# 80 GB A100s, then, on a SLURM allocation of enough nodes (8 GPUs each), the run itself through torchrun.
#   bash experiments/ptd_p.sh plan                 # per-GPU memory of each layout, no GPU needed
#   srun --nodes=N --ntasks-per-node=1 bash experiments/ptd_p.sh gpt_39b   # one layout, on N x 8 GPUs
set -euo pipefail
declare -A LAYOUT=(  # tp pp global_batch, as the paper trained them (micro batch 1, interleaved where it did)
  [gpt_39b]="8 2 1536"
  [gpt_175b]="8 16 1536"
  [gpt_1t]="8 64 3072"
)
overrides() {  # the layout of model $1 as overrides
  read -r tp pp batch <<<"${LAYOUT[$1]}"
  echo "model=$1 parallel.tp=$tp parallel.pp=$pp parallel.global_batch=$batch parallel.micro_batch=1"
  echo "parallel.recompute=full hardware=a100"
}
if [[ "${1:-plan}" == plan ]]; then
  for model in gpt_39b gpt_175b gpt_1t; do
    # shellcheck disable=SC2046
    python -m megatron_exp.plan $(overrides "$model") parallel.dp=1
  done
  exit 0
fi
model=$1; shift
# shellcheck disable=SC2046
torchrun --nnodes="${SLURM_NNODES:-1}" --nproc-per-node=8 --rdzv-backend=c10d \
  --rdzv-endpoint="${MASTER_ADDR:-localhost}:29500" -m megatron_exp.train $(overrides "$model") "$@"
