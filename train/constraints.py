"""`pip freeze` on stdin -> constraints.txt on stdout (`make constraints`): every pin marked with the
Python minor version and platform it was resolved on, where pip applies it; elsewhere pyproject.toml's
ranges resolve as usual. torch and what it needs are left out: the Makefile picks torch's build (the
CPU wheel, or a CUDA build of another version whose own requirements may differ)."""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, requires

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HEADER = """\
# The versions `make test` last passed with, for the Python and platform in each marker; pip ignores a
# line whose marker does not match (other Pythons resolve pyproject.toml's ranges). torch and its own
# requirements are not pinned (the Makefile picks torch's build). Written by `make constraints`, which
# resolves pyproject.toml afresh; then run make test. Not edited by hand.
"""


def requirement_closure(root: str) -> set[str]:
    """`root` and every installed distribution it needs, transitively (extras left out), by
    canonical name."""
    seen, pending = set(), [root]
    while pending:
        name = canonicalize_name(pending.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            needed = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in needed:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return seen


def constraint_lines(freeze: list[str], python: str, system: str, unpinned: set[str]) -> list[str]:
    marker = f'python_version == "{python}" and sys_platform == "{system}"'
    lines = []
    for line in freeze:
        line = line.strip()
        if not line or line.startswith(("#", "-e ")) or "==" not in line:
            continue  # comments, the editable project itself, direct references
        name, version = line.split("==", 1)
        if canonicalize_name(name) in unpinned:
            continue
        lines.append(f"{name}=={version.split('+')[0]} ; {marker}")
    return sorted(lines, key=str.lower)


def main() -> None:
    python = ".".join(platform.python_version_tuple()[:2])
    lines = constraint_lines(sys.stdin.read().splitlines(), python, sys.platform, requirement_closure("torch"))
    sys.stdout.write(HEADER + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
