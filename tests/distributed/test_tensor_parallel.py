"""Tensor parallelism with megatron-core on gloo ranks: the same run at TP=1 and TP=2 (and TP=2 x
EP=2 on 4 ranks) gives the same loss and gradient norm at every step, with clipping active."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from distributed.processes import ROOT, launch_ranks, run
from train import tp_layout

pytestmark = pytest.mark.distributed

# moe.every=2: block 0 has a dense FFN (split by TP), block 1 an MoE layer (each expert's hidden units split by TP).
# grad_clip 0.05 is far below the gradient norm (about 1), so every step is clipped and a wrong
# norm would change the update, not just the logged figure.
COMMON = [
    "model=gpt_tiny", "moe.every=2", "trainer.max_steps=5", "logging.log_every=1", "logging.progress_bar=false",
    "trainer.eval_every=5", "trainer.eval_batches=2", "trainer.checkpoint_every=5", "deepspeed.grad_clip=0.05",
    "deepspeed.precision=fp32", "logging.plots=off", f"data.cache_dir={ROOT / '.cache' / 'data'}",
]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(ranks: int, run_dir: Path, *overrides: str) -> list[dict]:
    args = [*COMMON, *overrides, f"trainer.run_dir={run_dir}"]
    if ranks == 1:
        run([sys.executable, "-m", "train", *args], ROOT)
    else:  # the launcher itself is covered by tests/distributed/test_launch_scripts.py
        launch_ranks(ranks, [sys.executable, "-m", "train", *args], cwd=ROOT)
    return _records(run_dir)


def _differences(reference: list[dict], other: list[dict]) -> tuple[float, float]:
    """Max |loss difference| (train and validation) and max |grad-norm difference| over all steps."""
    assert [(r["event"], r["step"]) for r in reference] == [(r["event"], r["step"]) for r in other]
    loss = max(abs(a.get("loss", a.get("val_loss")) - b.get("loss", b.get("val_loss"))) for a, b in zip(reference, other))
    norm = max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(reference, other) if a["event"] == "train")
    return loss, norm


@pytest.fixture(scope="module")
def tp2_eager(tmp_path_factory) -> Path:
    """The TP=2 run that two tests compare with (one launch for both)."""
    run_dir = tmp_path_factory.mktemp("tp2") / "tp2"
    _run(2, run_dir, "trainer.micro_batch_size=4", "model.tensor_parallel=2")
    return run_dir


def test_tp2_equals_tp1_and_checkpoint_shards_merge_to_the_whole(tmp_path, tp2_eager):
    whole = _run(1, tmp_path / "tp1", "trainer.micro_batch_size=4")
    split = _records(tp2_eager)
    loss_diff, norm_diff = _differences(whole, split)
    print(f"TP=2 vs TP=1: max |loss diff| {loss_diff:.2e}, max |grad-norm diff| {norm_diff:.2e}")
    assert loss_diff < 1e-5 and norm_diff < 1e-5
    assert all(r["grad_norm"] > 0.05 for r in whole if r["event"] == "train"), "clipping must be active"

    # The two ranks' checkpoint shards, joined, are the TP=1 run's weights.
    tag = "checkpoints/step_00000005"
    reference = torch.load(tmp_path / "tp1" / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    shards = [torch.load(tp2_eager / tag / f"mp_rank_{r:02d}_model_states.pt", weights_only=False)["module"]
              for r in (0, 1)]
    split_names = [name for name in reference if tp_layout.split_kind(name)]
    assert len(split_names) == 7  # qkv and proj of two blocks (4), w1, w3 and w2 of the dense FFN (3)
    for name, value in reference.items():
        if "expert" in name:
            continue
        assert shards[0][name].shape != value.shape or tp_layout.split_kind(name) is None
        merged = tp_layout.merge(name, [s[name] for s in shards], num_heads=4)
        torch.testing.assert_close(merged, value, rtol=1e-5, atol=1e-6)
    # Experts are split too (expert tensor parallelism): each rank's file holds half the hidden units.
    for expert in range(8):
        file = f"layer_0_expert_{expert}_mp_rank_{{:02d}}_model_states.pt"
        whole = torch.load(tmp_path / "tp1" / tag / file.format(0), weights_only=False)
        parts = [torch.load(tp2_eager / tag / file.format(r), weights_only=False) for r in (0, 1)]
        for name, value in whole.items():
            assert tp_layout.split_kind(name) is not None and parts[0][name].numel() * 2 == value.numel()
            torch.testing.assert_close(tp_layout.merge(name, [p[name] for p in parts], num_heads=4), value,
                                       rtol=1e-5, atol=1e-6)


def test_tp2_compiled_follows_the_eager_tp2_run(tmp_path, tp2_eager):
    """trainer.compile=true with the blocks split over tensor-parallel pairs (megatron-core's column and
    row layers, their all-reduces inside the compiled blocks): the eager TP=2 run's losses and clipped
    gradient norms, within the rounding of inductor's fused kernels."""
    eager = _records(tp2_eager)
    compiled = _run(2, tmp_path / "compiled", "trainer.micro_batch_size=4", "model.tensor_parallel=2", "trainer.compile=true")
    loss_diff, norm_diff = _differences(eager, compiled)
    print(f"TP=2 compiled vs eager: max |loss diff| {loss_diff:.2e}, max |grad-norm diff| {norm_diff:.2e}")
    assert loss_diff < 1e-5 and norm_diff < 1e-5


