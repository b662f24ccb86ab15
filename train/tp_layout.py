"""Which weights tensor parallelism splits, and how: cut a whole weight into a rank's shard, or
join the shards of every rank back into the whole (for consolidation and export).

Parameter names are those of `train.model.GPT` at any tensor-parallel size:
- `blocks.<i>.attn.qkv.weight` [3 * heads * head_dim, D]: split by heads, inside each of q, k and v,
  so every rank computes whole heads;
- `blocks.<i>.attn.proj.weight` [D, heads * head_dim]: split by input columns (the same heads);
- `w1.weight`, `w3.weight` [F, D] of every FFN (dense, shared expert, each routed expert): split by
  rows (hidden units), and `w2.weight` [D, F] by columns;
- everything else (embeddings, norms, output projection, routers) is whole on every rank.
Plain tensor code, no process group: the dry run and the consolidation use it too.
"""

from __future__ import annotations

import re

import torch

# The FFNs' hidden units: dense FFN, shared expert, routed experts (split inside the MoE layer,
# moe/expert_sharding.py, with the same contiguous chunks).
_FFN = r"^blocks\.\d+\.ffn\.(shared_mlp\.|deepspeed_moe\.experts\.deepspeed_experts\.\d+\.)?"
_QKV = re.compile(r"^blocks\.\d+\.attn\.qkv\.weight$")
_ROW_SPLIT = re.compile(r"^blocks\.\d+\.attn\.proj\.weight$|" + _FFN + r"w2\.weight$")  # input columns split
_COLUMN_SPLIT = re.compile(_FFN + r"w[13]\.weight$")  # output rows split


def split_kind(name: str) -> str | None:
    """'qkv', 'rows', 'columns', or None for a weight every rank holds whole."""
    if _QKV.match(name):
        return "qkv"
    if _COLUMN_SPLIT.match(name):
        return "rows"
    if _ROW_SPLIT.match(name):
        return "columns"
    return None


def shard(name: str, whole: torch.Tensor, rank: int, size: int, num_heads: int) -> torch.Tensor:
    """This rank's part of the whole weight `name` (the whole tensor if it is not split)."""
    kind = split_kind(name)
    if kind is None or size == 1:
        return whole
    if kind == "qkv":
        local = num_heads // size
        by_head = whole.view(3, num_heads, -1, whole.shape[-1])
        return by_head[:, rank * local:(rank + 1) * local].reshape(-1, whole.shape[-1])
    dim = 0 if kind == "rows" else 1
    return whole.chunk(size, dim=dim)[rank]


def merge(name: str, shards: list[torch.Tensor], num_heads: int) -> torch.Tensor:
    """The whole weight from every rank's shard, in tensor-parallel rank order."""
    kind = split_kind(name)
    if kind is None or len(shards) == 1:
        return shards[0]
    if kind == "qkv":
        local = num_heads // len(shards)
        by_head = [s.view(3, local, -1, s.shape[-1]) for s in shards]
        return torch.cat(by_head, dim=1).reshape(-1, shards[0].shape[-1])
    return torch.cat(shards, dim=0 if kind == "rows" else 1)
