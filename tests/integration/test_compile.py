"""trainer.compile=true: the model compiled by inductor (dense parts and MoE layers) gives the eager
run's trajectory, with activation checkpointing too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train.loop import train

ROOT = Path(__file__).resolve().parents[2]


def _losses(run_dir: Path) -> list[tuple[int, float, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records if r["event"] == "train"]


@pytest.mark.slow
def test_compiled_model_follows_the_eager_trajectory(compose_run, tmp_path):
    overrides = [
        "model=gpt_tiny", "moe.every=2", "trainer.max_steps=4", "trainer.micro_batch_size=4",
        "trainer.eval_every=0", "trainer.eval_batches=1", "trainer.checkpoint_every=0", "logging.log_every=1",
        "logging.progress_bar=false", "logging.plots=off", f"data.cache_dir={ROOT / '.cache' / 'data'}",
    ]  # fmt: skip
    torch._dynamo.reset()
    train(compose_run([*overrides, f"trainer.run_dir={tmp_path / 'eager'}"]))
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    train(compose_run([*overrides, f"trainer.run_dir={tmp_path / 'compiled'}", "trainer.compile=true"]))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames_before, "nothing was compiled"

    # Checkpointed blocks run their compiled parts again in the backward pass (the MoE layer's
    # recomputation under its own guard: tests/unit/test_moe_compile.py).
    train(compose_run([*overrides, f"trainer.run_dir={tmp_path / 'checkpointed'}", "trainer.compile=true",
                       "trainer.activation_checkpointing=true"]))

    eager = _losses(tmp_path / "eager")
    assert [s for s, _, _ in eager] == [1, 2, 3, 4]
    for variant in ("compiled", "checkpointed"):
        compiled = _losses(tmp_path / variant)
        assert [s for s, _, _ in compiled] == [1, 2, 3, 4], variant
        for (_, loss_e, norm_e), (_, loss_c, norm_c) in zip(eager, compiled, strict=True):
            # Fused kernels round differently from eager ones: close, not bitwise.
            assert loss_c == pytest.approx(loss_e, rel=1e-4, abs=1e-4), variant
            assert norm_c == pytest.approx(norm_e, rel=1e-3, abs=1e-4), variant
    torch._dynamo.reset()
