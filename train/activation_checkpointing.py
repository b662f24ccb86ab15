"""Activation checkpointing of whole transformer blocks (`trainer.activation_checkpointing`).

A checkpointed block keeps only its input from the forward pass; its activations (attention, the
MoE layer's routed rows and expert hidden units, the largest part at k >= 2) are recomputed during
the backward pass, one block at a time. The price is one more forward pass of every block (about a
third more compute); what it buys is activation memory for a larger micro-batch or model.

It uses `torch.utils.checkpoint` in its non-reentrant form, which accepts the block's (tensor, MoEAux)
output and keeps the random state, so the router's jitter draws the same numbers when recomputed and
the run follows the same trajectory as without checkpointing. The routers' step statistics (bias
balancing, lagged fractions, expert-choice thresholds) are gathered in the forward pass; the
recomputation runs inside `moe.router_state.recomputing()`, so they are not counted twice.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from moe.router_state import recomputing


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    # (around the first forward, around the recomputation)
    return contextlib.nullcontext(), recomputing()


def checkpointed_block(block: torch.nn.Module, *args: torch.Tensor):
    """`block(*args)`, keeping only the inputs for the backward pass and recomputing the rest there."""
    return checkpoint(block, *args, use_reentrant=False, context_fn=_contexts)
