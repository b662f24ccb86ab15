"""The expert network (a SwiGLU FFN) and its independent, layout-free initialisation.

Legend: T tokens, D model dim, F expert hidden.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SwiGLUExpert(nn.Module):
    """y = W2 (silu(W1 x) * W3 x), the FFN of LLaMA/Mixtral; also the model's dense FFN."""

    def __init__(self, hidden_size: int, ffn_hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, ffn_hidden, bias=False)
        self.w3 = nn.Linear(hidden_size, ffn_hidden, bias=False)
        self.w2 = nn.Linear(ffn_hidden, hidden_size, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x_TD)) * self.w3(x_TD))

    def init_weights(self, std: float, out_std: float, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            for linear, s in ((self.w1, std), (self.w3, std), (self.w2, out_std)):
                # Draw on the CPU from the explicit generator, then copy: the same values on any device.
                values = torch.empty(linear.weight.shape, dtype=torch.float32).normal_(0.0, s, generator=generator)
                linear.weight.copy_(values)


def expert_generator(seed: int, layer_index: int, global_expert: int) -> torch.Generator:
    """A generator that depends only on (seed, layer, global expert id).

    DeepSpeed's `Experts` deep-copies one template module, so all experts would start equal;
    and ranks seeded alike would give expert 0 of rank 0 and expert 0 of rank 1 the same
    values. Seeding each expert from its global id makes every expert different and the
    initial model identical at any expert-parallel size.
    """
    return torch.Generator().manual_seed(seed * 1_000_003 + layer_index * 10_007 + global_expert)


def default_out_std(std: float, num_layers: int) -> float:
    """GPT-2's scaling of residual-output projections by 1/sqrt(2 * layers)."""
    return std / math.sqrt(2 * num_layers)
