"""Judging a checkpoint's files themselves: what a kill or a full disk leaves."""

from __future__ import annotations

import pytest
import torch

from train.checkpoint import _first_cut_short_file


def test_a_cut_short_checkpoint_file_is_found_from_the_file_itself(tmp_path):
    """A zip archive (torch.save's format) without its end is named; a whole one, or one in torch's
    older non-zip format, is not judged cut short."""
    tag_dir = tmp_path / "step_00000003"
    (tag_dir / "zero").mkdir(parents=True)
    torch.save({"w": torch.ones(64)}, tag_dir / "a_model_states.pt")
    torch.save({"w": torch.ones(64)}, tag_dir / "b_legacy.pt", _use_new_zipfile_serialization=False)
    torch.save({"w": torch.ones(64)}, tag_dir / "zero" / "c_optim_states.pt")
    assert _first_cut_short_file(tag_dir) is None
    whole = (tag_dir / "zero" / "c_optim_states.pt").read_bytes()
    (tag_dir / "zero" / "c_optim_states.pt").write_bytes(whole[: len(whole) // 2])
    assert _first_cut_short_file(tag_dir) == tag_dir / "zero" / "c_optim_states.pt"
    (tag_dir / "a_model_states.pt").write_bytes(b"")  # nothing written before the kill
    assert _first_cut_short_file(tag_dir) == tag_dir / "a_model_states.pt"


def test_cuda_rng_state_is_this_devices_own_and_old_lists_restore_by_index(monkeypatch):
    """A rank saves and restores its own device's generator only: a resume on nodes with fewer
    devices (same layout) must not index past them. States written as a list of every device the
    rank saw restore the rank's own entry, and nothing when the list has none for it."""
    from train import checkpoint

    restored: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.tensor([i], dtype=torch.uint8) for i in range(8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restores every device"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    states = checkpoint.rng_states()
    assert states["cuda"].tolist() == [7]
    checkpoint.restore_rng_states(states)
    checkpoint.restore_rng_states({**states, "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(8)]})
    checkpoint.restore_rng_states({**states, "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(2)]})
    assert [t.tolist() for t in restored] == [[7], [3]]


def test_an_unreadable_latest_is_one_line(tmp_path):
    from train.checkpoint import latest_tag
    from train.config import ConfigError

    (tmp_path / "latest").mkdir()
    with pytest.raises(ConfigError, match=r"latest: cannot be read as a checkpoint name \(Is a directory\)"):
        latest_tag(tmp_path)
    (tmp_path / "latest").rmdir()
    (tmp_path / "latest").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"latest: cannot be read as a checkpoint name \(not text\)"):
        latest_tag(tmp_path)


def test_outputs_of_a_tag_copied_out_of_its_run_stay_beside_it(tmp_path):
    from train.checkpoint import outputs_beside, tag_or_run_file
    from train.evaluate import _default_json

    in_run = tmp_path / "run" / "checkpoints" / "step_00000003"
    copied = tmp_path / "kept" / "step_00000003"
    for tag in (in_run, copied):
        tag.mkdir(parents=True)
    (tmp_path / "config.yaml").write_text("an unrelated file one folder up")
    assert outputs_beside(in_run) == tmp_path / "run" and outputs_beside(copied) == tmp_path / "kept"
    assert _default_json(copied) == tmp_path / "kept" / "eval.json"
    assert _default_json(in_run, tmp_path / "notes.txt") == tmp_path / "run" / "eval.notes.json"
    # A tag without its own config.yaml falls back to its run's, never to a file above a copied tag.
    assert tag_or_run_file(in_run, "config.yaml") == tmp_path / "run" / "config.yaml"
    assert tag_or_run_file(copied, "config.yaml") == copied / "config.yaml"