def test_tp2_times_ep2_on_four_ranks_equals_one_process(tmp_path):
    """TP 2 x EP 2 x DP 2... of 4 ranks: data parallel 2, so each replica gets half the batch.
    Dropless routing and the split-invariant balancing loss make the run independent of how the
    batch is split, so one process with the whole batch is the reference."""
    routing = ["moe=top2_dropless", "moe.aux_loss_scope=global"]
    whole = _run(1, tmp_path / "one", *routing, "trainer.micro_batch_size=8", "trainer.eval_batches=1")
    split = _run(4, tmp_path / "four", *routing, "trainer.micro_batch_size=4", "trainer.eval_batches=2",
                 "model.tensor_parallel=2", "moe.ep_size=2")
    train_whole = [r for r in whole if r["event"] == "train"]
    train_split = [r for r in split if r["event"] == "train"]
    loss_diff, norm_diff = _differences(train_whole, train_split)
    print(f"TP=2 x EP=2 (4 ranks) vs 1 process: max |loss diff| {loss_diff:.2e}, max |grad-norm diff| {norm_diff:.2e}")
    assert loss_diff < 1e-5 and norm_diff < 1e-5


def test_tp2_times_ep2_capacity_mode_equals_ep2_alone(tmp_path):
    """Capacity mode (the fixed-shape all-to-all path) with the experts' hidden units split over
    tensor-parallel pairs equals the same expert-parallel run without tensor parallelism."""
    common = ["trainer.micro_batch_size=4", "moe.ep_size=2"]
    reference = _run(2, tmp_path / "ep2", *common)
    split = _run(4, tmp_path / "tp2ep2", *common, "model.tensor_parallel=2")
    loss_diff, norm_diff = _differences(reference, split)
    print(f"TP=2 x EP=2 vs EP=2, capacity mode: max |loss diff| {loss_diff:.2e}, max |grad-norm diff| {norm_diff:.2e}")
    assert loss_diff < 1e-5 and norm_diff < 1e-5
    # Activation checkpointing repeats the tensor-parallel all-reduces and the all-to-alls in the
    # backward pass: the same run to the bit.
    checkpointed = _run(4, tmp_path / "tp2ep2_checkpointed", *common, "model.tensor_parallel=2",
                        "trainer.activation_checkpointing=true")
    assert [(r.get("loss"), r.get("val_loss"), r.get("grad_norm")) for r in checkpointed] == \
        [(r.get("loss"), r.get("val_loss"), r.get("grad_norm")) for r in split]
