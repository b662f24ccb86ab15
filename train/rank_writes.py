"""One rank's writes during a checkpoint save, and the ranks' agreement on whether the save worked.

A save is collective: DeepSpeed's save and ours meet at barriers and gathers between the writes. A
rank whose write raised (a full disk, a quota, an I/O error) used to leave the collective at once, and
the other ranks waited at the next barrier for the process group's timeout: on another node of a
`deepspeed --hostfile` run no launcher stops them. So here a failed write is recorded, not raised; the
rank skips its later writes but still joins every collective, and at the end all ranks exchange what
happened (`agree`) and stop together, with one line that names the rank and the file.

Every file a rank writes into the tag is recorded too, so that the rank flushes its own files
(`flush`): on a shared file system (Lustre, GPFS, NFS) each node caches its own writes, and only the
node that wrote a file can push it to the servers.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from train.durable import fsync_path


class RankWrites:
    """The files this rank wrote into a tag, and the first write (or flush) that failed."""

    def __init__(self, rank: int, failure: str | None = None) -> None:
        """`failure`: why the save already cannot be kept, known before any write (then nothing is written)."""
        self.rank = rank
        self.written: list[Path] = []
        self.failure = failure

    def run(self, path: Path | str, write: Callable[[], Any]) -> None:
        """`write()`, which writes the file `path`: skipped after a failure, a failure recorded, not raised."""
        if self._guarded(path, write):
            self.written.append(Path(path))

    def _guarded(self, path: Path | str, action: Callable[[], Any]) -> bool:
        """`action()` on `path` unless something failed before; whether it ran and succeeded."""
        if self.failure is not None:
            return False
        try:
            action()
        except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError of its zip writer
            self.failure = f"rank {self.rank} could not write {path} ({_described(error)}{_free_space(Path(path))})"
            return False
        return True

    def make_folder(self, path: Path) -> None:
        """`path` and its parents, guarded like a write but not recorded: folders are flushed by rank 0
        once every rank has written into them (train/checkpoint.py)."""
        self._guarded(path, lambda: path.mkdir(parents=True, exist_ok=True))

    def save(self, obj: Any, path: Path | str) -> None:
        """torch.save(obj, path), as `run` does it."""
        self.run(path, lambda: torch.save(obj, path))

    @contextlib.contextmanager
    def through(self, engine) -> Iterator[None]:
        """Route DeepSpeed's own writes of a save (`engine.save_checkpoint`) through this rank's record:
        every state file goes through the engine's `checkpoint_engine.save`, its folders through
        `checkpoint_engine.makedirs`, and on rank 0 the ZeRO recovery scripts (copied beside the tags,
        not into one) through `_copy_recovery_script` (where this DeepSpeed has it). Folders and
        scripts are guarded but not recorded: rank 0 flushes the tag's folders once every rank has
        written (train/checkpoint.py), and the scripts are not part of any checkpoint."""
        checkpoint_engine = engine.checkpoint_engine
        save, makedirs = checkpoint_engine.save, checkpoint_engine.makedirs
        with contextlib.ExitStack() as stack:
            stack.enter_context(_replaced(checkpoint_engine, "save",
                                          lambda state_dict, path: self.run(path, lambda: save(state_dict, path))))
            stack.enter_context(_replaced(checkpoint_engine, "makedirs", lambda path, exist_ok=False: self._guarded(
                path, lambda: makedirs(path, exist_ok=exist_ok))))
            if (copy_scripts := getattr(engine, "_copy_recovery_script", None)) is not None:
                stack.enter_context(_replaced(engine, "_copy_recovery_script", lambda save_path: self._guarded(
                    save_path, lambda: copy_scripts(save_path))))
            yield

    def flush(self) -> None:
        """fsync every file this rank wrote (nothing after a failure: the tag will not be kept)."""
        for path in self.written:
            self._guarded(path, lambda path=path: fsync_path(path))

    def agree(self) -> tuple[list[str], list[Path]]:
        """Collective: every rank's failure, in rank order (empty when the save worked everywhere),
        and every file any rank wrote."""
        outcomes: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, (self.failure, [str(path) for path in self.written]))
        failures = [failure for failure, _ in outcomes if failure is not None]
        return failures, [Path(path) for _, paths in outcomes for path in paths]


@contextlib.contextmanager
def _replaced(obj: Any, name: str, value: Any) -> Iterator[None]:
    """obj.name is `value` (an instance attribute) inside the block, and what it was afterwards."""
    own = vars(obj)
    had, before = name in own, own.get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, before)
        else:
            delattr(obj, name)


def _described(error: OSError | RuntimeError) -> str:
    """The error in one short line, without the path the message names anyway."""
    if isinstance(error, OSError) and error.strerror:
        return f"OSError: [Errno {error.errno}] {error.strerror}"
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


def _free_space(path: Path) -> str:
    """'; N MiB free there': torch's zip writer reports a full disk as only 'unexpected pos 704 vs 598'."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return ""
    return f"; {free / 2**20:.0f} MiB free there"
