"""One training run at a time in a run directory (train/run_lock.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from train.run_lock import LOCK_FILENAME, RunDirectoryLock


def test_a_second_holder_is_refused_naming_the_first_until_it_lets_go(tmp_path):
    first, second = RunDirectoryLock(tmp_path), RunDirectoryLock(tmp_path)
    assert first.acquire() is None
    refused = second.acquire()
    expected = f"trainer.run_dir: {tmp_path} is in use by another training run (pid {os.getpid()} on "
    assert refused is not None and refused.startswith(expected)
    first.release()
    assert second.acquire() is None
    second.release()


def test_a_killed_holder_leaves_nothing_to_clean_up(tmp_path):
    # A process that took the lock and was killed: its stale text stays in the file, the lock does not.
    code = ("import sys, time, pathlib\nfrom train.run_lock import RunDirectoryLock\n"
            "lock = RunDirectoryLock(pathlib.Path(sys.argv[1]))\nlock.acquire()\nprint('held', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = RunDirectoryLock(tmp_path)
        assert f"(pid {holder.pid} on " in (lock.acquire() or "")
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LOCK_FILENAME).read_text().startswith(f"pid {holder.pid} ")
    assert lock.acquire() is None
    lock.release()
