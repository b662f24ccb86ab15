"""trainer.portable_checkpoint=false (never): no layout-free optimizer copy is written; the checkpoint
resumes at its own layout and is refused, with one clear message, at another. =final: only the save a
run ends on has the copy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.loop import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_checkpoint_without_portable_state_resumes_only_at_its_layout(compose_run, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        "model=gpt_tiny", "trainer.micro_batch_size=4", "trainer.eval_every=0", "trainer.eval_batches=1",
        "trainer.checkpoint_every=2", "logging.progress_bar=false", "logging.plots=off",
        "trainer.portable_checkpoint=false", f"data.cache_dir={ROOT / '.cache' / 'data'}", f"trainer.run_dir={run_dir}",
    ]  # fmt: skip
    train(compose_run([*overrides, "trainer.max_steps=2"]))
    portable = run_dir / "checkpoints" / "step_00000002" / "portable"
    assert sorted(p.name for p in portable.iterdir()) == ["index.json"]
    index = json.loads((portable / "index.json").read_text())
    assert index["tensors"] is False and index["files"] == {}

    # Same layout: DeepSpeed's own files carry everything.
    resumed = train(compose_run([*overrides, "trainer.max_steps=4", "trainer.resume=true"]))
    assert resumed["steps"] == 4 and resumed["steps_this_session"] == 2

    # Another layout (ZeRO stage 1 instead of 2): refused, naming the flag and both layouts.
    with pytest.raises(ValueError, match=r"trainer.portable_checkpoint=never, or =final before the last step\), so it "
                                         r"resumes only at that layout"):
        train(compose_run([*overrides, "trainer.max_steps=6", "trainer.resume=true", "deepspeed.zero_stage=1"]))


@pytest.mark.slow
def test_final_writes_the_copy_only_on_the_last_save(compose_run, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        "model=gpt_tiny", "deepspeed.precision=fp32", "trainer.micro_batch_size=4", "trainer.eval_every=0",
        "trainer.eval_batches=1", "trainer.checkpoint_every=1", "logging.progress_bar=false", "logging.plots=off",
        "trainer.portable_checkpoint=final", f"data.cache_dir={ROOT / '.cache' / 'data'}", f"trainer.run_dir={run_dir}",
        "trainer.max_steps=3",
    ]  # fmt: skip
    train(compose_run(overrides))
    checkpoints = run_dir / "checkpoints"

    def has_tensors(tag: str) -> bool:
        return json.loads((checkpoints / tag / "portable" / "index.json").read_text())["tensors"]

    assert [has_tensors(f"step_0000000{step}") for step in (1, 2, 3)] == [False, False, True]

    # The dry run's sizes: a periodic save and the last one, each within 10% of what was written.
    plan = train(compose_run([*overrides, "dry_run=true", "world_size=1"]))

    def written(tag: str) -> int:
        return sum(p.stat().st_size for p in (checkpoints / tag).rglob("*") if p.is_file())

    assert written("step_00000002") == pytest.approx(plan["checkpoint_gib_per_save"] * 2**30, rel=0.1)
    assert written("step_00000003") == pytest.approx(plan["checkpoint_gib_final_save"] * 2**30, rel=0.1)
    assert plan["checkpoint_gib_final_save"] > 1.5 * plan["checkpoint_gib_per_save"]
