"""Auxiliary losses against closed forms on hand-made inputs."""

from __future__ import annotations

import math

import torch

from moe.losses import load_balancing_loss, router_z_loss


def test_load_balancing_is_one_when_uniform():
    probs = torch.full((8, 4), 0.25)
    idx = torch.arange(8).remainder(4).unsqueeze(1)  # each expert chosen twice
    assert math.isclose(float(load_balancing_loss(probs, idx)), 1.0, rel_tol=1e-6)


def test_load_balancing_is_num_experts_when_collapsed():
    probs = torch.zeros(6, 4)
    probs[:, 2] = 1.0
    idx = torch.full((6, 1), 2)
    assert math.isclose(float(load_balancing_loss(probs, idx)), 4.0, rel_tol=1e-6)


def test_load_balancing_hand_computed_top2():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    idx = torch.tensor([[0, 1], [1, 2]])
    # f = [1, 2, 1] / 4, P = [0.3, 0.45, 0.25]; L = 3 * (0.075 + 0.225 + 0.0625)
    assert math.isclose(float(load_balancing_loss(probs, idx)), 3 * (0.075 + 0.225 + 0.0625), rel_tol=1e-6)


def test_load_balancing_gradient_flows_through_probabilities_only():
    # L = E * sum_e f_e * mean_t P_te with f a count (no gradient): dL/dP_te = E * f_e / T exactly.
    torch.manual_seed(0)
    probs = torch.randn(5, 3).softmax(-1).requires_grad_(True)
    idx = probs.detach().topk(2).indices
    load_balancing_loss(probs, idx).backward()
    fraction = torch.bincount(idx.flatten(), minlength=3).float() / idx.numel()
    torch.testing.assert_close(probs.grad, (3 * fraction / 5).expand(5, 3))


def test_z_loss_closed_form():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert math.isclose(float(router_z_loss(logits)), expected, rel_tol=1e-6)
