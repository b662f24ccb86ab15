"""A checkpoint save as every rank goes through it (train/checkpoint.py `save`, train/rank_writes.py):
each rank flushes the files it wrote, `latest` moves only after every rank's files are on disk, and a
write that fails on one rank stops every rank with one line instead of leaving the others waiting.

A world of one process (gloo); other ranks are played by the `rank` argument and by what the gather
returns."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from train import checkpoint, rank_writes
from train.checkpoint import CheckpointNotSaved
from train.distributed import init_world

OPTIMIZER_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class TorchCheckpointEngine:
    """DeepSpeed's checkpoint engine as far as a save uses it."""

    def __init__(self, fail_on: str | None = None, error: Exception | None = None):
        self.fail_on, self.error = fail_on, error

    def save(self, state_dict, path):
        if self.fail_on is not None and Path(path).name == self.fail_on:
            Path(path).write_bytes(b"PK\x03\x04 half")  # what a full disk leaves
            raise self.error
        torch.save(state_dict, path)

    def makedirs(self, path, exist_ok=False):
        os.makedirs(path, exist_ok=exist_ok)


class Engine:
    """DeepSpeed's engine in the order its `save_checkpoint` writes: folders, state files, rank 0's
    recovery script (beside the tags), then its closing barrier (recorded in `events`, which the test
    shares). And one file written past the checkpoint engine, as another DeepSpeed version might."""

    def __init__(self, events: list, checkpoint_engine: TorchCheckpointEngine | None = None):
        self.events, self.checkpoint_engine = events, checkpoint_engine or TorchCheckpointEngine()

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        self.checkpoint_engine.makedirs(save_dir, exist_ok=True)
        self.checkpoint_engine.save({"step": client_state["step"]}, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))
        self.checkpoint_engine.save({"moments": 1}, os.path.join(save_dir, tag, OPTIMIZER_FILE))
        Path(save_dir, tag, "unrouted.json").write_text("{}")
        self._copy_recovery_script(save_dir)
        self.events.append(("deepspeed barrier", None))

    def _copy_recovery_script(self, save_path):
        Path(save_path, "zero_to_fp32.py").write_text("# DeepSpeed's script")


@pytest.fixture
def events(monkeypatch):
    """fsyncs (by file name) and the save's collectives, in order."""
    init_world("cpu")
    seen: list = []
    for module in (checkpoint, rank_writes):
        monkeypatch.setattr(module, "fsync_path", lambda path: seen.append(("fsync", path.name)))
    gather = dist.all_gather_object
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: (seen.append(("agree", None)), gather(out, obj)))
    monkeypatch.setattr(checkpoint.portable_state, "save", lambda engine, tag_dir, writes, with_tensors: None)
    return seen


def _previous_checkpoint(checkpoint_dir: Path) -> None:
    (checkpoint_dir / "step_00000002").mkdir(parents=True)
    (checkpoint_dir / "step_00000002" / "mp_rank_00_model_states.pt").write_bytes(b"kept")
    (checkpoint_dir / "latest").write_text("step_00000002")


