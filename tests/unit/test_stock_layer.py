"""The stock DeepSpeed layer's adapter reports the capacity DeepSpeed's gate really used."""

from __future__ import annotations

import pytest
import torch

from moe import MoEConfig
from moe.stock import StockDeepSpeedMoE
from train.distributed import init_world


@pytest.mark.parametrize("top_k", [1, 2])  # above 2, with a capacity, it is refused (moe/config.py)
@pytest.mark.parametrize("tokens", [37, 64])
def test_reported_capacity_is_the_slots_deepspeed_gave_each_expert(top_k, tokens):
    init_world("cpu")  # DeepSpeed's MoE needs its expert-parallel groups, even for one process
    config = MoEConfig(implementation="deepspeed", num_experts=4, top_k=top_k, capacity_factor=1.3,
                       eval_capacity_factor=0.7, min_capacity=2)
    layer = StockDeepSpeedMoE(8, 16, config)
    seen = []  # the experts' input: [ep_size, local experts, capacity, D]
    layer.deepspeed_moe.experts.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[2]))
    x = torch.randn(1, tokens, 8)
    for training in (True, False):
        layer.train(training)
        _, aux = layer(x)
        assert aux.capacity == seen[-1], (training, aux.capacity, seen)
    assert seen[0] != seen[1]  # the train and eval factors both reached the check


def test_dropless_stock_layer_reports_no_capacity():
    init_world("cpu")
    layer = StockDeepSpeedMoE(8, 16, MoEConfig(implementation="deepspeed", num_experts=4, capacity_factor=None))
    _, aux = layer(torch.randn(1, 16, 8))
    assert aux.capacity is None


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_stock_layer_routes_a_single_token(top_k):
    """Generation with a KV cache routes one token at a time; DeepSpeed's top-1 gate refuses fewer
    tokens than min_capacity, which means nothing without drops."""
    init_world("cpu")
    config = MoEConfig(implementation="deepspeed", num_experts=4, top_k=top_k, capacity_factor=None, min_capacity=4)
    layer = StockDeepSpeedMoE(8, 16, config).eval()
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        whole, _ = layer(x)
        one_at_a_time = torch.cat([layer(x[:, i : i + 1])[0] for i in range(5)], dim=1)
    torch.testing.assert_close(one_at_a_time, whole)
