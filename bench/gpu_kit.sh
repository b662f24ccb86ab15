#!/usr/bin/env bash
# Run HERE, on a machine that reaches PyPI, before a GPU run: fetches as wheels, into .whl/ (git-ignored),
# every package `bench/gpu_all.sh` needs that the lent GPU machine's image lacks. That machine runs
# Python 3.12 on x86-64 with its own CUDA torch, numpy, pyyaml, tokenizers, safetensors, matplotlib,
# einops, msgpack, ninja, psutil and py-cpuinfo, and reaches no registry (FACTS.md, "The lent GPU
# machine"). Carry .whl with the run; gpu_all.sh installs it there by itself.
#   bash bench/gpu_kit.sh                 # PYTHON=... to pick the pip; DEST=... for another folder
# Versions are the ones installed in .venv, i.e. the ones CI tests with; the GPU machine's torch is its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
DEST="${DEST:-.whl}"
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
# deepspeed's and pydantic's needs (with typing-extensions: pydantic wants a newer one than some images
# hold), Hydra's and webdataset's. Not wandb or megatron-core: the benchmarks import neither.
universal=(pydantic annotated-types typing-inspection typing-extensions hjson hydra-core omegaconf webdataset braceexpand)
pins=()
for name in deepspeed antlr4-python3-runtime pydantic-core "${universal[@]}"; do pins+=("$name==$(version "$name")"); done
rm -rf "$DEST" && mkdir -p "$DEST"
# deepspeed and antlr4 come as source only: built into pure-Python wheels here (DeepSpeed JIT-builds
# its ops on the GPU machine at first use).
"$PY" -m pip wheel -q --no-deps -w "$DEST" "${pins[0]}" "${pins[1]}"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$tag")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST" "${pins[@]:2}"
ls "$DEST"
du -sh "$DEST"
