"""What a resumed run changed against the config.yaml its run directory was saved with.

A resume may change settings on purpose (more steps, another layout, a new learning rate), and it
may change them by mistake (a model width, a batch size). The loop prints every change before
training on and names the model's changes when the checkpoint no longer fits; it never refuses a
change that loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

IGNORED = ("trainer.resume", "trainer.auto_resume", "trainer.run_dir")
"""Settings that say how this session started, not what the run is."""

SHAPE_SECTIONS = ("model.", "moe.", "data.vocab_size")
"""Where a change can alter the parameters' shapes (and so stop the checkpoint from loading)."""


def saved_settings(run_dir: Path) -> dict[str, Any] | None:
    """The settings of the checkpoint `latest` names (its own config.yaml; the run directory's for
    checkpoints written before tags held one) as a plain dict; None when missing or unreadable (a
    resume then reports no changes rather than failing on a file it does not need)."""
    from train.checkpoint import latest_tag, tag_or_run_file

    latest = latest_tag(run_dir / "checkpoints")
    path = tag_or_run_file(run_dir / "checkpoints" / latest, "config.yaml") if latest else run_dir / "config.yaml"
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path))
    except (OSError, yaml.YAMLError, OmegaConfBaseException):
        return None
    return loaded if isinstance(loaded, dict) else None


def changed_settings(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) for every setting that differs, in key order.
    A key only one side has (a field added since) is left out: it has no saved value to differ from."""
    if saved is None:
        return []
    before, after = _flatten(saved), _flatten(current)
    return [(key, before[key], after[key]) for key in sorted(before.keys() & after.keys())
            if before[key] != after[key] and not key.startswith(IGNORED)]


def describe(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changes)


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
