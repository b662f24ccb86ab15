"""Parity across parallel layouts: the same seed and data give the same training, step by step.

Whole training runs (`python -m train`, gloo processes on CPU, fp32) with the global batch held at 8
sequences: expert parallel 1, 2 and 4 (data parallel 1, 2 and 4), and ep 2 on 4 ranks (expert
gradients then also averaged over expert-data-parallel pairs); ZeRO-1 against ZeRO-2; 1 x 8
against 8 x 1 micro-batches x accumulation. Each pair must agree on the loss and the gradient
norm at every step and on every weight at the end, within fp32 rounding (summation orders differ
between layouts, nothing else may).

What is layout-invariant by construction, and so what these runs use (capacity token choice is
compared only between layouts that keep each rank's micro-batch):
- token choice dropless top-2 (`moe=top2_dropless`) with the split-invariant balancing loss
  (`moe.aux_loss_scope=global`): the default per-micro-batch loss multiplies two batch means, so
  it changes with how the batch is split. The router z-loss is a mean over tokens: invariant.
- expert choice over each sequence (`moe.ec_group=sequence`): with `ec_group: batch` each expert
  picks from the rank's micro-batch, which depends on the split by definition.
- gradient clipping at 0.9, which clips some steps of these runs and not others, so the clipped
  update is part of what must agree: the norm ZeRO computes under expert parallelism (expert
  partitions summed over every rank once), which is the norm it clips with and the one logged,
  equals the single-process norm, and the weights after clipped and unclipped steps agree. ZeRO
  stage 0, whose norm is wrong under expert parallelism, is refused by the config.

The figures are printed (`pytest -s`): the largest |loss| and |grad norm| difference per comparison.
"""

from __future__ import annotations

import pytest
import torch

from distributed.layout_runs import (
    EXPERT_CHOICE,
    GRAD_CLIP,
    RUNS,
    STEPS,
    TOKEN_CHOICE,
    WEIGHT_TOLERANCE,
    layout,
    max_differences,
    saved_weights,
    token_choice_ep2,
    train_records,
)

pytestmark = pytest.mark.distributed
LOSS_TOLERANCE = 1e-5
"""Absolute, on losses near 8.3: fp32 rounding of differently ordered sums is about 1e-6 here."""
NORM_TOLERANCE = 1e-5


def _compare(name: str, reference, other) -> None:
    loss_diff, norm_diff = max_differences(train_records(reference), train_records(other))
    tag = f"step_{STEPS:08d}"
    weights_a, weights_b = saved_weights(reference, tag), saved_weights(other, tag)
    assert sorted(weights_a) == sorted(weights_b)
    weight_diff = max(float((weights_a[k].float() - weights_b[k].float()).abs().max()) for k in weights_a)
    print(f"\nparity {name}: max |loss diff| {loss_diff:.3g}, max |grad-norm diff| {norm_diff:.3g}, "
          f"max |weight diff| after {STEPS} steps {weight_diff:.3g}")
    assert loss_diff <= LOSS_TOLERANCE, f"{name}: loss differs by {loss_diff}"
    assert norm_diff <= NORM_TOLERANCE, f"{name}: gradient norm differs by {norm_diff}"
    assert weight_diff <= WEIGHT_TOLERANCE, f"{name}: weights differ by {weight_diff}"


def _clipping_acted(run_dir) -> bool:
    """Some steps clipped and some not (see GRAD_CLIP)."""
    clipped = [record["grad_norm"] > GRAD_CLIP for record in train_records(run_dir)]
    return any(clipped) and not all(clipped)


def test_token_choice_dropless_same_at_ep_1_2_4():
    ep1 = RUNS.get("token_choice_ep1", 1, [*TOKEN_CHOICE, *layout(1, 1)])
    assert _clipping_acted(ep1)
    records = train_records(ep1)
    assert len(records) == STEPS and records[-1]["loss"] < records[0]["loss"], "the runs must actually train"
    _compare("token choice ep1 (1 rank) vs ep2 (2 ranks)", ep1, token_choice_ep2())
    _compare("token choice ep1 (1 rank) vs ep4 (4 ranks)", ep1, RUNS.get("token_choice_ep4", 4, [*TOKEN_CHOICE, *layout(4, 4)]))
    _compare("token choice ep1 (1 rank) vs ep2 x expert-data-parallel 2 (4 ranks)", ep1,
             RUNS.get("token_choice_ep2_dp4", 4, [*TOKEN_CHOICE, *layout(4, 2)]))


