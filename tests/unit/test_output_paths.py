"""Where a command's output goes is checked before any work (train/commands.py `output_problem`)."""

from __future__ import annotations

from train.commands import output_problem


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
