"""The pieces of non-finite loss handling that need no engine: the poisoned loss, the streak
counter and its message, and dropping a skipped step's router statistics."""

from __future__ import annotations

import pytest
import torch

from moe import MoEConfig
from moe.expert_choice import ExpertChoiceRouter
from moe.router import TokenChoiceRouter
from train.nonfinite import EXIT_STATUS, NonFiniteLossStop, NonFiniteStreak, discard_routing_statistics, poison_if_nonfinite


def test_finite_loss_and_its_gradient_are_unchanged_bitwise():
    w = torch.tensor([0.3, -1.7], requires_grad=True)
    loss = (w**2).sum() / 3
    (plain,) = torch.autograd.grad(loss, w, retain_graph=True)
    (guarded,) = torch.autograd.grad(poison_if_nonfinite(loss), w)
    assert torch.equal(poison_if_nonfinite(loss.detach()), loss.detach())
    assert torch.equal(guarded, plain)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_loss_gives_nan_gradients_even_where_the_true_gradient_is_finite(bad):
    w = torch.tensor([0.3, -1.7], requires_grad=True)
    loss = (w * 2).sum() + bad  # d loss / d w = 2 everywhere: finite despite the loss
    (grad,) = torch.autograd.grad(poison_if_nonfinite(loss), w)
    assert torch.isnan(grad).all()


def test_streak_stops_at_the_limit_and_resets_on_a_good_step():
    streak = NonFiniteStreak(limit=2)
    streak.record(3, True, lambda: "step_00000002")
    streak.record(4, False, lambda: "step_00000004")
    streak.record(5, True, lambda: "step_00000004")
    with pytest.raises(NonFiniteLossStop) as stop:
        streak.record(6, True, lambda: "step_00000004")
    assert stop.value.code == EXIT_STATUS
    assert str(stop.value) == ("error: 2 non-finite losses in a row (steps 5-6; trainer.max_nonfinite_steps=2); "
                               "stopped, the last good checkpoint is step_00000004")
    with pytest.raises(NonFiniteLossStop, match=r"\(step 1; .*no checkpoint was written"):
        NonFiniteStreak(limit=1).record(1, True, lambda: None)


def test_discarding_a_skipped_steps_statistics_leaves_router_state_alone():
    token = TokenChoiceRouter(8, MoEConfig(num_experts=4, top_k=2, bias_update_rate=0.01))
    expert = ExpertChoiceRouter(8, MoEConfig(num_experts=4, router="expert_choice", capacity_factor=2.0))
    model = torch.nn.ModuleList([token, expert])
    token.record_routed(torch.tensor([9.0, 0.0, 0.0, 1.0]))
    expert.pending_threshold.copy_(torch.tensor([float("nan")] * 4 + [1.0]))  # a NaN forward's scores
    before = {k: v.clone() for k, v in model.state_dict().items()}
    discard_routing_statistics(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not token.pending_statistics().any() and not expert.pending_statistics().any()
