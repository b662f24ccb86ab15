"""Judging a checkpoint's files themselves: what a kill or a full disk leaves."""

from __future__ import annotations

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
