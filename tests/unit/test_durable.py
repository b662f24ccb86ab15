"""train/durable.py: a write interrupted at any point leaves the old content under the name."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from train.durable import fsync_path, replace_durably, save_safetensors, write_text_atomically


def test_write_text_atomically_replaces_the_content_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "latest"
    write_text_atomically(path, "step_00000001")
    write_text_atomically(path, "step_00000002")
    assert path.read_text() == "step_00000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_a_write_that_fails_before_the_rename_keeps_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_text_atomically(path, "old")

    def no_disk(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", no_disk)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomically(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_two_writers_of_one_file_do_not_share_a_temporary(tmp_path, monkeypatch):
    # Two evals of one run write its eval.json; the second's write happens between the first's
    # write and its rename. A shared temporary name made the first writer's rename fail.
    path = tmp_path / "eval.json"
    real_replace = os.replace
    calls = []

    def replace_with_a_second_writer_in_between(src, dst):
        calls.append(src)
        if len(calls) == 1:
            write_text_atomically(path, "second")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_with_a_second_writer_in_between)
    write_text_atomically(path, "first")
    assert path.read_text() == "first"  # the last rename wins, and each file was written whole
    assert len(set(calls)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_replace_durably_moves_a_written_file_into_place(tmp_path):
    written, path = tmp_path / "model.safetensors.partial", tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    written.write_bytes(b"new")
    replace_durably(written, path)
    assert path.read_bytes() == b"new" and not written.exists()


def test_fsync_path_flushes_files_and_directories_and_raises_for_a_missing_file(tmp_path):
    (tmp_path / "file").write_text("x")
    fsync_path(tmp_path / "file")
    fsync_path(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_path(tmp_path / "missing")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_save_safetensors_gives_the_file_the_usual_mode(tmp_path, umask):
    # safetensors alone creates 0600: an export shared with a team would be unreadable to it.
    previous = os.umask(umask)
    try:
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors", metadata={"k": "v"})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o666 & ~umask
    from safetensors import safe_open

    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        assert f.metadata() == {"k": "v"} and torch.equal(f.get_tensor("w"), torch.zeros(2))
