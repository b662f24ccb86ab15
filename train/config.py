"""The run configuration: typed dataclasses that are both the Hydra schema and the validator.

Hydra composes YAML from `conf/` onto these dataclasses (registered in its ConfigStore), so an
unknown key fails at compose time (one added with `+key=value`, which Hydra lets through, fails in
`to_run_config`). `OmegaConf.to_object` then builds the dataclasses, and
each `__post_init__` rejects invalid values with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe import MoEConfig
from train.data.split import MAX_TRAINING_VAL_FRACTION
from train.data.tokenizer import MIN_TRAINING_VOCAB_SIZE
from train.model import ModelConfig


class ConfigError(ValueError):
    """A user mistake in the configuration: printed as one line, exit status 2."""


@dataclass
class DataConfig:
    """Where the tokens come from (the `data` group)."""

    files: list[str] = field(default_factory=list)
    """The user's .txt / .jsonl files; empty = the embedded corpus (Python's own documentation)."""
    require_files: bool = False
    """Set by `data=files`: an empty `files` is then an error, not a quiet switch to the embedded corpus."""
    text_field: str = "text"
    """Field holding the text in .jsonl files."""
    vocab_size: int = 4096
    """Size of the byte-level BPE trained on the corpus."""
    val_fraction: float = 0.05
    """Share of documents held out for validation."""
    cache_dir: str = ".cache/data"
    """Prepared datasets live in cache_dir/<fingerprint>, so a second run skips preparation."""

    def __post_init__(self) -> None:
        if self.require_files and not self.files:
            raise ValueError("data.files: data=files needs the files to train on, e.g. data.files='[a.txt,b.jsonl]'")
        if self.vocab_size < MIN_TRAINING_VOCAB_SIZE:
            raise ValueError(f"data.vocab_size must be >= {MIN_TRAINING_VOCAB_SIZE} (256 bytes + merges), got {self.vocab_size}")
        if not 0.0 < self.val_fraction < MAX_TRAINING_VAL_FRACTION:
            raise ValueError(f"data.val_fraction must be in (0, {MAX_TRAINING_VAL_FRACTION}), got {self.val_fraction}")


@dataclass
class DeepSpeedConfig:
    """What goes into the DeepSpeed config (the `deepspeed` group)."""

    zero_stage: int = 2
    """ZeRO stage 1 or 2 (DeepSpeed-MoE does not support stage 3)."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), bf16 or fp32."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = 20
    weight_decay: float = 0.1
    """AdamW decoupled weight decay for matrices; norms get none."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.zero_stage not in (1, 2):
            raise ValueError(
                f"deepspeed.zero_stage must be 1 or 2, got {self.zero_stage} (stage 0 computes a wrong "
                "gradient norm under expert parallelism; DeepSpeed-MoE rejects stage 3)"
            )
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"deepspeed.precision must be auto, bf16 or fp32, got {self.precision!r}")
        # Written as "not (finite and in range)": NaN fails every comparison, so `x < 0` lets it through.
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"deepspeed.grad_clip must be a finite number >= 0, got {self.grad_clip}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"deepspeed.lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"deepspeed.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:  # 1 would never forget: Adam's bias correction divides by 0
                raise ValueError(f"deepspeed.{name} must be in [0, 1), got {getattr(self, name)}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"deepspeed.eps must be a finite number > 0, got {self.eps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"deepspeed.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 1:
            raise ValueError(
                f"deepspeed.warmup_steps must be >= 1 (warm-up step n runs at lr * n / warmup_steps), got {self.warmup_steps}"
            )


PORTABLE_CHECKPOINTS = ("always", "final", "never")
# Hydra reads `trainer.portable_checkpoint=false` as a boolean, which the str field receives as "False".
PORTABLE_ALIASES = {"true": "always", "false": "never"}


@dataclass
class TrainerConfig:
    """The loop (the `trainer` group)."""

    max_steps: int = 200
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; global batch = micro_batch_size * grad_accum * data-parallel ranks."""
    eval_every: int = 50
    """Validate every N steps (and at the end); 0 = only at the end."""
    eval_batches: int = 8
    """Validation micro-batches per evaluation: the first eval_batches x micro_batch_size windows of the
    validation split, the same every time (so a run's val losses compare across runs with the same
    two settings; moe-eval --windows N picks a count of its own)."""
    checkpoint_every: int = 100
    """Save every N steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 0
    """Keep only the newest N checkpoints (older ones are deleted after each save, once `latest`
    names the new one); 0 keeps every checkpoint."""
    resume: bool = False
    """Continue from the latest checkpoint in run_dir."""
    auto_resume: bool = False
    """Continue from run_dir's latest checkpoint when it has one, start fresh when it has none:
    what a requeued Slurm job needs (launch/slurm/train.sbatch sets it). Needs trainer.run_dir."""
    seed: int = 1337
    device: str = "auto"
    """auto (cuda when available), cuda or cpu."""
    run_dir: str | None = None
    """Where the run writes everything; default runs/<name>."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device for MFU; None = known GPU table, or a measured matmul on CPU."""
    max_nonfinite_steps: int = 5
    """A step with a NaN or Inf loss is skipped (no update); this many in a row stop the run
    (exit status 3), leaving the last good checkpoint as `latest`."""
    portable_checkpoint: str = "always"
    """Which checkpoints also hold a layout-free copy of the fp32 master weights and AdamW moments
    (about 12 bytes per parameter, train/portable_state.py), so that they resume at another expert-
    or data-parallel size with their optimizer state: `always` (every save), `final` (only the save
    at trainer.max_steps and the save on preemption: the checkpoints a job ends on, at about half
    the disk for the periodic ones) or `never`. A checkpoint without it resumes at its own layout
    only (another one is refused). true and false mean always and never."""
    compile: bool = False
    """torch.compile every block in place (attention, norms, dense FFNs and, see below, our MoE
    layers): train/compile.py. The first steps are slower while kernels are built."""
    compile_moe_layers: bool = True
    """With `compile`: compile our MoE layers too (router, permutation, SiLU x gate, combine; the
    expert weights are stacked eagerly). false keeps them eager and compiles the dense parts only."""
    activation_checkpointing: bool = False
    """Keep only each block's input in the forward pass and recompute its activations in the
    backward (train/activation_checkpointing.py): about a third more compute for much less
    activation memory. The trajectory is the same as without."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum", "eval_batches", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        self.portable_checkpoint = PORTABLE_ALIASES.get(str(self.portable_checkpoint).lower(), self.portable_checkpoint)
        if self.portable_checkpoint not in PORTABLE_CHECKPOINTS:
            raise ValueError(f"trainer.portable_checkpoint must be always, final or never (or true/false), "
                             f"got {self.portable_checkpoint!r}")
        if not 0 <= self.seed < 2**32:
            # The data order seeds numpy with (seed, step) as 32-bit words: a larger seed would repeat another's batches.
            raise ValueError(f"trainer.seed must be in [0, 2**32), got {self.seed}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"trainer.device must be auto, cuda or cpu, got {self.device!r}")
        if self.peak_tflops is not None and not (self.peak_tflops > 0 and math.isfinite(self.peak_tflops)):
            raise ValueError(f"trainer.peak_tflops must be a finite number > 0 or null, got {self.peak_tflops}")
        if self.auto_resume and not self.run_dir:
            raise ValueError("trainer.auto_resume=true needs trainer.run_dir (where a restarted job finds its checkpoint)")


@dataclass
class LoggingConfig:
    """What the run prints and records (the `logging` group)."""

    log_every: int = 10
    """Write a metrics.jsonl line (and refresh the progress bar figures) every N steps."""
    progress_bar: bool = True
    plots: str = "end"
    """Expert-load heatmaps (PNG, one per MoE layer, drawn from metrics.jsonl by train/plots.py)
    in <run_dir>/plots: `end` of the run, after every evaluation too (`eval`: about 0.3 s per
    MoE layer each time), or `off`."""
    wandb: bool = False
    """Also log every metrics.jsonl record to Weights & Biases, from rank 0 only (`logging=wandb`)."""
    wandb_project: str = "moe-gpt"
    wandb_entity: str | None = None
    """W&B team or user; None = the API key's default entity."""
    wandb_mode: str = "auto"
    """auto (WANDB_MODE if set, else online when WANDB_API_KEY is set, else offline), online,
    offline or disabled."""
    wandb_dir: str | None = None
    """Where W&B writes its local files (wandb/...); None = $WANDB_DIR if set, else the run directory."""
    wandb_run_name: str | None = None
    """Display name; None = the run directory's path."""
    wandb_tags: list[str] = field(default_factory=list)
    wandb_group: str | None = None
    """Groups runs in the W&B UI (for example one sweep or one comparison)."""

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"logging.log_every must be >= 1, got {self.log_every}")
        if self.plots not in ("end", "eval", "off"):
            raise ValueError(f"logging.plots must be end, eval or off, got {self.plots!r}")
        if self.wandb_mode not in ("auto", "online", "offline", "disabled"):
            raise ValueError(f"logging.wandb_mode must be auto, online, offline or disabled, got {self.wandb_mode!r}")
        if self.wandb and not self.wandb_project:
            raise ValueError("logging.wandb_project must be a non-empty W&B project name when logging.wandb=true")


