"""A checkpoint saved at one expert-parallel and data-parallel size resumes at another with its
optimizer state: saved at ep 2 on 2 ranks (step 3 of the shared reference run), resumed at ep 1
on 1 rank and at ep 4 on 4 ranks. The resumed engine holds exactly the saved weights, fp32 master
weights, AdamW moments, step count and schedule (checked on every rank by the worker), and the
following steps match the reference run continuing at ep 2, within fp32 rounding."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from distributed.layout_runs import (
    CHECKPOINT_EVERY,
    STEPS,
    TOKEN_CHOICE,
    WEIGHT_TOLERANCE,
    launch,
    layout,
    max_differences,
    saved_weights,
    token_choice_ep2,
    train_records,
)

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).resolve().parent / "layout_resume_worker.py"
TOLERANCE = 1e-5
"""On losses and gradient norms; the weights use WEIGHT_TOLERANCE (distributed/layout_runs.py)."""
RESUME_TAG = f"step_{CHECKPOINT_EVERY:08d}"


def _copy_at_checkpoint(source: Path, target: Path) -> None:
    """The reference run as it was right after its first checkpoint."""
    shutil.copytree(source, target)
    for later in (target / "checkpoints").glob("step_*"):
        if later.name > RESUME_TAG:
            shutil.rmtree(later)
    (target / "checkpoints" / "latest").write_text(RESUME_TAG)


@pytest.mark.parametrize("ranks, ep_size", [(1, 1), (4, 4)])
def test_ep2_checkpoint_resumes_at_another_layout_with_optimizer_state(tmp_path, ranks, ep_size):
    reference = token_choice_ep2()
    run_dir = tmp_path / f"ep{ep_size}"
    _copy_at_checkpoint(reference, run_dir)

    output = launch(ranks, run_dir, [*TOKEN_CHOICE, *layout(ranks, ep_size)], script=WORKER)
    assert f"{RESUME_TAG} saved at 2 ranks, ep_size 2" in output
    for rank in range(ranks):
        assert f"rank {rank}: verified" in output, output[-4000:]

    expected, resumed = train_records(reference), train_records(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # lines before the checkpoint kept
    loss_diff, norm_diff = max_differences(expected[CHECKPOINT_EVERY:], resumed[CHECKPOINT_EVERY:])
    final = f"step_{STEPS:08d}"
    weights_a, weights_b = saved_weights(reference, final), saved_weights(run_dir, final)
    weight_diff = max(float((weights_a[k] - weights_b[k]).abs().max()) for k in weights_a)
    print(f"\nresume ep2 (2 ranks) -> ep{ep_size} ({ranks} rank{'s' if ranks > 1 else ''}) at step {CHECKPOINT_EVERY}, steps "
          f"{CHECKPOINT_EVERY + 1}-{STEPS} vs continuing at ep2: max |loss diff| {loss_diff:.3g}, "
          f"max |grad-norm diff| {norm_diff:.3g}, max |weight diff| {weight_diff:.3g}")
    assert loss_diff <= TOLERANCE and norm_diff <= TOLERANCE and weight_diff <= WEIGHT_TOLERANCE
    # The resumed run writes layout-free state of its own layout: it can move again.
    assert (run_dir / "checkpoints" / final / "portable" / "index.json").exists()
