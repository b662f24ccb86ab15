"""One training run at a time in a run directory.

Two jobs that train into one directory (a Slurm job requeued while a copy of it was resubmitted by
hand, a launch repeated in another terminal) would save into the same tags, and the second one's
resume would remove the first one's save in progress as unfinished. Rank 0 holds an exclusive
`flock` on `<run_dir>/.train.lock` while it trains; a second run is refused in one line naming the
holder. The kernel releases the lock when the process ends, however it ends, so a killed run leaves
nothing to clean up. On a file system without locks (Lustre mounted without `flock`) the run goes on
unlocked, as it always did.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO

LOCK_FILENAME = ".train.lock"


class RunDirectoryLock:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._file: IO[str] | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns why not (another run holds it), or None."""
        file = open(self.run_dir / LOCK_FILENAME, "a+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                file.close()  # no locks on this file system: go on without
                return None
            file.seek(0)
            holder = file.read().strip() or "its process unknown"
            file.close()
            return (f"trainer.run_dir: {self.run_dir} is in use by another training run ({holder}); "
                    "wait for it to end, or choose another trainer.run_dir")
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        file.flush()
        self._file = file
        return None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the last descriptor releases the flock
            self._file = None
