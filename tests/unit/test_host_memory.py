"""train/host_memory.py: glibc's malloc told to keep freed memory (a CPU-training speed setting)."""

from __future__ import annotations

import ctypes
import platform

import pytest

from train.host_memory import keep_freed_memory


def test_glibc_accepts_the_settings_and_they_can_be_set_again():
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc: keep_freed_memory is a no-op there")
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # every trainer built in one process calls it


def test_no_glibc_changes_nothing(monkeypatch):
    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert keep_freed_memory() is False
