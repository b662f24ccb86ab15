#!/usr/bin/env bash
# One Slurm task = one training rank: torch.distributed's variables from Slurm's, then the command.
# srun starts it on every node (launch/slurm/train.sbatch); MASTER_ADDR and MASTER_PORT come
# from the batch script. `exec`, so that signals srun forwards reach Python itself.
set -euo pipefail
export RANK="$SLURM_PROCID" WORLD_SIZE="$SLURM_NTASKS" LOCAL_RANK="$SLURM_LOCALID"
exec "$@"
