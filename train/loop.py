"""`train(run)`: the whole job, callable from tests without Hydra's command line."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from moe.router_state import update_routing_state
from train import checkpoint
from train.config import ConfigError, RunConfig, to_run_config
from train.data import TokenDataset, prepare_dataset
from train.distributed import World, init_world, launcher_world_size, stop_every_rank_on
from train.dry_run import check_fits, parallel_plan, print_plan
from train.durable import write_text_atomically
from train.engine import build_engine
from train.evaluate import token_loss_sum
from train.flops import flops_per_token, peak_tflops
from train.host_memory import keep_freed_memory
from train.load import newest_run
from train.log_window import LogWindow
from train.lr_schedule import short_warmup_warning
from train.metrics import (
    ExpertCounts,
    MetricsFile,
    Progress,
    figures_per_layer,
    finite_figures,
    finite_or_none,
    mean_over_ranks,
    perplexity,
)
from train.model import GPT, expert_choice_group, expert_choice_layers, padded_vocab_size
from train.nonfinite import NonFiniteLossStop, NonFiniteStreak, discard_routing_statistics, poison_if_nonfinite
from train.output_path import unwritable_reason
from train.preemption import PREEMPTED_EXIT_STATUS, Preempted, PreemptionWatch
from train.routing_modes import RoutingMode, routing, thresholds_ready
from train.run_lock import RunDirectoryLock
from train.settings_diff import SHAPE_SECTIONS, changed_settings, describe, saved_settings


def train(cfg: DictConfig | RunConfig) -> dict[str, Any]:
    """Run a whole training job; returns the summary (also written to summary.json)."""
    run = cfg if isinstance(cfg, RunConfig) else to_run_config(cfg)
    if run.dry_run:
        if run.world_size is None:
            raise ConfigError("dry_run=true needs world_size=N (the number of ranks to plan for)")
        if run.world_size < 1:
            raise ConfigError(f"world_size must be a positive number of ranks, got {run.world_size}")
        if run.dry_run_device_gib is not None and not run.dry_run_device_gib > 0:
            raise ConfigError("dry_run_device_gib must be a positive size in GiB (e.g. 80 for an H100), "
                              f"got {run.dry_run_device_gib:g}")
        plan = parallel_plan(run, run.world_size, padded_vocab_size(run.data.vocab_size))
        print_plan(plan)
        check_fits(plan, run.dry_run_device_gib)
        return plan
    run = checked_for_start(run, launcher_world_size(), "given by the launcher (launch/deepspeed_local.sh N starts N ranks)")

    # Handlers go in before the slow start-up: a scheduler's warning that arrives meanwhile is kept.
    with PreemptionWatch() as preemption:
        try:
            world = init_world(run.trainer.device, run.model.tensor_parallel)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        try:
            trainer = build_trainer(run, world, lambda: _resolve_run_dir(run, world))
        except RunComplete as complete:
            if world.is_main:
                print(f"resume      {complete}", flush=True)
            return {"run_dir": str(complete.run_dir), "already_complete": True, "checkpoint": complete.tag}
        return trainer.fit(preemption)


def checked_for_start(run: RunConfig, world_size: int, source: str) -> RunConfig:
    """What a run must pass before a rank starts (ConfigError otherwise): the parallel degrees against
    `world_size` (`source` says where it comes from), the data files, and a run directory that can
    hold this run. Returns `run` with trainer.resume decided (trainer.auto_resume). The launch
    scripts call it too, once, before DeepSpeed starts the ranks (train.cli.launch_check)."""
    run.check_world_size(world_size, source)
    for path in run.data.files:
        if not Path(path).is_file():
            raise ConfigError(f"data.files: {path!r} does not exist or is not a file{_caller_directory_hint(path)}")
    if run.trainer.auto_resume:
        # Read before any rank joins the process group, so before any rank can write a checkpoint:
        # every rank sees the same answer.
        checkpoint_dir = Path(run.trainer.run_dir) / "checkpoints"
        has_checkpoint = checkpoint.latest_tag(checkpoint_dir) is not None
        if not has_checkpoint and (problem := _checkpoints_without_latest(checkpoint_dir)):
            # Starting over would save new tags under these names: the two runs' files would mix.
            raise ConfigError(problem)
        run = replace(run, trainer=replace(run.trainer, resume=run.trainer.resume or has_checkpoint))
    elif run.trainer.resume is False and run.trainer.run_dir and _holds_a_run(Path(run.trainer.run_dir)):
        if checkpoint.latest_tag(Path(run.trainer.run_dir) / "checkpoints") is None:
            # Stopped before its first save finished: nothing to continue, so not "resume".
            raise ConfigError(f"trainer.run_dir={run.trainer.run_dir!r} already holds a run that saved no complete "
                              "checkpoint: pass trainer.auto_resume=true to start it over there, or choose another "
                              "trainer.run_dir")
        raise ConfigError(
            f"trainer.run_dir={run.trainer.run_dir!r} already holds a run: pass trainer.resume=true to continue it "
            "or choose another trainer.run_dir"
        )
    if run.trainer.resume:
        _, problem = _run_to_resume(run)
        if problem is not None:
            raise ConfigError(problem)
    if run.logging.wandb and os.environ.get("RANK", "0") == "0":  # rank 0 alone logs to W&B (its node's key)
        from train.wandb_mode import online_without_key

        problem = online_without_key(run.logging.wandb_mode)
        if problem is not None:
            raise ConfigError(problem)
    run_dir = Path(run.trainer.run_dir) if run.trainer.run_dir else Path("runs", run.name)
    problem = unwritable_reason(run_dir, folder=True)
    if problem is not None:  # found now, not after the model and the engine are built
        raise ConfigError(f"trainer.run_dir={run.trainer.run_dir!r}: {problem}" if run.trainer.run_dir
                          else f"{run_dir}: {problem} (runs go under runs/<name>/ by default: set trainer.run_dir=DIR)")
    if run.trainer.run_dir and Path(run.trainer.run_dir).is_dir() and os.environ.get("RANK", "0") == "0":
        # Another run training there: said now, not after the engine is built (rank 0 takes the lock
        # then). Rank 0 alone looks: ranks probing at once would each find the others' probe.
        probe = RunDirectoryLock(Path(run.trainer.run_dir))
        in_use = probe.acquire()
        probe.release()
        if in_use is not None:
            raise ConfigError(in_use)
    return run


def _caller_directory_hint(path: str) -> str:
    """The launch scripts run the ranks in the checkout (as the Slurm job does), so a relative path
    is taken from there; when it names a file in the directory the script was called from, say so."""
    caller = os.environ.get("MOE_GPT_CALLER_DIR")
    if not caller or Path(path).is_absolute() or Path(caller).resolve() == Path.cwd().resolve():
        return ""
    meant = Path(caller) / path
    return f" (relative paths are taken from the checkout {Path.cwd()}, where the ranks run: pass {meant})" \
        if meant.exists() else ""


def build_trainer(run: RunConfig, world: World, run_dir: Callable[[], Path]) -> Trainer:
    """Data, model and DeepSpeed engine for `run` (also what the end-to-end benchmark times).
    `run_dir` is asked for once the data has been checked, so bad data fails before a run
    directory is chosen."""
    if world.device.type == "cpu":
        keep_freed_memory()  # each step's activations reuse freed memory instead of page-faulting anew
    data_dir = _prepared_data(run, world)
    train_data, val_data = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "val")
    for split in (train_data, val_data):
        if split.num_tokens < run.model.seq_len + 1:
            raise ConfigError(
                f"model.seq_len={run.model.seq_len} needs more tokens than the {split.split} split holds ({split.num_tokens})"
            )
    directory = run_dir()
    torch.manual_seed(run.trainer.seed)  # identical dense weights on every rank; experts seed themselves
    model = GPT(run.model, run.moe, vocab_size=padded_vocab_size(train_data.vocab_size), seed=run.trainer.seed)
    if world.tensor_parallel > 1:
        from train import tensor_parallel

        tensor_parallel.shard_model(model, world.rank % world.tensor_parallel, world.tensor_parallel)
        mpu = tensor_parallel.MegatronMPU()
    else:
        mpu = None
    model.checkpoint_blocks = run.trainer.activation_checkpointing
    if run.trainer.compile:
        from train.compile import compile_model

        compile_model(model, moe_layers=run.trainer.compile_moe_layers)
    engine, scheduler = build_engine(model, run, world.device, mpu)
    return Trainer(run, world, engine, scheduler, model, train_data, val_data, directory)


def _holds_a_run(path: Path) -> bool:
    return (path / "checkpoints").exists() or (path / "metrics.jsonl").exists()


DATA_PREPARATION_TIMEOUT = timedelta(hours=24)
"""How long the other ranks wait for the data to be prepared (a collective's timeout)."""


def _prepared_data(run: RunConfig, world: World) -> Path:
    """Rank 0 prepares (or finds in the cache); the others wait, then find it in the cache. Where a
    node does not share rank 0's cache directory, that node's first rank prepares its own copy while
    the node's other ranks wait (rather than all of them preparing the same data at once)."""
    source: str | list[str] = list(run.data.files) or "embedded"
    kwargs = dict(
        cache_dir=run.data.cache_dir,
        vocab_size=run.data.vocab_size,
        val_fraction=run.data.val_fraction,
        text_field=run.data.text_field,
    )
    data_dir: Path | None = None
    error: str | None = None
    # The ranks wait on a gloo group of their own: preparing a large corpus outlasts the process
    # group's timeout (DeepSpeed's default, 10 minutes; about 1 GB of text on 2 cores), which the
    # waiting ranks would hit as a traceback. A rank that dies closes its sockets, so its peers
    # still stop at once rather than after this timeout.
    waiting = dist.new_group(backend="gloo", timeout=DATA_PREPARATION_TIMEOUT)
    if world.is_main:
        try:
            data_dir = prepare_dataset(source, **kwargs)
        except ValueError as exc:
            error = str(exc)
    stop_every_rank_on(None if error is None else f"data: {error}", group=waiting)
    if not world.is_main and world.local_rank == 0:
        try:
            data_dir = prepare_dataset(source, **kwargs, announce_cached=False)
        except ValueError as exc:
            error = str(exc)
    # Every rank learns of a failure on any node (and the node's other ranks wait here for its
    # first): a rank that raised alone would leave the others blocked in the next collective.
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error, group=waiting)
    dist.destroy_process_group(waiting)
    failed = next(((rank, e) for rank, e in enumerate(errors) if e is not None), None)
    if failed is not None:
        raise ConfigError(f"data (rank {failed[0]}): {failed[1]}")
    if data_dir is None:
        data_dir = prepare_dataset(source, **kwargs, announce_cached=False)
    return data_dir


