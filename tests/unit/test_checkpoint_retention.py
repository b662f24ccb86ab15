"""trainer.keep_checkpoints: which checkpoint directories `prune` deletes, and which it never touches."""

from __future__ import annotations

from pathlib import Path

from train.checkpoint import prune


def _tags(checkpoint_dir: Path, steps: list[int], latest: int) -> None:
    for step in steps:
        (checkpoint_dir / f"step_{step:08d}").mkdir(parents=True)
        (checkpoint_dir / f"step_{step:08d}" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (checkpoint_dir / "latest").write_text(f"step_{latest:08d}")


def _left(checkpoint_dir: Path) -> list[str]:
    return sorted(p.name for p in checkpoint_dir.iterdir())


def test_keeps_the_newest_by_step_number_and_never_latest(tmp_path):
    # 900 < 1000 < 10000 by number, not by name length; "latest" is 1000.
    _tags(tmp_path, [10, 900, 1000, 200], latest=1000)
    removed = prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["step_00000010", "step_00000200"]
    assert _left(tmp_path) == ["latest", "step_00000900", "step_00001000"]
    assert prune(tmp_path, keep=2) == []  # nothing more to do


def test_keep_one_leaves_only_latest(tmp_path):
    _tags(tmp_path, [3, 6, 9], latest=9)
    prune(tmp_path, keep=1)
    assert _left(tmp_path) == ["latest", "step_00000009"]


def test_a_killed_save_newer_than_latest_and_other_files_are_left_alone(tmp_path):
    """A tag newer than `latest` is a save that was killed; a resumed run writes it again. Files and
    folders that are not step tags are not ours to delete."""
    _tags(tmp_path, [2, 4, 6], latest=4)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "step_best").mkdir()
    prune(tmp_path, keep=1)
    assert _left(tmp_path) == ["latest", "notes.txt", "step_00000004", "step_00000006", "step_best"]


def test_zero_keeps_everything_and_no_latest_deletes_nothing(tmp_path):
    _tags(tmp_path, [1, 2, 3], latest=3)
    assert prune(tmp_path, keep=0) == []
    (tmp_path / "latest").unlink()
    assert prune(tmp_path, keep=1) == []
    assert _left(tmp_path) == ["step_00000001", "step_00000002", "step_00000003"]


def test_unfinished_saves_are_the_tags_newer_than_latest_and_loading_one_is_refused(tmp_path):
    import pytest

    from train.checkpoint import unfinished_tags
    from train.config import ConfigError
    from train.load import resolve_checkpoint

    _tags(tmp_path, [2, 4, 6, 8], latest=4)
    assert [p.name for p in unfinished_tags(tmp_path)] == ["step_00000006", "step_00000008"]
    with pytest.raises(ConfigError, match=r"step_00000006: a save that did not finish \(newer than latest, step_00000004\)"):
        resolve_checkpoint(tmp_path / "step_00000006")
    assert resolve_checkpoint(tmp_path / "step_00000002") == tmp_path / "step_00000002"  # finished, only older


def test_a_first_save_that_did_not_finish_is_refused_without_a_latest(tmp_path):
    # Killed during the run's first save: no `latest` exists to compare with; the tag's config.yaml,
    # written last, is what a finished save has. A tag copied out of its run is judged by no rule.
    import pytest

    from train.config import ConfigError
    from train.load import resolve_checkpoint

    checkpoints = tmp_path / "run" / "checkpoints"
    _tags(checkpoints, [4], latest=4)
    (checkpoints / "latest").unlink()
    with pytest.raises(ConfigError, match=r"step_00000004: a save that did not finish \(no config.yaml, which a save"):
        resolve_checkpoint(checkpoints / "step_00000004")
    (checkpoints / "step_00000004" / "config.yaml").write_text("{}\n")
    assert resolve_checkpoint(checkpoints / "step_00000004") == checkpoints / "step_00000004"
    copied = tmp_path / "elsewhere" / "step_00000004"
    copied.parent.mkdir()
    (checkpoints / "step_00000004").rename(copied)
    (copied / "config.yaml").unlink()
    assert resolve_checkpoint(copied) == copied
