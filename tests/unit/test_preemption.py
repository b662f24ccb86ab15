"""The preemption watch: signals recorded, not fatal; old handlers back afterwards; the exit status."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from train.config import ConfigError, to_run_config
from train.preemption import PREEMPTED_EXIT_STATUS, Preempted, PreemptionWatch


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_is_recorded_and_the_old_handler_comes_back(signum):
    before = signal.getsignal(signum)
    with PreemptionWatch() as watch:
        assert watch.agreed() is None
        os.kill(os.getpid(), signum)  # delivered to this (main) thread before os.kill returns
        assert watch.received == signal.Signals(signum).name
        assert watch.agreed() == signal.Signals(signum).name  # a world of one agrees with itself
    assert signal.getsignal(signum) is before


def test_the_first_signal_is_the_one_reported():
    with PreemptionWatch() as watch:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
    assert watch.received == "SIGUSR1"


def test_outside_the_main_thread_nothing_is_installed():
    before = signal.getsignal(signal.SIGUSR1)
    seen = []

    def open_watch():
        with PreemptionWatch():
            seen.append(signal.getsignal(signal.SIGUSR1))

    thread = threading.Thread(target=open_watch)
    thread.start()
    thread.join()
    assert seen == [before]


def test_preempted_exits_with_the_status_the_batch_script_requeues_on():
    error = Preempted(12, "SIGUSR1")
    assert isinstance(error, SystemExit) and error.code == PREEMPTED_EXIT_STATUS == 75
    assert str(error) == "preempted by SIGUSR1: checkpoint at step 12"
    script = (os.path.dirname(__file__) + "/../../launch/slurm/train.sbatch")
    assert f"PREEMPTED={PREEMPTED_EXIT_STATUS}" in open(script, encoding="utf-8").read()


def test_auto_resume_needs_a_run_dir(compose_run):
    with pytest.raises(ConfigError, match="trainer.auto_resume=true needs trainer.run_dir"):
        to_run_config(compose_run(["trainer.auto_resume=true"]))


def test_ctrl_c_stops_at_the_step_boundary_and_a_second_one_stops_at_once(capfd, ctrl_c_enabled):
    before = signal.getsignal(signal.SIGINT)
    with PreemptionWatch() as watch:
        os.kill(os.getpid(), signal.SIGINT)  # recorded, not raised
        assert watch.agreed() == "SIGINT"
        assert "Ctrl-C again stops at once" in capfd.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_an_interrupted_run_exits_130_which_the_batch_script_does_not_requeue():
    stop = Preempted(7, "SIGINT")
    assert stop.code == 130 and str(stop) == "interrupted by SIGINT: checkpoint at step 7"
    assert Preempted(7, "SIGTERM").code == PREEMPTED_EXIT_STATUS


def test_an_ignored_ctrl_c_stays_ignored():
    # A shell starts background jobs with SIGINT ignored: Ctrl-C in its terminal is not for them.
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with PreemptionWatch() as watch:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert watch.received is None
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
