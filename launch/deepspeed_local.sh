#!/usr/bin/env bash
# Train on one machine with the DeepSpeed launcher: one process per GPU (or CPU ranks with gloo).
#   launch/deepspeed_local.sh 8 experiment=smoke moe.ep_size=8
# --no_local_rank keeps Hydra's command line clean (DeepSpeed sets LOCAL_RANK in the environment).
set -euo pipefail
ranks="${1:?usage: $0 NUM_RANKS [hydra overrides...]}"
shift
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  # CPU ranks: one thread each, or two ranks fight over the same cores.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
exec "${PYTHON:-.venv/bin/python}" -m deepspeed.launcher.runner --num_gpus "$ranks" --no_local_rank \
  --master_port "${MASTER_PORT:-29500}" --module train "$@"