@dataclass
class RunConfig:
    """A whole run. `name` picks the default run directory."""

    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dry_run: bool = False
    """Print the parallel plan for `world_size` ranks (parameters, memory, all-to-all bytes per
    rank) and exit, without a GPU, a process group or data."""
    world_size: int | None = None
    """Ranks to plan for with dry_run=true (a real run takes its world size from the launcher)."""
    dry_run_device_gib: float | None = None
    """With dry_run: reject the plan when a rank needs more memory than this (e.g. 80 for an H100)."""

    def __post_init__(self) -> None:
        # Settings of two sections that must agree (each section checks its own fields).
        tp, moe = self.model.tensor_parallel, self.moe
        if moe.every == 0 and moe.ep_size > 1:
            raise ValueError(f"moe.ep_size={moe.ep_size} splits experts, and this model has none (moe.every=0: dense)")
        if moe.every > self.model.num_layers:
            raise ValueError(f"moe.every={moe.every} puts no MoE layer in model.num_layers={self.model.num_layers} "
                             "(every n-th block is an MoE block); use moe.every=0 for a dense model")
        if tp > 1 and moe.every > 0:
            # Each expert's (and the shared expert's) hidden units are split over the tensor-parallel
            # ranks; without expert_hidden the experts take model.ffn_hidden, which ModelConfig checks.
            for name in ("expert_hidden", "shared_expert_hidden"):
                hidden = getattr(moe, name)
                if hidden is not None and hidden % tp:
                    raise ValueError(f"moe.{name}={hidden} must be divisible by model.tensor_parallel={tp}")

    @property
    def run_dir(self) -> str:
        return self.trainer.run_dir or f"runs/{self.name}"

    def check_world_size(self, world_size: int, source: str = "given by the launcher") -> None:
        """Parallel degrees live in config, the world size comes from the launcher (or, for a job
        still to be submitted, from its node and rank counts, named by `source`): they must fit."""
        if self.world_size is not None and self.world_size != world_size and not self.dry_run:
            # world_size only sizes a dry run's plan; a real run's ranks are the launcher's to decide.
            raise ConfigError(f"world_size={self.world_size} plans a dry run (dry_run=true); "
                              f"this run's world size is {world_size}, {source}")
        tp, ep = self.model.tensor_parallel, self.moe.ep_size
        if world_size % tp != 0:
            raise ConfigError(
                f"model.tensor_parallel={tp} must divide the world size {world_size} {source}"
            )
        if (world_size // tp) % ep != 0:
            raise ConfigError(
                f"moe.ep_size={ep} must divide the world size {world_size} {source}" if tp == 1 else
                f"moe.ep_size={ep} must divide the {world_size // tp} rank{'s' if world_size // tp != 1 else ''} "
                "of each tensor-parallel rank's slice "
                f"(the world size {world_size} {source}, divided by model.tensor_parallel={tp})"
            )
        if tp > 1 and self.moe.implementation == "deepspeed":
            raise ConfigError(
                "model.tensor_parallel > 1 needs moe.implementation=ours (stock DeepSpeed MoE gathers tokens "
                "across tensor-parallel ranks with a collective that gloo rejects)"
            )


def register_schemas() -> None:
    """Make RunConfig the schema of conf/config.yaml (see its defaults list)."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Typed, validated RunConfig from a composed Hydra config; ConfigError on invalid values."""
    unknown = unknown_keys(cfg)
    if unknown:
        # Hydra's `+key=value` adds a key even where the schema has none; it would then be ignored.
        raise ConfigError(unknown[0])
    try:
        run = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as error:  # OmegaConf's own (a missing value, a bad interpolation), named by field
        if isinstance(error.__cause__, ValueError) and not isinstance(error.__cause__, OmegaConfBaseException):
            raise ConfigError(_first_line(error.__cause__)) from None  # a __post_init__'s, wrapped by OmegaConf
        key = getattr(error, "full_key", None)  # (an interpolation's own message names only its target)
        message = _first_line(error)
        raise ConfigError(f"{key}: {message}" if key and not message.startswith(f"{key}:") else message) from None
    except ValueError as error:  # raised by a __post_init__
        raise ConfigError(str(error).splitlines()[0]) from None
    except Exception as error:  # anything else OmegaConf raises in validation
        raise ConfigError(_first_line(error)) from None
    assert isinstance(run, RunConfig)
    return run


def _first_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """One line per key of `node` that its schema dataclass does not have (added with Hydra's `+`,
    which bypasses the schema's own check), with the nearest known key as a hint."""
    schema = OmegaConf.get_type(node)
    known = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    problems = []
    for key in node.keys():
        path = f"{prefix}{key}"
        if known is not None and key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            section = prefix.rstrip(".") or "the config"
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; {section} has {', '.join(known)}"
            problems.append(f"+{path}: no such setting{hint}")
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            problems.extend(unknown_keys(child, f"{path}."))
    return problems
