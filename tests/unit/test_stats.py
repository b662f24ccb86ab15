"""moe/stats.py: the expert-utilisation figures against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from moe.stats import utilisation


def test_figures_of_a_skewed_layer_equal_their_hand_values():
    # 4 experts, 10 tokens x top-2 = 20 assignments routed, 4 dropped by capacity; expert 3 got none.
    figures = utilisation(routed_E=[10, 6, 4, 0], kept_E=[8, 4, 4, 0], experts_per_token=[1, 2, 7, 0, 0],
                          entropy_sum=5.0, num_tokens=10)
    assert figures["load"] == [0.5, 0.25, 0.25, 0.0]
    # Kept counts 8, 4, 4, 0: mean 4, variance (16 + 0 + 0 + 16) / 4 = 8.
    assert figures["cv"] == pytest.approx(math.sqrt(8) / 4)
    assert figures["max_violation"] == pytest.approx(8 / 4 - 1)
    assert figures["drop_fraction"] == pytest.approx(4 / 20)
    assert figures["dead_experts"] == 1.0
    assert figures["router_entropy"] == pytest.approx(0.5)
    assert figures["experts_per_token"] == [0.1, 0.2, 0.7, 0.0, 0.0]
    assert figures["no_expert_fraction"] == 0.1


def test_even_routing_has_no_imbalance_and_an_empty_window_no_division_by_zero():
    even = utilisation([5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 10, 0, 0], entropy_sum=10 * math.log(4), num_tokens=10)
    assert (even["cv"], even["max_violation"], even["drop_fraction"], even["dead_experts"]) == (0.0, 0.0, 0.0, 0.0)
    assert even["router_entropy"] == pytest.approx(math.log(4))  # undecided router: ln E
    empty = utilisation([0, 0], [0, 0], [0, 0, 0], entropy_sum=0.0, num_tokens=0)
    assert empty["load"] == [0.0, 0.0] and empty["cv"] == 0.0 and empty["drop_fraction"] == 0.0
    assert empty["dead_experts"] == 2.0 and empty["no_expert_fraction"] == 0.0
