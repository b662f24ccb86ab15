"""Writing files so that a crash, a kill or a power loss leaves either the old content or the new,
never a truncated or empty file under the name readers use.

A rename is atomic, but not durable by itself: after a power loss the new name may point at data
that never reached the disk. So the data is flushed before the rename, and the directory after it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file or a directory to disk. Best effort for directories, which some file systems
    refuse to open or to fsync (network and FUSE mounts); a file that cannot be flushed raises."""
    is_dir = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, but the file gets the mode any new file gets (0666 less the umask):
    save_file creates it 0600, so a shared checkpoint or export would be readable by its owner only."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every thread
    for a moment): Linux reports it in /proc/self/status; elsewhere the usual 022 is assumed."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def temporary_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A name beside `path` for writing its next content: unique to this process and call, so two
    writers of the same file (two evals of one run) never write into, or rename, each other's."""
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def replace_durably(written: Path, path: Path) -> None:
    """Move the complete file `written` to `path` (atomically, replacing what is there) and make
    both its data and the rename survive a crash."""
    fsync_path(written)
    os.replace(written, path)
    fsync_path(path.parent)


def write_text_atomically(path: Path, text: str) -> None:
    """`path` holds `text` afterwards, or (after a crash) its old content; never part of either."""
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "x", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
