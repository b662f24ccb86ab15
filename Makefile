# Two commands do all the set-up: `make train` and `make test`. `make help` lists the rest.
VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
ARGS      ?=
# CPU-only machines get the CPU wheel (on this project's build machines it lies on disk);
# a machine with an NVIDIA driver gets PyPI's CUDA build.
TORCH_CPU ?= torch==2.13.0
TORCH_GPU ?= torch>=2.4,<2.15
# Where torch comes from. Empty: the configured index (PyPI), whose Linux torch is a CUDA build of
# several GB even on a CPU-only machine; TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the
# CPU build instead.
TORCH_INDEX ?=
HAS_GPU   := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: help install constraints train test test-fast lint prepare bench bench-routing bench-gpu clean eval generate export consolidate docker lint-docker test-slurm

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install the project (CPU or CUDA torch)

# constraints.txt: the exact versions CI last passed with (for the Python it ran; other Pythons
# resolve pyproject.toml's ranges), so a new release upstream cannot change a clean install unseen.
PIN ?= -c constraints.txt
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(if $(HAS_GPU),$(TORCH_GPU),$(TORCH_CPU))"
	$(PY) -m pip install -q $(PIN) -e ".[dev]"
	touch $(STAMP)

constraints:  ## resolve pyproject.toml afresh in a scratch venv and pin what it got (then make test)
	rm -rf .venv-constraints
	$(MAKE) install VENV=.venv-constraints PIN= HAS_GPU=
	# Through a file, not a pipe: make's sh would not see a failed freeze, and an empty pin list would replace constraints.txt.
	.venv-constraints/bin/python -m pip freeze --exclude-editable > .venv-constraints/freeze.txt
	.venv-constraints/bin/python -m train.constraints < .venv-constraints/freeze.txt > constraints.txt.partial
	mv constraints.txt.partial constraints.txt
	rm -rf .venv-constraints

train: $(STAMP)  ## train the smoke GPT-MoE on the embedded corpus (ARGS='key=value ...' to override)
	$(PY) -m train experiment=smoke $(ARGS)

prepare: $(STAMP)  ## tokenise the embedded corpus into webdataset shards (cached)
	$(PY) -m train.data.prepare

eval: $(STAMP)  ## loss/perplexity of the newest run (or ARGS='RUN_DIR ...') under every routing mode
	$(PY) -m train.evaluate $(ARGS)

generate: $(STAMP)  ## generate text from the newest run (ARGS='--prompt "..." --top-p 0.9 ...')
	$(PY) -m train.generate $(ARGS)

export: $(STAMP)  ## Hugging Face Mixtral checkpoint of the newest run (ARGS='--out DIR [RUN_DIR]')
	$(PY) -m train.export_hf $(ARGS)

consolidate: $(STAMP)  ## one safetensors file of a checkpoint of any expert-parallel layout (ARGS='RUN_DIR --out F')
	$(PY) -m train.consolidate $(ARGS)

# `make test` runs the test files on TEST_WORKERS processes (pytest-xdist; each file's tests stay together,
# for its module fixtures): the suite alone keeps about 1.2 of 2 cores busy (start-ups, rank 0 saving while
# the others wait, Slurm's waits). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP)  ## all CPU tests: unit, multi-process (gloo) and whole runs
	$(PY) -m pytest -m "not gpu" -q --durations=30 -n $(TEST_WORKERS) --dist loadfile  # the slowest, to keep CI short

test-fast: $(STAMP)  ## the fast CPU tier only (what a plain `pytest` runs)
	$(PY) -m pytest -q

test-slurm: $(STAMP)  ## the Slurm tests alone: a local cluster (root, Debian's slurmctld/slurmd), sbatch, preemption
	$(PY) -m pytest tests/integration/test_slurm.py tests/integration/test_preempt_resume.py -m slow -q

bench: $(STAMP)  ## MoE layer vs dense FFN vs stock DeepSpeed MoE (forward+backward), CPU shapes
	$(PY) -m bench.moe_layer --json bench/moe_layer_cpu.json

bench-routing: $(STAMP)  ## train the smoke model under each routing scheme and print the comparison table
	$(PY) -m bench.routing_compare --json bench/routing_cpu.json

bench-gpu: $(STAMP)  ## every GPU figure in one run: GPU tests, layer and end-to-end benchmarks, bf16 smoke
	PYTHON=$(PY) bash bench/gpu_all.sh

lint: $(STAMP) lint-docker  ## ruff and hadolint
	$(VENV)/bin/ruff check moe train tests bench launch

lint-docker: $(STAMP)  ## hadolint on docker/Dockerfile (rules ignored in .hadolint.yaml, each with its reason)
	$(VENV)/bin/hadolint docker/Dockerfile

IMAGE ?= moe-gpt
docker:  ## build the GPU image from docker/Dockerfile, tagged $(IMAGE) (needs a Docker engine)
	docker build -f docker/Dockerfile -t $(IMAGE) .

clean:  ## remove the virtualenv (a venv, as `make install` makes), caches and runs
	@# VENV may name an environment that is no venv (the Docker image sets VENV=/opt/conda, its only
	@# Python): that one is left alone.
	@if [ -f $(VENV)/pyvenv.cfg ]; then rm -rf $(VENV); else echo "make clean: keeping $(VENV) (not a venv)"; fi
	rm -rf .cache runs
