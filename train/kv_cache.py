"""Key/value cache for generation: each new token attends to the stored keys and values of the
tokens before it instead of recomputing them, so producing n tokens costs n forward passes of
one token each (plus attention over what is cached), not n passes over the whole prefix.

Legend: B batch, H heads, L cached positions, S new positions, d head dim.

The buffers are allocated once for the model's whole context (`max_len` positions) and filled in
place: appending never copies what is already there, so the cost of a step does not grow with
the number of steps taken before it.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


class KVCache:
    """Keys and values of every attention layer for positions 0 .. length-1 of a batch."""

    def __init__(self, num_layers: int, batch: int, heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, batch, heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        """Positions already stored (the next tokens start at this position)."""

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int = 1) -> KVCache:
        """A cache shaped after `model`'s attention layers (a train.model.GPT) and its context length."""
        attention = model.blocks[0].attn
        weight = attention.qkv.weight
        return cls(len(model.blocks), batch, attention.num_heads, attention.head_dim, model.cfg.seq_len,
                   weight.dtype, weight.device)

    def layer(self, index: int) -> LayerKVCache:
        return LayerKVCache(self, index)

    def advance(self, positions: int) -> None:
        """Called by the model once every layer has stored this call's positions."""
        self.length += positions

    def reset(self) -> None:
        """Forget everything (the buffers are overwritten by the next tokens)."""
        self.length = 0


class LayerKVCache:
    """One attention layer's view of a KVCache."""

    def __init__(self, cache: KVCache, index: int) -> None:
        self.cache = cache
        self.index = index

    def attend(self, q_BHSd: torch.Tensor, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor) -> torch.Tensor:
        """Store this call's keys and values after the cached ones, then causal attention of the S
        new queries over all L + S positions."""
        cache = self.cache
        start, new = cache.length, q_BHSd.shape[2]
        end = start + new
        if end > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {end} were asked for")
        cache.keys[self.index, :, :, start:end] = k_BHSd
        cache.values[self.index, :, :, start:end] = v_BHSd
        keys, values = cache.keys[self.index, :, :, :end], cache.values[self.index, :, :, :end]
        if new == 1:
            # The newest position may see every cached one: no mask.
            return F.scaled_dot_product_attention(q_BHSd, keys, values)
        if start == 0:
            return F.scaled_dot_product_attention(q_BHSd, keys, values, is_causal=True)
        # SDPA's is_causal aligns the mask to the top-left corner, which is wrong once queries start
        # at `start`: new query i (position start + i) sees keys 0 .. start + i.
        visible_SL = torch.arange(end, device=q_BHSd.device) <= torch.arange(start, end, device=q_BHSd.device)[:, None]
        return F.scaled_dot_product_attention(q_BHSd, keys, values, attn_mask=visible_SL)
