"""Checkpoints: DeepSpeed's own (model, optimizer, scheduler, one file per expert) plus our
client state (step, tokens, data position), every rank's RNG states and a layout-free copy of
the optimizer state (train/portable_state.py).

Each save goes into its own tag directory. `latest` is ours, not DeepSpeed's (which truncates
and rewrites it in place): only after every rank has written its files and flushed them to disk,
`latest` is replaced atomically, so a process killed at any moment leaves `latest` naming a
complete checkpoint, and a half-written tag directory is never picked. A write that fails on one
rank stops every rank together (train/rank_writes.py).

Resuming at the layout a checkpoint was saved at (ranks, expert-parallel size, ZeRO stage,
precision) is DeepSpeed's own load and continues the identical trajectory. At another layout
DeepSpeed loads the weights, scheduler and counters, and the fp32 master weights, AdamW moments
and step count come from the layout-free copy.
"""

from __future__ import annotations

import pickle
import random
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from train import portable_state
from train.config import ConfigError
from train.distributed import stop_every_rank_on
from train.durable import fsync_path, write_text_atomically
from train.engine import optimizer_settings, restore_optimizer_settings
from train.rank_writes import RankWrites


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # This rank's own device only: a resume on nodes with fewer devices (8 ranks on 2 x 4 GPUs
        # instead of 1 x 8) is the same layout, and each rank only ever draws on its own device.
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # written before: the state of every device the rank saw
            index = torch.cuda.current_device()
            if index >= len(cuda):  # a device the saving node did not have: nothing of it was saved
                return
            cuda = cuda[index]
        torch.cuda.set_rng_state(cuda)


class CheckpointNotSaved(ConfigError):
    """A save that failed on some rank (a full disk, a quota): every rank stops with this one line,
    `latest` unchanged. Reported as a configuration error is (one line, exit status 2): the fix is on
    the user's side, and nothing about it is a bug to trace."""


def save(engine, checkpoint_dir: Path, step: int, client_state: dict[str, Any], rank: int,
         portable: bool = True, keep: int = 0, tag_files: dict[str, str] | None = None,
         rank_state: dict[str, Any] | None = None, failure: str | None = None) -> None:
    """Collective: every rank calls it. RNG states go in a per-rank file inside the tag,
    written before `latest` moves, so a tag that `latest` names is complete.
    `portable=False` skips the layout-free optimizer copy (train/portable_state.py). `keep` >= 1:
    afterwards, only the newest `keep` checkpoints stay (`prune`); 0 keeps them all.
    `tag_files`: name -> text, written into the tag by rank 0 before `latest` moves: the settings
    and tokenizer the weights go with (the run directory's copies follow the run from the start of a
    session, so a resume killed before its first save would leave them ahead of `latest`).
    `rank_state`: this rank's own state besides its RNGs (its part of the unlogged metrics window),
    given back by `load` at the same layout as client_state["rank_state"].

    A write that fails on any rank stops every rank with `CheckpointNotSaved`, after the collectives
    of the save (train/rank_writes.py): `latest` still names the last complete checkpoint, and the
    part-written tag is removed. `failure`: a reason this rank already knows the save must not be
    kept (rank 0's metrics.jsonl not written), which stops it the same way."""
    tag = tag_for(step)
    tag_dir = checkpoint_dir / tag
    writes = RankWrites(rank, failure)
    writes.make_folder(tag_dir)
    writes.save({**rng_states(), "rank_state": rank_state}, tag_dir / f"rng_rank{rank:05d}.pt")
    with writes.through(engine):
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state, save_latest=False)
    portable_state.save(engine, tag_dir, writes, with_tensors=portable)
    # Each rank flushes what it wrote: fsync writes back what this node's page cache holds of a file,
    # and on a shared file system (Lustre, GPFS, NFS) each node caches its own writes.
    writes.flush()
    failures, written = writes.agree()  # every rank's files are written and flushed, or one failed
    if failures:
        if rank == 0 and readable_latest(checkpoint_dir) != tag:
            # Its part-written tag would hold the space the next save needs.
            shutil.rmtree(tag_dir, ignore_errors=True)
        dist.barrier()  # the tag is gone before any rank reports
        more = f" (and {len(failures) - 1} more rank{'s' if len(failures) > 2 else ''})" if len(failures) > 1 else ""
        raise CheckpointNotSaved(f"checkpoint {tag} not saved: {failures[0]}{more}; {_still_latest(checkpoint_dir)}")
    stop_every_rank_on(_complete(checkpoint_dir, tag, written, tag_files or {}, keep) if rank == 0 else None,
                       CheckpointNotSaved)


