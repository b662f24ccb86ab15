"""Mixture-of-Experts layers on DeepSpeed-MoE: routers, dispatch, experts, losses, statistics.

Plain PyTorch and DeepSpeed; nothing here knows about Hydra or the training loop.
"""

from moe.config import MoEConfig
from moe.experts import SwiGLUExpert
from moe.layer import MoEAux, MoELayer
from moe.router import RoutingDecision, TokenChoiceRouter

__all__ = ["MoEAux", "MoEConfig", "MoELayer", "RoutingDecision", "SwiGLUExpert", "TokenChoiceRouter"]
