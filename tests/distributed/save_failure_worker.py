"""One rank of `python -m train` in which rank 1's disk is full when its first checkpoint is saved
(run by test_save_failure.py): every `torch.save` of an optimizer file on rank 1 raises what a full
disk raises, after writing part of the file. Everything else is the real command."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch

from train.cli import main

_save = torch.save


def _full_disk_on_rank_1(obj, f, *args, **kwargs):
    if os.environ["RANK"] == "1" and "optim_states" in Path(f).name:
        Path(f).write_bytes(b"PK\x03\x04")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _save(obj, f, *args, **kwargs)


if __name__ == "__main__":
    torch.save = _full_disk_on_rank_1
    main()