def _complete(checkpoint_dir: Path, tag: str, written: list[Path], tag_files: dict[str, str], keep: int) -> str | None:
    """Rank 0's end of a save that every rank finished: flush what no rank flushed, write the tag's own
    files, move `latest` to it, prune. What went wrong (then the tag is removed), or None."""
    tag_dir = checkpoint_dir / tag
    try:
        # The tag's folders, once every rank has written into them, deepest first. (Also any file that no
        # rank recorded, which DeepSpeed 0.19.8 does not write: rank 0 flushes what its own node holds of it.)
        for path in sorted(set(tag_dir.rglob("*")) - set(written), reverse=True):
            fsync_path(path)
        # The tag's config.yaml marks it complete (saved_tags_without_latest): written, and made
        # durable, only now that every other file is, and the last of the tag's own files.
        # Atomically: a kill while it is written must not leave a torn file that marks the tag complete.
        for name, text in sorted(tag_files.items(), key=lambda item: item[0] == "config.yaml"):
            write_text_atomically(tag_dir / name, text)
        fsync_path(tag_dir)
        fsync_path(checkpoint_dir)  # its new entry for the tag, before `latest` names the tag
        fsync_path(checkpoint_dir.parent)  # the first save created checkpoints/ itself
        write_text_atomically(checkpoint_dir / "latest", tag)
    except OSError as error:
        if readable_latest(checkpoint_dir) != tag:
            shutil.rmtree(tag_dir, ignore_errors=True)
        return f"checkpoint {tag} not saved: rank 0 could not write {error.filename or tag_dir} ({error.strerror}); " + \
            _still_latest(checkpoint_dir)
    prune(checkpoint_dir, keep)
    return None


def readable_latest(checkpoint_dir: Path) -> str | None:
    """`latest_tag`, or None where `latest` cannot be read (a save failing stops with its own line)."""
    try:
        return latest_tag(checkpoint_dir)
    except ConfigError:
        return None


def _still_latest(checkpoint_dir: Path) -> str:
    last = readable_latest(checkpoint_dir)
    return f"{checkpoint_dir / 'latest'} still names {last}, the last complete one" if last else "no earlier checkpoint was saved"


