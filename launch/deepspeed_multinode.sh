#!/usr/bin/env bash
# Train on several machines with the DeepSpeed launcher: it reads an MPI-style hostfile
# ("worker-0 slots=8", one line per node), reaches every node with pdsh over passwordless ssh and
# starts one process per slot there.
#
#   launch/deepspeed_multinode.sh HOSTFILE [hydra overrides...]
#   DRY_RUN=1 launch/deepspeed_multinode.sh hostfile experiment=h100_350m    # print, run nothing
#
# Run it from a node that can ssh to every host, in a checkout at the same path on every node (a
# shared file system), with the same virtualenv there. Or without ssh: run it on every node
# yourself with NODE_RANK=0, 1, ... (the launcher's --no_ssh mode).
#
# Environment (all optional):
#   MASTER_ADDR    address of rank 0 (default: the first host of the hostfile)
#   MASTER_PORT    default 29500
#   NUM_NODES      use the first N hosts of the hostfile (default: all)
#   GPUS_PER_NODE  use the first N slots of every host (default: the hostfile's slots)
#   LOG_DIR        one log file per rank, on each node (default runs/logs/<date-time>; "none": the
#                  ranks write to this terminal, through pdsh)
#   FORWARD_ENV    extended regular expression of the variable names handed to every node. DeepSpeed
#                  itself passes NCCL_*, PYTHON*, UCX_*, MV2_*, MLFLOW_*; the default adds the rest a
#                  run needs: OMP_NUM_THREADS, TORCH_*, PYTORCH_*, CUDA_DEVICE_MAX_CONNECTIONS,
#                  DS_ACCELERATOR, GLOO_*, HF_*, WANDB_MODE/PROJECT/ENTITY/DIR (never a secret: names
#                  holding TOKEN, SECRET, PASSWORD, CREDENTIAL or _KEY stay behind; put keys in ~/.netrc). They go into a file that DeepSpeed reads
#                  (DS_ENV_FILE, its .deepspeed_env mechanism) and exports in the pdsh command.
#   NODE_RANK      launch only this node's ranks, without ssh (--no_ssh)
#   PYTHON         default $VENV/bin/python (VENV default .venv; the Docker image sets VENV=/opt/conda)
#   DRY_RUN=1      print the command and the forwarded variables, run nothing
set -euo pipefail
hostfile="${1:?usage: $0 HOSTFILE [hydra overrides...]}"
shift
[ -f "$hostfile" ] || { echo "error: hostfile $hostfile does not exist" >&2; exit 2; }
for name in NUM_NODES GPUS_PER_NODE; do
  value="${!name:-}"
  if [ -n "$value" ] && ! [[ "$value" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: $name must be a positive integer, got '$value'" >&2; exit 2
  fi
done
if [ -n "${NODE_RANK:-}" ] && ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]]; then
  echo "error: NODE_RANK must be a node index (0, 1, ...), got '$NODE_RANK'" >&2; exit 2
fi
# Paths given by the caller are relative to where they ran this, not to the checkout.
hostfile="$(realpath "$hostfile")"
log_dir="${LOG_DIR:-}"
[ -n "$log_dir" ] && [ "$log_dir" != none ] && log_dir="$(realpath -m "$log_dir")"
here="$(cd "$(dirname "$0")/.." && pwd)"
# The ranks run in the checkout, as the Slurm job does: relative paths in the overrides are taken from
# there; the check names the file meant when one is relative to the caller's directory instead.
export MOE_GPT_CALLER_DIR="$PWD"
cd "$here"
source launch/preflight.sh

first_host="$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$hostfile")"
[ -n "$first_host" ] || { echo "error: hostfile $hostfile names no host (expected lines like 'worker-0 slots=8')" >&2; exit 2; }
master_addr="${MASTER_ADDR:-$first_host}"
master_port="${MASTER_PORT:-29500}"
log_dir="${log_dir:-runs/logs/$(date +%Y%m%d-%H%M%S)}"
forward="${FORWARD_ENV:-^(NCCL_.*|OMP_NUM_THREADS|TORCH_.*|PYTORCH_.*|CUDA_DEVICE_MAX_CONNECTIONS|DS_ACCELERATOR|GLOO_.*|HF_.*|WANDB_(MODE|PROJECT|ENTITY|DIR))$}"

