#!/usr/bin/env bash
# Every GPU figure in one run (about 10 minutes on one H100): GPU tests, the layer benchmark,
# the end-to-end benchmark at both presets, and the smoke run in bf16. Results go to $RESULTS_DIR
# (default bench/out): logs, markdown tables and JSON, to be copied into bench/RESULTS.md.
#   bash bench/gpu_all.sh            # PYTHON=... to pick the interpreter
#   ONLY="gpu_tests layer_gpu" bash bench/gpu_all.sh   # some steps only (where one command may run
#                                    # 10 minutes at most, split the run: the steps are independent)
# Steps: the `step` lines of run_steps below. A failing step does not stop the
# others; the exit status is 1 when any failed.
#
# On a machine that cannot install packages (the lent GPU machine): run bench/gpu_kit.sh where PyPI is
# reachable, bring .whl along, and this script installs it into /tmp/site first. Where $OUT names a
# folder (the device tool's return folder, which takes a few files only), every step ends by packing
# the logs, tables and JSON so far into $OUT/gpu_results.tar.gz: a run cut short keeps what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
RESULTS_DIR="${RESULTS_DIR:-bench/out}"
failed=()
listing=""  # set while run_steps only lists the step names
names=()
# Each step runs whatever happened before it: a failing GPU test must not cost the benchmarks
# (the device time is short). The exit status says whether every step passed.
step() {
  local name="$1"; shift
  if [ -n "$listing" ]; then names+=("$name"); return; fi
  selected "$name" || return 0
  echo "== $name: $*"
  if ! "$@" 2>&1 | tee "$RESULTS_DIR/$name.log"; then
    failed+=("$name")
    echo "== $name FAILED (log: $RESULTS_DIR/$name.log)"
  fi
  pack || echo "== packing the results into $OUT failed; they are still in $RESULTS_DIR"
}
# Whether this call runs step $1 (every step, unless ONLY names some).
selected() { [ -z "$listing" ] && { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }; }
# Logs, tables, JSON and the smoke run's metrics: not its checkpoints, which are large and not results.
# Also every PACK_EVERY seconds while a step runs (`packer` below): the device tool's time limit kills
# the call, and a step cut off there would otherwise return nothing of what it had written (the
# end-to-end benchmark's JSON after each variant, the log so far). Each packing writes a file of its
# own, then renames it: the packer and a step's end never write into one archive.
pack() {
  if [ -z "${OUT:-}" ]; then return; fi
  local partial="$OUT/.gpu_results.tar.gz.$BASHPID"
  # (The patterns never match the archive itself, so $OUT may be $RESULTS_DIR.)
  (cd "$RESULTS_DIR" && find . -type f \( -name '*.log' -o -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.png' \) \
     -not -path '*/checkpoints/*' -size -8192k -print0 | tar czf - --null -T -) > "$partial" \
    && mv "$partial" "$OUT/gpu_results.tar.gz"  # (set -e is off inside `pack || ...`)
}
packer() { while sleep "${PACK_EVERY:-15}"; do pack || true; done; }
# The steps, in order; run once with `listing` set to learn their names.
run_steps() {
  step device nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  # -rs lists every skip and its reason; without a CUDA device the step fails (tests/conftest.py).
  step gpu_tests env MOE_REQUIRE_CUDA=1 "$PY" -m pytest -m gpu tests -q -rs -p no:cacheprovider
  step layer_gpu "$PY" -m bench.moe_layer --device cuda --shapes gpu --json "$RESULTS_DIR/layer_gpu.json"
  # The 350M preset takes 65,536 tokens per optimizer step (4 micro-batches), so fewer timed steps do.
  # The compiled pair first (the targets' figures, like for like), then the eager pair: a call cut
  # off at its limit keeps the variants it finished, in this order.
  step e2e_350m "$PY" -m bench.end_to_end --variants ours+compile,deepspeed+compile,deepspeed,ours --steps 8 --warmup 3 \
    experiment=h100_350m --json "$RESULTS_DIR/e2e_350m.json"
  # What one micro-batch per optimizer step would give: the AdamW step's share of the preset's step.
  step e2e_350m_accum1 "$PY" -m bench.end_to_end --variants ours+compile --steps 10 --warmup 3 experiment=h100_350m \
    trainer.grad_accum=1 --json "$RESULTS_DIR/e2e_350m_accum1.json"
  # The layer compiled as trainer.compile compiles it, against the compiled dense FFN (9 compilations).
  step layer_gpu_compiled "$PY" -m bench.moe_layer --device cuda --shapes gpu \
    --variants dense,dense+compile,ours-dropless+compile,ours-expert-choice+compile --json "$RESULTS_DIR/layer_gpu_compiled.json"
  step e2e_gpt2_small "$PY" -m bench.end_to_end --steps 10 --warmup 3 experiment=h100_gpt2_small --json "$RESULTS_DIR/e2e_gpt2_small.json"
  # A fresh run folder each time: a rerun (after a cut-off call) would otherwise find the last
  # run's checkpoints there and refuse to start over them.
  if selected smoke; then rm -rf "$RESULTS_DIR/smoke"; fi
  step smoke "$PY" -m train experiment=smoke logging.progress_bar=false "trainer.run_dir=$RESULTS_DIR/smoke"
  # Last, as the least needed: what activation checkpointing costs in tokens/s (and saves in memory).
  step e2e_350m_ckpt "$PY" -m bench.end_to_end --variants ours,ours+compile --steps 6 --warmup 2 experiment=h100_350m \
    trainer.activation_checkpointing=true --json "$RESULTS_DIR/e2e_350m_ckpt.json"
}

listing=1 run_steps
for name in ${ONLY:-}; do
  # A mistyped name would run nothing and report success: a wasted call on a lent machine.
  if [[ " ${names[*]} " != *" $name "* ]]; then echo "error: ONLY: unknown step '$name'; the steps are: ${names[*]}" >&2; exit 2; fi
done
mkdir -p "$RESULTS_DIR"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; fi
if [ -d .whl ] && ! "$PY" -c "import deepspeed, hydra, webdataset" >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  # A wheel that does not fit this interpreter shows here, once, and not as every step failing.
  "$PY" -c "import deepspeed, hydra, webdataset" || { echo "error: .whl installed but DeepSpeed, Hydra or webdataset does not import" >&2; exit 2; }
fi
# DeepSpeed's op builder cannot parse "9.0a" (some images set it); its JIT builds need plain 9.0.
if [[ "${TORCH_CUDA_ARCH_LIST:-}" == *a* ]]; then export TORCH_CUDA_ARCH_LIST="9.0"; fi
export PYTHONUNBUFFERED=1
if [ -n "${OUT:-}" ]; then
  packer >/dev/null 2>&1 &  # (not holding this script's output open after it ends)
  packer_pid=$!
  trap 'kill "$packer_pid" 2>/dev/null; wait "$packer_pid" 2>/dev/null || true; rm -f "$OUT"/.gpu_results.tar.gz.*' EXIT
fi
run_steps
if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed steps: ${failed[*]}"
  exit 1
fi
echo "every step passed; logs and JSON in $RESULTS_DIR"