def _resolve_run_dir(run: RunConfig, world: World) -> Path:
    """The run directory, agreed by all ranks (rank 0 decides: timestamps differ between processes)."""
    decided: list[Any] = [None, None, None]
    if world.is_main:
        if run.trainer.resume:
            path, decided[1] = _run_to_resume(run)
        elif run.trainer.run_dir:
            path = Path(run.trainer.run_dir)
        else:
            path = Path("runs", run.name, datetime.now().strftime("%Y%m%d-%H%M%S"))
        decided[0] = str(path)
        if run.trainer.resume and decided[1] is None:
            decided[1:] = _resume_problem(path, run.trainer.max_steps)
    dist.broadcast_object_list(decided, src=0)
    if decided[1] is not None:
        raise ConfigError(decided[1])
    if decided[2] is not None:
        raise RunComplete(Path(decided[0]), decided[2])
    return Path(decided[0])


def _run_to_resume(run: RunConfig) -> tuple[Path, str | None]:
    """(the run directory trainer.resume=true continues, None), or (_, why there is none): the given
    trainer.run_dir, else the newest run of this name under runs/<name>/."""
    if run.trainer.run_dir:
        path = Path(run.trainer.run_dir)
        if not path.is_dir():
            return path, f"trainer.resume=true but trainer.run_dir={str(path)!r} does not exist"
        if checkpoint.latest_tag(path / "checkpoints") is None:
            if problem := _checkpoints_without_latest(path / "checkpoints"):
                return path, f"trainer.resume=true but {problem}"
            inner = newest_run(path)
            if inner is not None:
                hint = f"; it holds runs, e.g. trainer.run_dir={inner}"
            elif _holds_a_run(path):  # stopped before its first save finished
                hint = "; trainer.auto_resume=true starts its run over there"
            else:
                hint = ""
            return path, f"trainer.resume=true but {path / 'checkpoints'} holds no checkpoint{hint}"
        return path, None
    candidates = sorted(p.parent.parent for p in Path("runs", run.name).glob("*/checkpoints/latest"))
    if not candidates:
        return Path(), f"trainer.resume=true but no run of {run.name!r} under runs/{run.name} has a checkpoint"
    return candidates[-1], None


