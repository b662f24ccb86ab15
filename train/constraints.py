"""`pip freeze` on stdin -> constraints.txt on stdout (`make constraints`): every pin marked with the
Python minor version and platform it was resolved on, where pip applies it; elsewhere pyproject.toml's
ranges resolve as usual. torch is left out: the Makefile picks its build (CPU wheel or CUDA)."""

from __future__ import annotations

import platform
import sys

HEADER = """\
# The versions `make test` last passed with, for the Python and platform in each marker; pip ignores a
# line whose marker does not match (other Pythons resolve pyproject.toml's ranges). Written by
# `make constraints` from .venv after a deliberate upgrade (then run make test); not by hand.
"""
UNPINNED = {"torch"}
"""The Makefile installs torch first, the CPU wheel or a CUDA build by machine."""


def constraint_lines(freeze: list[str], python: str, system: str) -> list[str]:
    marker = f'python_version == "{python}" and sys_platform == "{system}"'
    lines = []
    for line in freeze:
        line = line.strip()
        if not line or line.startswith(("#", "-e ")) or "==" not in line:
            continue  # comments, the editable project itself, direct references
        name, version = line.split("==", 1)
        if name.lower() in UNPINNED:
            continue
        lines.append(f"{name}=={version.split('+')[0]} ; {marker}")
    return sorted(lines, key=str.lower)


def main() -> None:
    python = ".".join(platform.python_version_tuple()[:2])
    sys.stdout.write(HEADER + "\n".join(constraint_lines(sys.stdin.read().splitlines(), python, sys.platform)) + "\n")


if __name__ == "__main__":
    main()