def test_token_choice_with_capacity_same_at_ep_1_and_2_on_two_ranks():
    """Capacity mode (top-2, capacity factor 1.25, the fixed-shape all-to-all at ep 2): which
    assignments an expert drops depends on the tokens of the rank's micro-batch, so the layouts
    compared keep that micro-batch, two data-parallel ranks each, and differ only in where the
    experts live. Tokens must actually be dropped, or the capacity path would go untested."""
    capacity = ["moe=top2"]
    ep1 = RUNS.get("capacity_ep1_dp2", 2, [*capacity, *layout(2, 1)])
    dropped = [layer["drop_fraction"] for record in train_records(ep1) for layer in record["experts"].values()]
    assert max(dropped) > 0, "no assignment was dropped: the capacity limit never acted"
    _compare("capacity token choice ep1 vs ep2 (2 ranks each)", ep1, RUNS.get("capacity_ep2", 2, [*capacity, *layout(2, 2)]))


def test_expert_choice_same_at_ep_1_2_4():
    ep1 = RUNS.get("expert_choice_ep1", 1, [*EXPERT_CHOICE, *layout(1, 1)])
    assert _clipping_acted(ep1)
    _compare("expert choice ep1 (1 rank) vs ep2 (2 ranks)", ep1,
             RUNS.get("expert_choice_ep2", 2, [*EXPERT_CHOICE, *layout(2, 2)]))
    _compare("expert choice ep1 (1 rank) vs ep4 (4 ranks)", ep1,
             RUNS.get("expert_choice_ep4", 4, [*EXPERT_CHOICE, *layout(4, 4)]))


def test_zero1_equals_zero2_under_expert_parallelism():
    zero1 = RUNS.get("token_choice_ep2_zero1", 2, [*TOKEN_CHOICE, *layout(2, 2), "deepspeed=zero1"])
    assert _clipping_acted(zero1)
    _compare("ZeRO-1 vs ZeRO-2 (ep2, 2 ranks)", token_choice_ep2(), zero1)


def test_grad_accum_1x8_equals_8x1():
    one_by_eight = RUNS.get("token_choice_accum_1x8", 1, [*TOKEN_CHOICE, *layout(1, 1, micro_batch_size=1, grad_accum=8)])
    _compare("micro-batch 8 x accumulation 1 vs 1 x 8 (1 rank)",
             RUNS.get("token_choice_ep1", 1, [*TOKEN_CHOICE, *layout(1, 1)]), one_by_eight)


def test_activation_checkpointing_under_expert_parallelism_changes_nothing():
    """Recomputing each block in the backward pass repeats its all-to-all exchanges there, on every
    rank in the same order: the run is the same, to the bit, as without checkpointing."""
    checkpointed = RUNS.get("token_choice_ep2_checkpointed", 2,
                            [*TOKEN_CHOICE, *layout(2, 2), "trainer.activation_checkpointing=true"])
    _compare("activation checkpointing vs none (ep2, 2 ranks)", token_choice_ep2(), checkpointed)
    plain = [(r["loss"], r["grad_norm"]) for r in train_records(token_choice_ep2())]
    assert [(r["loss"], r["grad_norm"]) for r in train_records(checkpointed)] == plain


def test_compiled_model_under_expert_parallelism_follows_the_eager_run():
    """trainer.compile=true at ep2, MoE layers included: dynamo breaks the graph at the all-to-all-v
    and its host-sized splits, and the compiled parts between give the eager run's training."""
    compiled = RUNS.get("token_choice_ep2_compiled", 2, [*TOKEN_CHOICE, *layout(2, 2), "trainer.compile=true"])
    _compare("compiled vs eager (ep2, 2 ranks)", token_choice_ep2(), compiled)


def test_layouts_really_differ():
    """The comparisons above are not vacuous: the runs did use different expert-parallel sizes
    (one checkpoint file per expert either way, but each rank wrote only its own experts' AdamW
    partitions) and trained the same weights from the same start."""
    ep2 = token_choice_ep2()
    assert len(list((ep2 / "checkpoints" / f"step_{STEPS:08d}").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    first, last = saved_weights(ep2, "step_00000003"), saved_weights(ep2, f"step_{STEPS:08d}")
    assert any(not torch.equal(first[k], last[k]) for k in first)
