"""Routing modes chosen at inference time, for a model already trained.

Token choice: `trained` (the run's moe.eval_capacity_factor), `dropless` (no capacity: every token
gets its K experts), `cf=X` (capacity factor X at eval). Expert choice: `batch` (each expert takes
its top-C tokens of the batch, as in training, with the run's eval capacity factor), `batch cf=X`,
and `causal` (per-expert thresholds learned in training: a token's experts depend on that token
alone). Capacity modes and expert choice's batch mode depend on the batch (later tokens and other
sequences compete for slots); dropless token choice and causal expert choice do not.

The modes act through two switches: the layers' shared MoEConfig (`eval_capacity_factor`, read by
every layer in eval mode) and each expert-choice layer's `ec_eval_mode` attribute. The training loop's
evaluation switches expert choice between its batch and causal modes through `routing` as well.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from moe import MoELayer
from train.config import ConfigError

KEEP = "keep"


@dataclass(frozen=True)
class RoutingMode:
    name: str
    eval_capacity_factor: float | None | str = KEEP
    """Value for moe.eval_capacity_factor; KEEP = the run's own."""
    ec_eval_mode: str | None = None
    """Expert choice: batch or causal; None = the run's own."""
    batch_dependent: bool = True


def moe_layers(model: torch.nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def available_modes(model: torch.nn.Module, capacity_factors: list[float]) -> list[RoutingMode]:
    """Every mode that applies to `model`'s router, in table order."""
    moe = model.moe_config
    if moe.every == 0:
        return [RoutingMode("dense", batch_dependent=False)]
    if moe.implementation == "deepspeed":
        # Stock DeepSpeed's gate keeps its capacity factors inside itself: only its own mode.
        return [RoutingMode("trained", batch_dependent=moe.capacity_factor is not None)]
    if moe.router == "token_choice":
        modes = [RoutingMode("trained", batch_dependent=moe.eval_capacity_factor is not None),
                 RoutingMode("dropless", None, batch_dependent=False)]
        return modes + [RoutingMode(f"cf={cf:g}", cf) for cf in _distinct(capacity_factors)]
    modes = [RoutingMode("batch", ec_eval_mode="batch")]
    if thresholds_ready(model):
        modes.append(RoutingMode("causal", ec_eval_mode="causal", batch_dependent=False))
    return modes + [RoutingMode(f"batch cf={cf:g}", cf, ec_eval_mode="batch") for cf in _distinct(capacity_factors)]


def _distinct(capacity_factors: list[float]) -> list[float]:
    """One factor per name: modes are told apart by name (1 and 1.0000001 are both `cf=1`)."""
    by_name: dict[str, float] = {}
    for cf in capacity_factors:
        by_name.setdefault(f"{cf:g}", cf)
    return list(by_name.values())


def thresholds_ready(model: torch.nn.Module) -> bool:
    layers = [layer for layer in moe_layers(model) if layer.config.router == "expert_choice"]
    return all(float(layer.router.threshold_ready) for layer in layers)


def trained_mode_name(model: torch.nn.Module) -> str:
    """The mode the training loop's `val_loss` used."""
    moe = model.moe_config
    if moe.every == 0:
        return "dense"
    if moe.router == "expert_choice" and moe.implementation == "ours":
        return moe.ec_eval_mode if thresholds_ready(model) else "batch"
    return "trained"


def generation_mode(model: torch.nn.Module) -> RoutingMode:
    """Causal routing, so a token's output never depends on tokens after it (or on other prompts):
    token choice dropless, expert choice through its thresholds."""
    moe = model.moe_config
    if moe.every == 0:
        return RoutingMode("dense", batch_dependent=False)
    if moe.implementation == "deepspeed":
        if moe.capacity_factor is not None:
            raise ConfigError(
                "moe.implementation=deepspeed with a capacity factor: the stock DeepSpeed gate drops tokens by "
                "capacity, so its routing is not causal; generation needs moe.implementation=ours or a dropless run"
            )
        return RoutingMode("trained", batch_dependent=False)
    if moe.router == "token_choice":
        return RoutingMode("dropless", None, batch_dependent=False)
    if not thresholds_ready(model):
        raise ConfigError(
            "expert choice generates through its causal thresholds, which this checkpoint has not learned yet "
            "(they are set at the first optimizer step)"
        )
    return RoutingMode("causal", ec_eval_mode="causal", batch_dependent=False)


@contextmanager
def routing(model: torch.nn.Module, mode: RoutingMode) -> Iterator[None]:
    """Run the block with `mode`, then restore the run's own settings."""
    moe = model.moe_config
    layers = moe_layers(model)
    saved_cf, saved_ec = moe.eval_capacity_factor, [layer.ec_eval_mode for layer in layers]
    try:
        if mode.eval_capacity_factor != KEEP:
            moe.eval_capacity_factor = mode.eval_capacity_factor
        if mode.ec_eval_mode is not None:
            for layer in layers:
                layer.ec_eval_mode = mode.ec_eval_mode
        yield
    finally:
        moe.eval_capacity_factor = saved_cf
        for layer, saved in zip(layers, saved_ec):
            layer.ec_eval_mode = saved