def test_each_rank_flushes_its_own_files_and_latest_moves_after_all_of_them(tmp_path, events):
    """On a shared file system each node caches its own writes, so only the rank that wrote a file can
    flush it: every rank flushes its files before the ranks agree, and rank 0 moves `latest` after."""
    other = tmp_path / "r1"
    (other / "step_00000004").mkdir(parents=True)
    (other / "step_00000004" / "written_by_rank_0.pt").write_bytes(b"not rank 1's")
    checkpoint.save(Engine(events), other, 4, {"step": 4}, rank=1)
    assert events == [("deepspeed barrier", None), ("fsync", "rng_rank00001.pt"), ("fsync", "mp_rank_00_model_states.pt"),
                      ("fsync", OPTIMIZER_FILE), ("agree", None)]
    assert not (other / "latest").exists()  # rank 0's part

    events.clear()
    main = tmp_path / "r0"
    checkpoint.save(Engine(events), main, 4, {"step": 4}, rank=0, tag_files={"config.yaml": "model: {}\n"})
    agree = events.index(("agree", None))
    assert events[:agree] == [("deepspeed barrier", None), ("fsync", "rng_rank00000.pt"), ("fsync", "mp_rank_00_model_states.pt"),
                              ("fsync", OPTIMIZER_FILE)]
    # After every rank's files: what no rank recorded (written past the checkpoint engine), the
    # folders, then the checkpoint folder's new entry; `latest` is written last.
    after = [name for _, name in events[agree + 1:]]
    assert after[0] == "unrouted.json" and "step_00000004" in after and after[-2:] == ["r0", tmp_path.name]
    assert checkpoint.latest_tag(main) == "step_00000004"
    assert (main / "step_00000004" / "config.yaml").read_text() == "model: {}\n"


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1472 vs 1366")])
def test_a_write_that_fails_still_joins_every_collective_then_every_rank_stops(tmp_path, events, error):
    """A full disk (torch's zip writer reports it as a RuntimeError): the rank records it and goes on
    through DeepSpeed's barrier and the agreement, where it would otherwise have left the others
    waiting; then the save stops with one line, the part-written tag removed, `latest` unchanged."""
    _previous_checkpoint(tmp_path)
    engine = Engine(events, TorchCheckpointEngine(fail_on=OPTIMIZER_FILE, error=error))
    with pytest.raises(CheckpointNotSaved, match=rf"^checkpoint step_00000004 not saved: rank 0 could not write "
                                                 rf"{tmp_path / 'step_00000004' / OPTIMIZER_FILE} \({type(error).__name__}: "
                                                 rf".*; \d+ MiB free there\); {tmp_path / 'latest'} still names step_00000002, "
                                                 rf"the last complete one$"):
        checkpoint.save(engine, tmp_path, 4, {"step": 4}, rank=0)
    assert ("deepspeed barrier", None) in events and ("agree", None) in events
    # (DeepSpeed's script copy came after the failure, so it was skipped.)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]
    assert checkpoint.latest_tag(tmp_path) == "step_00000002"
    # The engine's own methods again: the guard was an instance attribute for the save only.
    assert "save" not in vars(engine.checkpoint_engine) and "_copy_recovery_script" not in vars(engine)


def test_another_ranks_failure_stops_this_rank_too(tmp_path, events, monkeypatch):
    """Rank 0 wrote everything, rank 1 did not: rank 0 removes the tag and stops with rank 1's line."""
    _previous_checkpoint(tmp_path)
    rank_file = tmp_path / "step_00000004" / "rng_rank00001.pt"
    failure = f"rank 1 could not write {rank_file} (OSError: [Errno 122] Disk quota exceeded)"

    def gathered(out, obj):
        events.append(("agree", None))
        out[:] = [obj, (failure, [])]

    monkeypatch.setattr(dist, "all_gather_object", gathered)
    with pytest.raises(CheckpointNotSaved, match=rf"^checkpoint step_00000004 not saved: {re.escape(failure)}; "):
        checkpoint.save(Engine(events), tmp_path, 4, {"step": 4}, rank=0)
    assert events[-1] == ("agree", None)  # nothing flushed after: the tag is not kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002", "zero_to_fp32.py"]


def test_rank_zeros_own_finishing_write_failing_stops_every_rank(tmp_path, events, monkeypatch):
    """The tag's config.yaml (or `latest`) cannot be written: rank 0 says so to every rank (which wait
    for it at the broadcast), and the tag goes."""
    _previous_checkpoint(tmp_path)
    written = checkpoint.write_text_atomically

    def full_disk(path, text):
        if path.name == "config.yaml":
            raise OSError(28, "No space left on device", str(path))
        written(path, text)

    monkeypatch.setattr(checkpoint, "write_text_atomically", full_disk)
    with pytest.raises(CheckpointNotSaved, match=rf"^checkpoint step_00000004 not saved: rank 0 could not write "
                                                 rf"{tmp_path / 'step_00000004' / 'config.yaml'} \(No space left on device\); "):
        checkpoint.save(Engine(events), tmp_path, 4, {"step": 4}, rank=0, tag_files={"config.yaml": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002", "zero_to_fp32.py"]
    assert checkpoint.latest_tag(tmp_path) == "step_00000002"


def test_only_io_errors_are_held_back_for_the_agreement(tmp_path):
    """A full disk is the user's to fix (one line after the agreement); anything else in a write is a
    bug, and keeps its traceback."""
    writes = rank_writes.RankWrites(rank=2)
    with pytest.raises(TypeError, match="cannot pickle"):
        writes.run(tmp_path / "a.pt", lambda: (_ for _ in ()).throw(TypeError("cannot pickle 'generator' object")))
    writes.run(tmp_path / "b.pt", lambda: (_ for _ in ()).throw(OSError(122, "Disk quota exceeded")))
    writes.save({"x": 1}, tmp_path / "c.pt")  # skipped after the failure
    assert writes.failure.startswith(f"rank 2 could not write {tmp_path / 'b.pt'} (OSError: [Errno 122] Disk quota exceeded; ")
    assert writes.written == [] and not (tmp_path / "c.pt").exists()
