"""Whether a command can write its output where the user asked: checked before any work, so that a
mistyped path costs a second, not the minutes of training, evaluating or preparing that come before
the last write. Every command that writes a user-chosen file or folder asks here (the run directory,
`moe-eval --json`, `moe-consolidate --out`, `moe-export --out`, `prepare --out`, the benchmarks'
--json). Imports nothing heavy: the data command uses it without torch."""

from __future__ import annotations

import os
from pathlib import Path


def unwritable_reason(path: Path, folder: bool = False) -> str | None:
    """Why `path` cannot be written as a file (or, with `folder`, as a folder the process writes into);
    None when it can. An existing path must be of that kind and writable where the write happens: the
    folder itself, or the folder in which a file is replaced. A path still to be created needs the
    nearest existing part above it to be a writable folder (the parts between are created)."""
    if path.exists():
        if path.is_dir() != folder:
            return f"{'a folder' if path.is_dir() else 'a file'}; expected a {'folder' if folder else 'file'} path"
        if not folder and not path.is_file():
            # A device, a pipe, a socket (/dev/null, /dev/stdout): outputs are written beside their
            # name and renamed over it, which would replace the device's entry, not write into it.
            return "not a regular file; expected a file path"
        where = path if folder else path.parent
        return None if _writable(where) else f"{where} is not writable"
    for parent in path.parents:  # as the user wrote them: relative parts stay relative
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is not a folder"
            return None if _writable(parent) else f"{parent} is not writable"
    return None


def output_problem(path: Path, flag: str, folder: bool = False) -> str | None:
    """`unwritable_reason`, as the one-line error of a command's `flag` (`--out`, `--json`)."""
    reason = unwritable_reason(path, folder)
    return None if reason is None else f"{flag} {path}: {reason}"


def _writable(folder: Path) -> bool:
    # Search permission too: a folder that can be written but not entered cannot take a new file.
    return os.access(folder, os.W_OK | os.X_OK)
