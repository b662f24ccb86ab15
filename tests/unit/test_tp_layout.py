"""Tensor-parallel weight layout: shards hold whole heads / hidden units, and merge inverts shard."""

from __future__ import annotations

import pytest
import torch

from train import tp_layout
from train.config import ConfigError, to_run_config


def test_split_kinds_follow_the_model_names():
    assert tp_layout.split_kind("blocks.3.attn.qkv.weight") == "qkv"
    assert tp_layout.split_kind("blocks.3.attn.proj.weight") == "columns"
    assert tp_layout.split_kind("blocks.0.ffn.w1.weight") == "rows"
    assert tp_layout.split_kind("blocks.0.ffn.w3.weight") == "rows"
    assert tp_layout.split_kind("blocks.0.ffn.w2.weight") == "columns"
    # Every FFN's hidden units are split: routed experts and the shared expert too.
    assert tp_layout.split_kind("blocks.1.ffn.deepspeed_moe.experts.deepspeed_experts.7.w3.weight") == "rows"
    assert tp_layout.split_kind("blocks.1.ffn.deepspeed_moe.experts.deepspeed_experts.7.w2.weight") == "columns"
    assert tp_layout.split_kind("blocks.1.ffn.shared_mlp.w1.weight") == "rows"
    # Embeddings, norms and routers are whole on every rank.
    for name in ("embed.weight", "norm.weight", "lm_head.weight", "blocks.1.attn_norm.weight",
                 "blocks.1.ffn.deepspeed_moe.gate.weight"):
        assert tp_layout.split_kind(name) is None


@pytest.mark.parametrize("size", [1, 2, 4])
def test_merge_inverts_shard(size):
    heads, head_dim, width = 4, 8, 32
    for name, shape in (("blocks.0.attn.qkv.weight", (3 * heads * head_dim, width)),
                        ("blocks.0.attn.proj.weight", (width, heads * head_dim)),
                        ("blocks.0.ffn.w1.weight", (64, width)), ("blocks.0.ffn.w2.weight", (width, 64))):
        whole = torch.randn(shape)
        shards = [tp_layout.shard(name, whole, r, size, heads) for r in range(size)]
        assert all(s.numel() == whole.numel() // size for s in shards)
        assert torch.equal(tp_layout.merge(name, shards, heads), whole)


def test_qkv_shard_computes_whole_heads_of_q_k_and_v():
    heads, head_dim, width, size = 4, 8, 32, 2
    whole = torch.randn(3 * heads * head_dim, width)
    x = torch.randn(5, width)
    q, k, v = (x @ whole.T).view(5, 3, heads, head_dim).unbind(1)
    for rank in range(size):
        local = heads // size
        mine = (x @ tp_layout.shard("blocks.0.attn.qkv.weight", whole, rank, size, heads).T).view(5, 3, local, head_dim)
        heads_of_rank = slice(rank * local, (rank + 1) * local)
        for got, expected in zip(mine.unbind(1), (q, k, v)):
            assert torch.equal(got, expected[:, heads_of_rank])


def test_tensor_parallel_must_divide_heads_ffn_and_world(compose_run):
    with pytest.raises(ConfigError, match="model.tensor_parallel=3"):
        to_run_config(compose_run(["model=gpt_tiny", "model.tensor_parallel=3"]))
    run = to_run_config(compose_run(["model=gpt_tiny", "model.tensor_parallel=2", "moe.ep_size=2"]))
    with pytest.raises(ConfigError, match=r"moe.ep_size=2 must divide the 1 rank of each tensor-parallel rank's slice "
                                          r"\(the world size 2 given by the launcher, divided by model.tensor_parallel=2\)"):
        run.check_world_size(2)
    run.check_world_size(4)
    with pytest.raises(ConfigError, match="model.tensor_parallel=2 must divide the world size 3"):
        run.check_world_size(3)
