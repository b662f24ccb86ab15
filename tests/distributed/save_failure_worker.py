"""One rank of `python -m train` in which rank 1's disk fills up while its first checkpoint is saved
(run by test_save_failure.py): on rank 1, every `torch.save` of an optimizer file writes its first
4 KiB and then meets ENOSPC, as on a full disk, so torch's zip writer fails as it does there.
Everything else is the real command."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import torch

from train.cli import main

_save = torch.save
ROOM = 4096
"""Bytes the disk takes before it is full."""


class _FillingFile(io.RawIOBase):
    def __init__(self, file) -> None:
        self.file, self.written = file, 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if self.written + len(data) > ROOM:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.file.write(data)


def _disk_fills_on_rank_1(obj, f, *args, **kwargs):
    if os.environ["RANK"] == "1" and "optim_states" in Path(f).name:
        with open(f, "wb") as file:
            return _save(obj, _FillingFile(file), *args, **kwargs)
    return _save(obj, f, *args, **kwargs)


if __name__ == "__main__":
    torch.save = _disk_fills_on_rank_1
    main()