def _checkpoints_without_latest(checkpoint_dir: Path) -> str | None:
    """Why a run directory whose `latest` is gone (deleted by hand) cannot simply start over."""
    saved = checkpoint.saved_tags_without_latest(checkpoint_dir)
    if not saved:
        return None
    return (f"{checkpoint_dir} holds {saved[-1].name} but no `latest` naming it: write its name into "
            f"{checkpoint_dir / 'latest'} to continue from it, or choose another trainer.run_dir")


def _moe_description(moe, moe_layers: int) -> str:
    """The header's words for the MoE layers: how many, how many experts, how tokens are routed."""
    if moe_layers == 0:
        return "dense (no MoE layer)"
    routing = (f"expert choice, c={moe.capacity_factor:g}" if moe.router == "expert_choice"
               else f"top-{moe.top_k}" + (", dropless" if moe.capacity_factor is None else ""))
    return f"{moe_layers} MoE layer{'s' if moe_layers != 1 else ''} x {moe.num_experts} experts ({routing})"


RUN_SELECTION = ("trainer.resume", "trainer.run_dir", "trainer.auto_resume")


def continue_overrides(run_dir: Path) -> str:
    """The overrides that continue this run: the command line's own (Hydra's record of them), with the
    run selected instead of the ones that chose it. Without Hydra (the API), the caller's overrides
    are unknown and the hint says so."""
    from hydra.core.hydra_config import HydraConfig

    selection = ["trainer.resume=true", f"trainer.run_dir={run_dir}"]
    if not HydraConfig.initialized():
        return "your overrides and " + " ".join(selection)
    given = [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].lstrip("+~") not in RUN_SELECTION]
    return " ".join(shlex.quote(o) for o in [*given, *selection])


class RunComplete(Exception):
    """The run to resume has already trained trainer.max_steps steps: nothing to do (exit status 0,
    so a requeued job that finished meanwhile ends quietly)."""

    def __init__(self, run_dir: Path, tag: str) -> None:
        super().__init__(f"{run_dir}: already trained to its trainer.max_steps (checkpoint {tag}); nothing to do "
                         "(raise trainer.max_steps to train on)")
        self.run_dir, self.tag = run_dir, tag


def _resume_problem(path: Path, max_steps: int) -> list[str | None]:
    """[error, complete tag] for resuming the run in `path` to max_steps: a checkpoint past
    max_steps cannot be trained back to it; one at max_steps needs no training."""
    tag = checkpoint.latest_tag(path / "checkpoints")
    step = checkpoint.step_of(tag) if tag is not None else None
    if step is None or step < max_steps:
        return [None, None]
    if step > max_steps:
        return [f"trainer.max_steps={max_steps} is below the step of the checkpoint to resume ({path / 'checkpoints' / tag}, "
                f"step {step}): a run does not train backwards; set trainer.max_steps >= {step}", None]
    return [None, tag]


