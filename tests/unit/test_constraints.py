"""constraints.txt (the versions CI last passed with) agrees with pyproject.toml, pins neither torch nor
what torch needs (the Makefile picks torch's build), and holds the versions this environment runs."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from train.constraints import constraint_lines, requirement_closure

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, Requirement]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    requirements = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(r.name): r for r in requirements}


def test_every_pin_satisfies_pyproject_and_every_dependency_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    pins, torch_needs = _pins(), requirement_closure("torch")
    assert {"torch", "sympy", "jinja2", "markupsafe"} <= torch_needs  # (MarkupSafe through Jinja2)
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        if name in torch_needs:
            assert name not in pins, f"{name}: torch and what it needs follow the torch build the Makefile picks"
            continue
        assert name in pins, f"{name} is a dependency but has no pin in constraints.txt"
        (spec,) = pins[name].specifier
        assert spec.operator == "==" and requirement.specifier.contains(spec.version, prereleases=True), (
            f"constraints.txt pins {name} {spec.version}, pyproject.toml asks for {requirement.specifier}")


def test_the_pins_are_the_installed_versions_where_they_apply():
    # Where the markers match (CI's Python), the environment that ran the tests is the pinned one.
    for name, requirement in _pins().items():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # pinned for an extra this environment lacks
        (spec,) = requirement.specifier
        assert installed.split("+")[0] == spec.version, f"{name}: installed {installed}, constraints.txt {spec.version}"


def test_freeze_lines_become_marked_pins_without_torch_or_the_project():
    freeze = ["# Editable Git install", "-e /work/main", "torch==2.13.0+cpu", "Jinja2==3.1.6", "numpy==2.4.6",
              "pkg @ file:///wheels/pkg.whl"]
    assert constraint_lines(freeze, "3.11", "linux", {"torch"}) == [
        'Jinja2==3.1.6 ; python_version == "3.11" and sys_platform == "linux"',
        'numpy==2.4.6 ; python_version == "3.11" and sys_platform == "linux"',
    ]