def prune(checkpoint_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints up to the one `latest` names; returns what went.

    Called only after `latest` has moved to a complete checkpoint, which is always kept, so a kill
    in the middle leaves at worst part of an older tag, removed by the next prune. Tags newer than
    `latest` (a save that was killed) are left alone here: a resume removes them (`unfinished_tags`)."""
    latest = latest_tag(checkpoint_dir)
    if keep < 1 or latest is None:
        return []
    newest = step_of(latest)
    tags = sorted((step, path) for path in checkpoint_dir.glob("step_*")
                  if (step := step_of(path.name)) is not None and step <= newest and path.is_dir())
    doomed = [path for _, path in tags[:-keep]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def tag_or_run_file(tag_dir: Path, name: str) -> Path:
    """A tag's own copy of `name` (config.yaml, tokenizer.json: what its weights go with, see `save`),
    or, for tags written before they held one, its run directory's."""
    own = tag_dir / name
    run_dir = run_dir_of(tag_dir)
    return own if own.is_file() or run_dir is None else run_dir / name


def run_dir_of(tag_dir: Path) -> Path | None:
    """The run directory of a tag at <run>/checkpoints/<tag>; None for a tag copied anywhere else."""
    return tag_dir.parent.parent if tag_dir.parent.name == "checkpoints" else None


def outputs_beside(tag_dir: Path) -> Path:
    """Where what is computed from a tag goes by default (eval.json, consolidated.safetensors): its run
    directory, or the folder holding a tag copied elsewhere (never the folder above that)."""
    return run_dir_of(tag_dir) or tag_dir.parent


def unfinished_tags(checkpoint_dir: Path) -> list[Path]:
    """Tag directories newer than the one `latest` names: saves that did not finish (killed), or, with
    their config.yaml, complete ones after a `latest` set back by hand (`set_aside`)."""
    latest = latest_tag(checkpoint_dir)
    newest = step_of(latest) if latest is not None else -1
    return sorted(path for path in checkpoint_dir.glob("step_*")
                  if path.is_dir() and (step := step_of(path.name)) is not None and step > newest)


SET_ASIDE = "set_aside"
"""The folder inside checkpoints/ where a resume moves complete tags newer than `latest` (`set_aside`)."""


def set_aside(tag_dir: Path) -> Path:
    """Move a complete tag out of the resumed run's way, to checkpoints/set_aside/<tag>-<time>: where
    `latest` was set back by hand (past a loss spike), the run saves its own steps under the later tags'
    names, which must not mix with the abandoned run's files, and those checkpoints are the user's to
    delete, not ours. A rename within the folder: nothing is copied. Returns the new path."""
    folder = tag_dir.parent / SET_ASIDE
    folder.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder / f"{tag_dir.name}-{stamp}"
    suffix = 1
    while target.exists():  # two resumes in one second
        suffix += 1
        target = folder / f"{tag_dir.name}-{stamp}-{suffix}"
    tag_dir.rename(target)
    fsync_path(folder)
    fsync_path(tag_dir.parent)
    return target


def saved_tags_without_latest(checkpoint_dir: Path) -> list[Path]:
    """When no `latest` exists: the tags whose every rank finished writing (rank 0 writes the tag's
    config.yaml after that), oldest first. Only a hand-deleted `latest` (or a kill in the instant
    between those files and `latest`) leaves one; a first save killed earlier leaves none."""
    if latest_tag(checkpoint_dir) is not None:
        return []
    return sorted(path for path in checkpoint_dir.glob("step_*")
                  if path.is_dir() and step_of(path.name) is not None and (path / "config.yaml").is_file())


def step_of(tag: str) -> int | None:
    digits = tag.removeprefix("step_")
    return int(digits) if tag.startswith("step_") and digits.isdigit() else None


def latest_tag(checkpoint_dir: Path) -> str | None:
    latest = checkpoint_dir / "latest"
    if not latest.exists():
        return None
    try:
        return latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not text"
        raise ConfigError(f"{latest}: cannot be read as a checkpoint name ({reason}); write the name of a complete "
                          "step_* folder there, or choose another trainer.run_dir") from None


def load(engine, checkpoint_dir: Path, rank: int) -> dict[str, Any]:
    """Restore the engine from the latest checkpoint; returns the client state. Same layout:
    DeepSpeed's full load plus this rank's RNG states. Another layout: weights, scheduler and
    counters by DeepSpeed, fp32 master weights and optimizer state from the layout-free copy; RNG
    states are per rank and do not carry over (training draws random numbers only for dropout-like
    options such as moe.jitter_eps)."""
    tag = latest_tag(checkpoint_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint to resume from in {checkpoint_dir} (no 'latest' file)")
    tag_dir = checkpoint_dir / tag
    if step_of(tag) is None or not (tag_dir / "mp_rank_00_model_states.pt").is_file():
        # (DeepSpeed would stop on a bare assertion, or load nothing.)
        raise ConfigError(f"{checkpoint_dir / 'latest'} names {tag!r}, which is not a checkpoint in {checkpoint_dir}: "
                          "write the name of a complete step_* folder there, or choose another trainer.run_dir")
    earlier = f"resume from an earlier checkpoint by writing its name into {checkpoint_dir / 'latest'}"
    try:
        return _load_tag(engine, checkpoint_dir, tag, rank)
    except ConfigError:
        raise
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, RuntimeError) as error:
        # A file cut short fails as RuntimeError, EOFError or EINVAL, depending on where it was cut.
        if (cut_short := _first_cut_short_file(tag_dir)) is not None:
            raise ConfigError(f"{cut_short}: cut short (a zip archive, as torch.save writes, without its end); "
                              f"{earlier}") from None
        # A RuntimeError is a model that does not fit (the caller names what changed), unless torch's
        # reader says the file is damaged inside (naming no file).
        if isinstance(error, RuntimeError) and "PytorchStreamReader" not in str(error):
            raise
        detail = (str(error).strip().splitlines() or [""])[0][:200]
        kind = "" if isinstance(error, RuntimeError) else f"{type(error).__name__}: "
        raise ConfigError(f"{tag_dir}: not a readable checkpoint ({kind}{detail}); {earlier}") from None


def _first_cut_short_file(tag_dir: Path) -> Path | None:
    """The first of the tag's .pt files that begins as a zip archive (what torch.save writes) but has no
    end (its central directory): a copy cut short by a full disk or a kill. Judged from the files
    themselves, not from torch's message; a file in torch's older, non-zip format is not judged."""
    for path in sorted(tag_dir.rglob("*.pt")):
        try:
            with path.open("rb") as file:
                begins_as_zip = file.read(4) in (b"PK\x03\x04", b"")
            if begins_as_zip and not zipfile.is_zipfile(path):
                return path
        except OSError:
            return path
    return None


def _load_tag(engine, checkpoint_dir: Path, tag: str, rank: int) -> dict[str, Any]:
    tag_dir = checkpoint_dir / tag
    index = portable_state.read_index(tag_dir)
    here = portable_state.current_layout(engine)
    settings = optimizer_settings(engine)  # this run's, which DeepSpeed's load would replace by the saved run's
    if index is None or index["layout"] == here:
        rng_file = tag_dir / f"rng_rank{rank:05d}.pt"
        if not rng_file.is_file():
            # Every save writes one per rank: without it the resume would not be exact (another
            # jitter draw, the rank's unlogged figures lost), and say nothing.
            raise ConfigError(f"{tag_dir}: not a readable checkpoint ({rng_file.name} missing); "
                              f"resume from an earlier checkpoint by writing its name into {checkpoint_dir / 'latest'}")
        path, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
        restore_optimizer_settings(engine, settings)
        saved = torch.load(rng_file, weights_only=False)
        restore_rng_states(saved)
        return {**client_state, "rank_state": saved.get("rank_state")}
    if index["layout"]["tensor_parallel"] != 1 or not portable_state.supported(engine):
        raise ConfigError(f"{tag_dir} was saved at {portable_state.describe(index['layout'])}; resuming it at "
                          f"{portable_state.describe(here)} is not supported with tensor parallelism")
    if not index.get("tensors", True):
        raise ConfigError(f"{tag_dir} was saved at {portable_state.describe(index['layout'])} without its layout-free "
                         f"optimizer copy (trainer.portable_checkpoint=never, or =final before the last step), so it "
                         f"resumes only at that layout, not at {portable_state.describe(here)}")
    path, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag, load_optimizer_states=False,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    portable_state.restore(engine, tag_dir, index)
    restore_optimizer_settings(engine, settings)
    if rank == 0:
        print(f"checkpoint  {tag} saved at {portable_state.describe(index['layout'])}, loaded at "
              f"{portable_state.describe(here)}: weights, AdamW state (step {index['optimizer_step']}) "
              "and schedule carried over", flush=True)
    return client_state