class Trainer:
    """The loop's state: one object so that steps, logging and checkpoints read plainly."""

    last_step_skipped = False
    """Whether the last train_step's update was skipped (non-finite loss or gradients)."""

    def __init__(self, run, world, engine, scheduler, model, train_data, val_data, run_dir: Path) -> None:
        self.run, self.world, self.engine, self.scheduler = run, world, engine, scheduler
        self.model: GPT = model
        self.train_data, self.val_data = train_data, val_data
        self.run_dir = run_dir
        self.checkpoint_dir = run_dir / "checkpoints"
        self.metrics = MetricsFile(run_dir / "metrics.jsonl", enabled=world.is_main)
        from train.sinks import open_sinks  # plots and W&B (rank 0 only); wandb imported only when asked for

        self.sinks = open_sinks(run, world.is_main, run_dir)
        self.expert_counts = ExpertCounts(world.replica_group)
        self.nonfinite = NonFiniteStreak(run.trainer.max_nonfinite_steps)
        self.run_lock = RunDirectoryLock(run_dir)
        trainer = run.trainer
        self.global_batch = trainer.micro_batch_size * trainer.grad_accum * world.data_parallel_size
        self.tokens_per_step = self.global_batch * run.model.seq_len
        self.params = model.parameter_counts(expert_choice_group(run.moe, trainer.micro_batch_size, run.model.seq_len))
        self.flops_per_token = flops_per_token(
            self.params["active_matmul"], run.model.num_layers, run.model.hidden_size, run.model.seq_len
        )
        self.peak_tflops, self.peak_source = peak_tflops(world.device, trainer.peak_tflops)
        self._warned_mfu = False
        # The validation windows and batches (train.data.TokenDataset.eval_batches): what the initial
        # val loss was measured on, carried in checkpoints, so that a resume with other windows says so.
        self.validation_set = {"eval_batches": trainer.eval_batches, "micro_batch_size": trainer.micro_batch_size,
                               "seq_len": run.model.seq_len}
        self.initial_validation_set: dict | None = self.validation_set
        self.tokens_before = 0  # how many more tokens the steps before a resume trained than at this batch

    def _keep_tokenizer(self) -> None:
        """A copy of the tokenizer in the run directory: eval, generate and export then read it from
        there, not from a data cache that may have been cleared or lie relative to another cwd."""
        write_text_atomically(self.run_dir / "tokenizer.json", self.tag_files["tokenizer.json"])

    # ------------------------------------------------------------------ the job
    def fit(self, preemption: PreemptionWatch | None = None) -> dict[str, Any]:
        """The loop. With `preemption`, a stop signal to any rank ends it at the next step boundary
        with a checkpoint (train/preemption.py). Rank 0 holds the run directory's lock throughout
        (train/run_lock.py)."""
        try:
            return self._fit(preemption)
        finally:
            self.run_lock.release()

    def _fit(self, preemption: PreemptionWatch | None) -> dict[str, Any]:
        run, world = self.run, self.world
        start_step, initial_val_loss = 0, None
        window = LogWindow(world.device)  # the steps the next train record averages
        settings = OmegaConf.to_container(OmegaConf.structured(run))
        settings_yaml = OmegaConf.to_yaml(settings)
        # Into every checkpoint this session saves: what its weights go with (train/checkpoint.py save).
        self.tag_files = {"config.yaml": settings_yaml,
                          "tokenizer.json": (self.train_data.data_dir / "tokenizer.json").read_text(encoding="utf-8")}
        # (The broadcast also holds every other rank until rank 0 has written the run's files.)
        stop_every_rank_on(self._claim_run_dir(settings_yaml) if world.is_main else None)
        if run.trainer.resume:
            # Compared with the settings the checkpoint was saved with (its own config.yaml). The run
            # directory's is replaced only once the checkpoint has loaded, so a resume that fails
            # leaves the run as eval, generate and export read it; they read a tag's own first.
            changes = changed_settings(saved_settings(self.run_dir), settings)
            self._check_same_tokenizer()
            state = self._load_checkpoint(changes)
            failed: str | None = None
            if world.is_main:
                if changes:
                    print(f"resume      settings changed since the last save: {describe(changes)}", flush=True)
                try:
                    self._remove_tags_after_latest("resume")
                    write_text_atomically(self.run_dir / "config.yaml", settings_yaml)
                    self._keep_tokenizer()  # the data's, as config.yaml is the settings', of the run as it goes on
                    self.metrics.truncate_after(state["step"])
                except OSError as error:  # a full disk after a crash: one line, and no rank left waiting for rank 0
                    failed = f"trainer.run_dir: cannot prepare {self.run_dir} for the resume: {error}"
            stop_every_rank_on(failed)
            start_step, initial_val_loss = state["step"], state.get("initial_val_loss")
            # A save that ended a run may follow skipped steps (below): their count carries on.
            self.nonfinite.in_a_row = state.get("nonfinite_in_a_row", 0)
            # Tokens trained before the resume, at the global batch of then (a resume may change it).
            self.tokens_before = state.get("tokens", start_step * self.tokens_per_step) - start_step * self.tokens_per_step
            # None in checkpoints written before it was saved: then not known to differ.
            self.initial_validation_set = state.get("initial_validation_set")
            rank_state = state.get("rank_state")  # this rank's, at the same layout only
            if rank_state is not None:  # the unlogged steps' figures continue as if the run had not stopped
                self.expert_counts.restore(state["expert_counts_logged"], rank_state["expert_window"], world.device)
                window.restore(rank_state["log_window"], self.tokens_per_step)
            else:  # (absent from checkpoints written before the counts were saved: then they start here)
                self.expert_counts.restore(state.get("expert_counts"))
        elif run.trainer.auto_resume:
            failed = None
            if world.is_main:
                try:
                    self.metrics.truncate_after(-1)  # killed before its first checkpoint: start the record over
                    self._remove_tags_after_latest("start")  # and its first save's files must not mix with ours
                except OSError as error:
                    failed = f"trainer.run_dir: cannot prepare {self.run_dir} for a new start: {error}"
            stop_every_rank_on(failed)
        self._print_header(start_step)
        if initial_val_loss is None:
            evaluation = self.evaluate()
            initial_val_loss = evaluation["val_loss"]
            self._log({"event": "eval", "step": 0, "tokens": 0, **finite_figures(evaluation)})

        progress = Progress(run.trainer.max_steps, start_step, run.logging.progress_bar, world.is_main)
        started = time.perf_counter()
        window.start_clock()  # (a restored window keeps its steps, sums and earlier training time)
        train_loss, val_loss = float("nan"), initial_val_loss
        final_evaluation: dict[str, float] = {}
        timed_tokens, timed_seconds = 0, 0.0  # the logged windows' training time, for summary.json
        for step in range(start_step, run.trainer.max_steps):
            lm_loss, aux_loss = self.train_step(step)
            window.add(lm_loss, aux_loss, skipped=self.last_step_skipped, tokens=self.tokens_per_step)
            done = step + 1
            self._stop_after_nonfinite_streak(self.nonfinite, done)
            figures: dict[str, str] = {}
            if done % run.logging.log_every == 0 or done == run.trainer.max_steps:
                train_loss, aux = (mean_over_ranks(float(total) / window.applied, world.device) if window.applied
                                   else float("nan") for total in (window.loss_sum, window.aux_sum))
                seconds = window.training_seconds()
                timed_tokens, timed_seconds = timed_tokens + window.tokens, timed_seconds + seconds
                record = self._train_record(done, train_loss, aux, window.tokens / seconds)
                self._log(record)
                figures = {"loss": f"{train_loss:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}",
                           "mfu": f"{100 * (record['mfu'] or 0):.1f}%"}
                if (record["mfu"] or 0) > 1 and not self._warned_mfu and run.trainer.peak_tflops is None:
                    # Only a measured peak can be too low: a CPU busy with other work while it was timed.
                    self._warned_mfu = True
                    progress.print(f"warning     MFU {100 * record['mfu']:.0f}% is above 100%: the peak, "
                                   f"{self.peak_tflops:.3g} TFLOP/s ({self.peak_source}), was measured low, likely on a "
                                   "busy machine; MFU is not meaningful in this run (trainer.peak_tflops=X sets the peak)")
                window.reset()
            if (run.trainer.eval_every and done % run.trainer.eval_every == 0) or done == run.trainer.max_steps:
                with window.excluding():  # the record's sinks too: plots=eval draws every layer here
                    evaluation = self.evaluate()
                    val_loss, final_evaluation = evaluation["val_loss"], evaluation
                    # A diverged model's NaN or inf is logged as null (JSON has neither); the non-finite
                    # streak stops the run, not a metrics write failing on rank 0 alone.
                    self._log({"event": "eval", "step": done, "tokens": self._tokens(done), **finite_figures(evaluation)})
                    modes = "".join(f", {k[4:]} {v:.4f}" for k, v in evaluation.items() if k.startswith("val_loss_"))
                    progress.print(f"step {done}: val loss {val_loss:.4f}, perplexity {perplexity(val_loss):.1f}{modes}")
            due = (run.trainer.checkpoint_every and done % run.trainer.checkpoint_every == 0) or done == run.trainer.max_steps
            # Asked before the save: a periodic save at the step a job stops on is the one it ends on
            # (trainer.portable_checkpoint=final writes the layout-free copy into it).
            received = preemption.agreed() if preemption is not None and done < run.trainer.max_steps else None
            ends_run = done == run.trainer.max_steps or bool(received)
            # Periodic saves only after an applied update, so that `latest` is the last good state when
            # a streak of non-finite losses stops the run. A save that ends the run is made after a
            # skipped step too: nothing was updated, the state is the one the run goes on from, and
            # without it the run's last steps would be lost (and redone, and skipped, at every resume).
            if due and (ends_run or not self.last_step_skipped):
                with window.excluding():  # tokens/s and MFU measure training only (summary.json's: the whole wall time)
                    self._save(done, initial_val_loss, window, ends_run=ends_run)
            if received:
                self._stop_for_preemption(received, done, bool(due), initial_val_loss, window, progress)
            progress.update(1, **figures)
        progress.close()
        wall = time.perf_counter() - started
        training_tokens_per_s = timed_tokens / timed_seconds if timed_seconds > 0 else None
        return self._finish(start_step, train_loss, val_loss, initial_val_loss, wall, training_tokens_per_s, final_evaluation)

    def _check_same_tokenizer(self) -> None:
        """A resume trains on the tokenizer its checkpoint was trained with, or not at all: data files
        changed since give a newly trained tokenizer (often of the same size, so the weights would
        load), under which every id means other text."""
        tag = checkpoint.latest_tag(self.checkpoint_dir)
        saved = checkpoint.tag_or_run_file(self.checkpoint_dir / tag, "tokenizer.json") if tag else None
        if saved is not None and saved.is_file() and saved.read_text(encoding="utf-8") != self.tag_files["tokenizer.json"]:
            raise ConfigError(f"trainer.resume: the data's tokenizer ({self.train_data.data_dir / 'tokenizer.json'}) is not "
                              f"the one the checkpoint was trained with ({saved}): data.files or data.vocab_size changed "
                              "since, and every token id would mean other text; resume with the run's data")

    def _load_checkpoint(self, changes: list[tuple[str, Any, Any]]) -> dict[str, Any]:
        """checkpoint.load, with a checkpoint that does not fit this model (a changed width, expert
        count, vocabulary) reported in one line that names what changed."""
        shape_changes = [change for change in changes if change[0].startswith(SHAPE_SECTIONS)]
        try:
            return checkpoint.load(self.engine, self.checkpoint_dir, self.world.rank)
        except ConfigError as error:
            # More experts or layers than were saved: the files the model asks for were never
            # written, which checkpoint.load reports as an unreadable checkpoint. With a changed
            # shape, the change is what to report (an earlier checkpoint would fail the same way).
            missing = error.__context__
            if not shape_changes or not isinstance(missing, FileNotFoundError):
                raise
            detail = f"no {Path(missing.filename).name} in it" if missing.filename else "a file it does not hold"
        except (RuntimeError, FileNotFoundError, KeyError) as error:
            text = str(error)
            mismatch = next((line.strip().rstrip(".") for line in text.splitlines() if "size mismatch for" in line), None)
            if mismatch is None and not shape_changes and "Error(s) in loading state_dict" not in text:
                raise
            detail = mismatch or (text.strip().splitlines() or [type(error).__name__])[0]
        changed = f"; changed since it was saved: {describe(shape_changes)}" if shape_changes else ""
        raise ConfigError(f"trainer.resume: the checkpoint in {self.checkpoint_dir} does not fit the model this config "
                          f"builds ({detail}){changed}; resume with the settings in {self.run_dir / 'config.yaml'}") from None

    def _claim_run_dir(self, settings_yaml: str) -> str | None:
        """Rank 0's start in the run directory: create it, take its lock and, for a fresh run, write its
        config.yaml and tokenizer. Why the run cannot start there, or None; never raised here, so that
        the other ranks, waiting for rank 0, stop with the same line (`stop_every_rank_on`)."""
        fresh = not self.run.trainer.resume
        try:
            if fresh:
                self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # what `unwritable_reason` cannot foresee (a read-only mount, /proc)
            return f"trainer.run_dir: cannot create {self.run_dir}: {error.strerror}"
        try:
            in_use = self.run_lock.acquire()  # before anything of this run is written into the directory
            if in_use is None and fresh:
                write_text_atomically(self.run_dir / "config.yaml", settings_yaml)
                self._keep_tokenizer()
        except OSError as error:  # a full disk, a read-only mount
            return f"trainer.run_dir: cannot write into {self.run_dir}: {error}"
        return in_use

    def _portable(self, ends_run: bool) -> bool:
        """Whether this save writes the layout-free optimizer copy (trainer.portable_checkpoint)."""
        policy = self.run.trainer.portable_checkpoint
        return policy == "always" or (policy == "final" and ends_run)

    def _initial_on_other_windows(self) -> bool:
        """Whether the initial val loss was measured on other windows or batches than the final one."""
        return self.initial_validation_set is not None and self.initial_validation_set != self.validation_set

    def _save(self, done: int, initial_val_loss: float, window: LogWindow, ends_run: bool) -> None:
        """A checkpoint of step `done`: the engine's state, and besides it the run's figures so far
        (`expert_counts`, with the unlogged steps folded in, for a resume at another layout) and each
        rank's part of the unlogged window (for a resume at the same layout). Collective."""
        client_state = {"step": done, "tokens": self._tokens(done), "initial_val_loss": initial_val_loss,
                        "initial_validation_set": self.initial_validation_set,
                        "expert_counts": self.expert_counts.through_now(),
                        "expert_counts_logged": self.expert_counts.total_state(),
                        "nonfinite_in_a_row": self.nonfinite.in_a_row}
        rank_state = {"log_window": window.state(), "expert_window": self.expert_counts.window_state()}
        # Records that did not reach metrics.jsonl (a full disk) must not end up before `latest`: a resume
        # from this checkpoint would never log them again. Then the save stops every rank instead.
        held = self.metrics.write_held()
        checkpoint.save(self.engine, self.checkpoint_dir, done, client_state, self.world.rank, self._portable(ends_run),
                        self.run.trainer.keep_checkpoints, self.tag_files, rank_state,
                        failure=None if held is None else f"rank {self.world.rank} {held}")

    def _tokens(self, step: int) -> int:
        """Tokens trained up to `step`, counting the steps before a resume at their own global batch."""
        return self.tokens_before + step * self.tokens_per_step

    def _stop_for_preemption(self, received: str, done: int, saved: bool, initial_val_loss: float, window: LogWindow,
                             progress) -> None:
        """Checkpoint this step (unless the loop just did; a skipped step's too, see `fit`), record the
        stop in metrics.jsonl, and leave with Preempted."""
        if not saved:
            self._save(done, initial_val_loss, window, ends_run=True)
        self._log({"event": "preempted", "step": done, "tokens": self._tokens(done), "signal": received,
                   "checkpoint": checkpoint.latest_tag(self.checkpoint_dir)})
        self.metrics.report_held()
        self._finish_sinks_early(f"preempted by {received}", done)
        progress.close()
        stop = Preempted(done, received)
        if self.world.is_main:
            tag = checkpoint.latest_tag(self.checkpoint_dir)
            if stop.interrupted:
                print(f"interrupted {received} at step {done}: checkpoint {tag} saved; continue with "
                      f"{continue_overrides(self.run_dir)}", flush=True)
            else:
                print(f"preempted   {received} at step {done}: checkpoint {tag} saved, exiting with status "
                      f"{PREEMPTED_EXIT_STATUS} (trainer.auto_resume=true continues from it)", flush=True)
        raise stop

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches; returns mean (LM loss, aux loss)."""
        trainer, world = self.run.trainer, self.world
        batch = self.train_data.sample_batch(trainer.seed, step, self.global_batch, self.run.model.seq_len)
        # Every rank draws the same global batch and takes its replica's slice (tensor-parallel
        # ranks share one): the data order depends only on (seed, step), whatever the number of
        # ranks, and resuming needs no reader state.
        batch = torch.from_numpy(batch).view(trainer.grad_accum, world.data_parallel_size, trainer.micro_batch_size, -1)
        lm_total = torch.zeros((), device=world.device, dtype=torch.float64)
        aux_total = torch.zeros_like(lm_total)
        step_routing = []
        for micro in range(trainer.grad_accum):
            tokens = batch[micro, world.data_parallel_rank].to(world.device, non_blocking=True)
            out = self.engine(tokens[:, :-1])
            lm_loss = F.cross_entropy(out.logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            # A NaN/Inf loss becomes NaN gradients, and DeepSpeed then skips the whole step
            # (train/nonfinite.py); a finite loss is multiplied by exactly 1.
            self.engine.backward(poison_if_nonfinite(lm_loss + out.aux_loss))
            boundary = self.engine.is_gradient_accumulation_boundary()
            self.engine.step()
            step_routing.append(out.moe_aux)
            lm_total += lm_loss.detach()
            aux_total += out.aux_loss.detach()
            if boundary:
                # Skipped for a non-finite loss on any rank, or non-finite gradients (all ranks agree).
                self.last_step_skipped = not self.engine.was_step_applied()
                if self.last_step_skipped:
                    discard_routing_statistics(self.model)
                    continue
                # No host-side check of the loss here: reading it would wait for the optimizer's
                # kernels every step. A non-finite loss always poisons the gradient norm, so DeepSpeed
                # cannot apply it (tests/integration/test_nonfinite.py checks that it does not).
                # Once per optimizer step, with every micro-batch's routing counted: bias
                # balancing, the global balancing loss's fractions, expert-choice thresholds.
                update_routing_state(self.model, self.world.replica_group)
                for moe_aux in step_routing:
                    self.expert_counts.add(moe_aux)
        return lm_total / trainer.grad_accum, aux_total / trainer.grad_accum

    def evaluate(self) -> dict[str, float]:
        """Validation loss and perplexity. For expert choice, in both routing modes: `val_loss`
        is the configured eval mode (moe.ec_eval_mode), plus `val_loss_causal` and
        `val_loss_batch` (before thresholds exist, at step 0, only batch)."""
        if not expert_choice_layers(self.model):
            loss = self._validation_loss()
            return {"val_loss": loss, "val_ppl": perplexity(loss)}
        results = {}
        for mode in ("batch", "causal"):
            if mode == "causal" and not thresholds_ready(self.model):
                continue
            with routing(self.model, RoutingMode(mode, ec_eval_mode=mode)):
                results[f"val_loss_{mode}"] = self._validation_loss()
        loss = results.get(f"val_loss_{self.run.moe.ec_eval_mode}", results["val_loss_batch"])
        return {"val_loss": loss, "val_ppl": perplexity(loss), **results}

    @torch.no_grad()
    def _validation_loss(self) -> float:
        """Mean token loss over the same validation windows every time, shared out over the model
        replicas and the sums added up: the loss of one process computing them all, in about a
        replica's share of the time. Ranks meet in every forward (the expert-parallel all-to-all,
        whose capacity follows the batch's size), so in each round every replica takes a batch of
        the same shape: the full batches go round in turns, and what does not fill a round (the
        remainder, a shorter last batch) every replica computes, counted by the first alone."""
        self.engine.eval()
        batches = self.val_data.eval_batches(self.run.trainer.micro_batch_size, self.run.model.seq_len,
                                             self.run.trainer.eval_batches)
        replicas, replica = self.world.data_parallel_size, self.world.data_parallel_rank
        shared_out = batches.full_batches - batches.full_batches % replicas
        total, count = 0.0, 0
        for index in range(len(batches)):
            if index < shared_out and index % replicas != replica:
                continue  # another replica's: not even read
            loss_sum, predicted = token_loss_sum(self.engine, batches[index], self.world.device)
            if index < shared_out or replica == 0:
                total, count = total + loss_sum, count + predicted
        sums = torch.tensor([total, count], dtype=torch.float64, device=self.world.device)
        dist.all_reduce(sums, group=self.world.replica_group)
        self.engine.train()
        return float(sums[0] / sums[1])

    # ------------------------------------------------------------------ records
    def _mfu(self, tokens_per_s: float) -> float | None:
        return finite_or_none(self.flops_per_token * tokens_per_s / (self.peak_tflops * 1e12 * self.world.world_size))

    def _train_record(self, step: int, loss: float, aux: float, tokens_per_s: float) -> dict[str, Any]:
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "event": "train",
            "step": step,
            "tokens": self._tokens(step),
            "loss": finite_or_none(loss),
            "aux_loss": finite_or_none(aux),
            "skipped_nonfinite": self.engine.skipped_steps,
            "lr": self.scheduler.last_step_lr(),  # the step's own, not the next one's
            "grad_norm": finite_or_none(float(grad_norm)) if grad_norm is not None else None,
            "tokens_per_s": tokens_per_s,
            "mfu": self._mfu(tokens_per_s),
            "experts": self.expert_counts.reduce_window(),
        }

    def _stop_after_nonfinite_streak(self, streak: NonFiniteStreak, step: int) -> None:
        """Count a skipped step; at trainer.max_nonfinite_steps in a row, record and print why and
        stop (before this step's checkpoint: `latest` keeps naming the last good one)."""
        try:
            streak.record(step, self.last_step_skipped, lambda: checkpoint.latest_tag(self.checkpoint_dir))
        except NonFiniteLossStop as stop:
            self._log({"event": "stopped", "step": step, "reason": "non-finite loss",
                       "skipped_nonfinite": self.engine.skipped_steps})
            self.metrics.report_held()
            self._finish_sinks_early("non-finite loss", step)
            if self.world.is_main:
                print(stop.message, file=sys.stderr, flush=True)
            raise

    def _finish_sinks_early(self, reason: str, step: int) -> None:
        """A run that stops before max_steps writes no summary.json, but its plots are still drawn
        and its W&B run closed (flushed, marked with why it stopped)."""
        self.sinks.finish({"stopped": reason, "steps": step})

    def _log(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        self.sinks.write(record)  # after metrics.jsonl: the plot sink draws from it

    def _remove_tags_after_latest(self, label: str) -> None:
        """Clear the tags newer than the one `latest` names (all of them when there is none), and say
        so. A save that did not finish (no config.yaml: killed) is removed, its space back. A complete
        one, where `latest` was set back by hand, is moved to checkpoints/set_aside/ instead: this run
        saves its own steps under those names, but the checkpoint may still be wanted."""
        for tag_dir in checkpoint.unfinished_tags(self.checkpoint_dir):
            if (tag_dir / "config.yaml").is_file():
                kept = checkpoint.set_aside(tag_dir)
                print(f"{label:<11} moved {tag_dir.name}, newer than the one `latest` names, to {kept} "
                      "(delete it when it is not needed)", flush=True)
            else:
                shutil.rmtree(tag_dir, ignore_errors=True)
                print(f"{label:<11} removed {tag_dir.name}, a save that did not finish", flush=True)

    def _print_header(self, start_step: int) -> None:
        p, run = self.params, self.run
        what = f"resuming at step {start_step}" if start_step else "starting"
        lines = [
            f"run dir     {self.run_dir}  ({what})",
            f"device      {self.world.device.type} x {self.world.world_size}, "
            f"{'bf16' if self.engine.bfloat16_enabled() else 'fp32'}, ZeRO-{run.deepspeed.zero_stage}, "
            f"ep_size {run.moe.ep_size}" + (f", tensor_parallel {tp}" if (tp := self.world.tensor_parallel) > 1 else ""),
            f"model       {p['total'] / 1e6:.2f}M parameters, {p['active'] / 1e6:.2f}M active per token, "
            + _moe_description(run.moe, p["moe_layers"]),
            f"batch       {self.global_batch} x {run.model.seq_len} tokens per step, {run.trainer.max_steps} steps",
            f"MFU against {self.peak_tflops:.2f} TFLOP/s per device ({self.peak_source})",
        ]
        short = short_warmup_warning(run.deepspeed.warmup_steps, run.trainer.max_steps, run.deepspeed.lr)
        if short:
            lines.append(f"warning     {short}")
        if self.world.is_main:
            print("\n".join(lines), flush=True)

    def _finish(self, start_step, train_loss, val_loss, initial_val_loss, wall, training_tokens_per_s,
                final_evaluation) -> dict[str, Any]:
        run = self.run
        steps_run = run.trainer.max_steps - start_step
        tokens_per_s = steps_run * self.tokens_per_step / wall if wall > 0 else 0.0
        totals = self.expert_counts.total
        summary = {
            "run_dir": str(self.run_dir),
            "steps": run.trainer.max_steps,
            "tokens": self._tokens(run.trainer.max_steps),
            "final_train_loss": finite_or_none(train_loss),
            "skipped_nonfinite": self.engine.skipped_steps,
            "initial_val_loss": finite_or_none(initial_val_loss),
            "initial_val_loss_on_other_windows": self._initial_on_other_windows(),
            "final_val_loss": finite_or_none(val_loss),
            "final_val_ppl": finite_or_none(perplexity(val_loss)),
            **{f"final_{k}": v for k, v in finite_figures(final_evaluation).items() if k.startswith("val_loss_")},
            "wall_time_s": wall,
            "steps_this_session": steps_run,
            "tokens_per_s": tokens_per_s,
            "mfu": self._mfu(tokens_per_s),
            # Over the logged windows' training time alone: the figures above take the whole wall time,
            # evaluations and saves included (expert choice evaluates in two routing modes).
            "training_tokens_per_s": training_tokens_per_s,
            "training_mfu": None if training_tokens_per_s is None else self._mfu(training_tokens_per_s),
            "peak_tflops": finite_or_none(self.peak_tflops),  # NaN for a GPU of unknown peak
            "peak_source": self.peak_source,
            "parameters": self.params,
            "flops_per_token": self.flops_per_token,
            "experts": figures_per_layer(totals) if totals is not None else {},
        }
        problem: str | None = None
        if self.world.is_main:
            try:
                write_text_atomically(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            except OSError as error:  # a full disk: said on every rank, not raised on rank 0 alone
                problem = (f"trainer.run_dir: could not write {self.run_dir / 'summary.json'} ({error.strerror}); the run "
                           f"finished and its checkpoint {checkpoint.readable_latest(self.checkpoint_dir)} is saved")
            self.sinks.finish(summary)  # the plots drawn and the W&B run closed either way
        if self.world.is_main and problem is None:
            mfu = "n/a" if summary["mfu"] is None else f"{100 * summary['mfu']:.1f}%"
            other = (" (measured on other validation windows: trainer.micro_batch_size, eval_batches or "
                     "model.seq_len changed since)") if summary["initial_val_loss_on_other_windows"] else ""
            print(
                f"done        val loss {initial_val_loss:.3f}{other} -> {val_loss:.3f} (perplexity {perplexity(val_loss):.1f}), "
                f"{tokens_per_s:.0f} tokens/s, MFU {mfu}, {wall:.0f} s\n"
                f"summary     {self.run_dir / 'summary.json'}",
                flush=True,
            )
        stop_every_rank_on(problem)  # (and no rank leaves before rank 0 has written the summary)
        return summary
