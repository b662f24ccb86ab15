# Sourced by the launch scripts (deepspeed_local.sh, deepspeed_multinode.sh, slurm/train.sbatch).
#
#   preflight PYTHON WORLD_SIZE SOURCE [overrides...]
#
# Checks the overrides once, before any rank starts (train.cli.launch_check): left to the ranks,
# each would print the same error after its start-up. On a refusal it prints one `error:` line and
# returns 2. Otherwise it sets `preflight_device` to the device the ranks will train on (cuda or
# cpu), or to "planned" after printing a dry run's plan (dry_run=true: nothing to start). With
# DRY_RUN set, a Python without the project's packages skips the check with a note.
preflight() {
  local python="$1" checked
  shift
  checked="$("$python" -c 'import os, sys
try:
    from train.cli import launch_check
except ImportError as error:
    if not os.environ.get("DRY_RUN"):
        raise
    sys.exit(print(f"note: overrides not checked ({error})", file=sys.stderr))
sys.exit(launch_check(sys.argv[1:]))' "$@" </dev/null)" || return
  preflight_device="${checked##*$'\n'}"
  if [ "$preflight_device" = planned ]; then printf '%s\n' "${checked%$'\n'*}"; fi
}
