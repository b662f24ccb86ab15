#!/usr/bin/env bash
# Every GPU figure in one run (about 10 minutes on one H100): GPU tests, the layer benchmark,
# the end-to-end benchmark at both presets, and the smoke run in bf16. Results go to $OUT
# (default bench/out): logs, markdown tables and JSON, to be copied into bench/RESULTS.md.
#   bash bench/gpu_all.sh            # PYTHON=... to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
# DeepSpeed's op builder cannot parse "9.0a" (some images set it); its JIT builds need plain 9.0.
if [[ "${TORCH_CUDA_ARCH_LIST:-}" == *a* ]]; then export TORCH_CUDA_ARCH_LIST="9.0"; fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
"$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
"$PY" -m bench.moe_layer --device cuda --shapes gpu --json "$OUT/layer_gpu.json" 2>&1 | tee "$OUT/layer_gpu.md"
"$PY" -m bench.end_to_end experiment=h100_gpt2_small --json "$OUT/e2e_gpt2_small.json" 2>&1 | tee "$OUT/e2e_gpt2_small.md"
"$PY" -m bench.end_to_end --compile experiment=h100_350m --json "$OUT/e2e_350m.json" 2>&1 | tee "$OUT/e2e_350m.md"
"$PY" -m train experiment=smoke logging.progress_bar=false "trainer.run_dir=$OUT/smoke" 2>&1 | tee "$OUT/smoke.log"
