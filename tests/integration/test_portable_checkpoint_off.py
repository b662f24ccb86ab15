"""trainer.portable_checkpoint=false: no layout-free optimizer copy is written; the checkpoint resumes
at its own layout and is refused, with one clear message, at another."""

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
    with pytest.raises(ValueError, match=r"trainer.portable_checkpoint=false, so it resumes only at that layout"):
        train(compose_run([*overrides, "trainer.max_steps=6", "trainer.resume=true", "deepspeed.zero_stage=1"]))
