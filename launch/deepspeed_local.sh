#!/usr/bin/env bash
# Train on one machine with the DeepSpeed launcher: one process per GPU (or CPU ranks with gloo).
#   launch/deepspeed_local.sh 8 experiment=h100_350m moe.ep_size=8
#   launch/deepspeed_local.sh 2 model=gpt_tiny moe.ep_size=2 trainer.max_steps=20    # 2 CPU ranks
# --no_local_rank keeps Hydra's command line clean (DeepSpeed sets LOCAL_RANK in the environment).
#
# Environment (all optional): MASTER_PORT (default 29500; two jobs on one machine need two ports),
# LOG_DIR (one log file per rank there, instead of this terminal), PYTHON (default
# .venv/bin/python), DRY_RUN=1 (print the command, run nothing). Everything else in the
# environment (NCCL_*, WANDB_*, ...) reaches the ranks as it is.
set -euo pipefail
ranks="${1:?usage: $0 NUM_RANKS [hydra overrides...]}"
shift
[[ "$ranks" =~ ^[1-9][0-9]*$ ]] || { echo "error: NUM_RANKS must be a positive integer, got '$ranks'" >&2; exit 2; }
# LOG_DIR is relative to where the caller ran this, not to the checkout.
log_dir="${LOG_DIR:+$(realpath -m "$LOG_DIR")}"
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # CPU ranks: one thread each, or two ranks fight over the same cores.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
command=("${PYTHON:-.venv/bin/python}" -m deepspeed.launcher.runner --num_gpus "$ranks" --no_local_rank
  --master_port "${MASTER_PORT:-29500}")
if [ -n "$log_dir" ]; then
  command+=(--enable_each_rank_log "$log_dir")
fi
command+=(--module train "$@")
if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${command[@]}"
  echo
  exit 0
fi
if [ -n "$log_dir" ]; then
  mkdir -p "$log_dir"
  echo "per-rank logs: $log_dir/<date-time>_rank<N>.log"
fi
exec "${command[@]}"