# Forwarded variables: KEY=VALUE lines, as DeepSpeed's .deepspeed_env; in a file of this launch,
# not in the checkout or the home directory.
env_file="$(mktemp "${TMPDIR:-/tmp}/moe-gpt-deepspeed-env.XXXXXX")"
trap 'rm -f "$env_file"' EXIT
# DeepSpeed puts each line into the pdsh command as `export NAME=VALUE;`, which the node's shell
# parses: the value goes shell-quoted (TORCH_CUDA_ARCH_LIST=8.0;9.0 would end at the `;`). Names of
# secrets are never forwarded, whatever FORWARD_ENV says: that command line is visible in `ps` on
# every node (HF_TOKEN matches the default HF_.*).
while IFS= read -r name; do
  value="${!name}"
  [[ "$value" == *$'\n'* ]] && continue  # one line per variable: multi-line values cannot travel
  printf '%s=%q\n' "$name" "$value" >>"$env_file"
done < <(compgen -e | grep -E "$forward" | grep -Ev '(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|_KEY)' || true)

command=("${PYTHON:-${VENV:-.venv}/bin/python}" -m deepspeed.launcher.runner --hostfile "$hostfile"
  --master_addr "$master_addr" --master_port "$master_port" --no_local_rank --log_level "${DS_LOG_LEVEL:-warning}")
[ -n "${NUM_NODES:-}" ] && command+=(--num_nodes "$NUM_NODES")
[ -n "${GPUS_PER_NODE:-}" ] && command+=(--num_gpus "$GPUS_PER_NODE")
if [ "$log_dir" != none ]; then
  log_dir="$(realpath -m "$log_dir")"
  command+=(--enable_each_rank_log "$log_dir")
fi
[ -n "${NODE_RANK:-}" ] && command+=(--no_ssh --node_rank "$NODE_RANK")
# One active host that is not this machine: DeepSpeed would start the ranks here, on this machine, while
# MASTER_ADDR names that host (the rendezvous would hang); --force_multi sends them to it.
active_hosts="$(awk -v nodes="${NUM_NODES:-0}" '!/^[[:space:]]*(#|$)/ { hosts++ } END { print (nodes > 0 && nodes < hosts) ? nodes : hosts }' "$hostfile")"
uses_pdsh=""
if [ -z "${NODE_RANK:-}" ] && [ "$active_hosts" -eq 1 ] \
  && ! [[ "$first_host" =~ ^(localhost|127\.0\.0\.1|$(hostname -s)|$(hostname))$ ]]; then
  command+=(--force_multi)
  uses_pdsh=1
fi
[ -z "${NODE_RANK:-}" ] && [ "$active_hosts" -gt 1 ] && uses_pdsh=1
# Over pdsh the overrides reach each node inside one command line that its shell parses again, and
# DeepSpeed quotes only those holding a space (in double quotes, escaping "): each is escaped here so
# that the ranks get what was typed (trainer.run_dir='runs/lr=3e-4,bs=8', ${oc.env:SCRATCH}).
user_args=("$@")
if [ -n "$uses_pdsh" ]; then
  user_args=()
  for arg in "$@"; do
    if [[ "$arg" == *" "* ]]; then  # inside DeepSpeed's double quotes, \ $ and ` still act
      arg="${arg//\\/\\\\}"; arg="${arg//\$/\\\$}"; arg="${arg//\`/\\\`}"
    else
      printf -v arg '%q' "$arg"
    fi
    user_args+=("$arg")
  done
fi
command+=(--module train "${user_args[@]}")

# The overrides, composed and checked against the job's world size once here: one error line in
# this terminal, not one per rank in the per-rank logs. The world size is the slots (or GPUS_PER_NODE)
# of the first NUM_NODES hosts; a hostfile line without slots=N is left for DeepSpeed to refuse.
world_size="$(awk -v nodes="${NUM_NODES:-0}" -v per_node="${GPUS_PER_NODE:-}" '
  /^[[:space:]]*(#|$)/ { next }
  nodes > 0 && hosts >= nodes { next }
  { hosts++; slots = per_node }
  slots == "" { for (i = 2; i <= NF; i++) if ($i ~ /^slots=[0-9]+$/) slots = substr($i, 7) }
  slots == "" { unknown = 1 }
  { total += slots }
  END { if (!unknown) print total }' "$hostfile")"
if [ -n "$world_size" ]; then
  preflight "${command[0]}" "$world_size" "given by the hostfile's slots (GPUS_PER_NODE, NUM_NODES)" "$@"
  if [ "$preflight_device" = planned ]; then exit 0; fi  # a dry run's plan (dry_run=true): the job is done
fi
if [ -n "${DRY_RUN:-}" ]; then
  echo "forwarded to every node (through a DS_ENV_FILE written at launch):"
  sed 's/^/  /' "$env_file"
  printf '%q ' "${command[@]}"
  echo
  exit 0
fi
if [ "$log_dir" != none ]; then
  mkdir -p "$log_dir"
  echo "per-rank logs: $log_dir/<date-time>_rank<N>.log"
fi
# Not exec: the EXIT trap removes the environment file afterwards.
DS_ENV_FILE="$env_file" "${command[@]}"
