"""Where a command's output goes is checked before any work (train/output_path.py)."""

from __future__ import annotations

from pathlib import Path

from train.output_path import output_problem, unwritable_reason


def test_output_paths_that_cannot_be_written_are_named(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    assert output_problem(tmp_path / "a_folder", "--json") == f"--json {tmp_path / 'a_folder'}: a folder; expected a file path"
    assert (output_problem(tmp_path / "a_file", "--out", folder=True)
            == f"--out {tmp_path / 'a_file'}: a file; expected a folder path")
    assert output_problem(tmp_path / "a_file" / "x.json", "--json") == f"--json {tmp_path / 'a_file' / 'x.json'}: " \
                                                                       f"{tmp_path / 'a_file'} is not a folder"
    # Writable: a new file (folders above it created later), an existing one, a new folder.
    assert output_problem(tmp_path / "new" / "deeper" / "x.json", "--json") is None
    assert output_problem(tmp_path / "a_file", "--json") is None
    assert output_problem(tmp_path / "a_folder" / "hf", "--out", folder=True) is None


def test_an_existing_output_folder_must_itself_be_writable(tmp_path, monkeypatch):
    # moe-export writes into an existing --out folder: its parent being writable is not enough.
    # (As root every folder is writable, so the permission answer is stood in for.)
    (tmp_path / "export").mkdir()
    monkeypatch.setattr("os.access", lambda path, mode: path != tmp_path / "export")
    assert output_problem(tmp_path / "export", "--out", folder=True) == f"--out {tmp_path / 'export'}: " \
                                                                          f"{tmp_path / 'export'} is not writable"
    assert output_problem(tmp_path / "export" / "x.json", "--json") == f"--json {tmp_path / 'export' / 'x.json'}: " \
                                                                         f"{tmp_path / 'export'} is not writable"


def test_a_device_is_not_taken_for_an_output_file():
    # Outputs are written beside their name and renamed over it: over /dev/null that would replace
    # the device's entry.
    assert unwritable_reason(Path("/dev/null")) == "not a regular file; expected a file path"


def test_relative_paths_are_named_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("taken").write_text("x")
    assert unwritable_reason(Path("taken/run"), folder=True) == "taken is not a folder"
    assert unwritable_reason(Path("new/run"), folder=True) is None
