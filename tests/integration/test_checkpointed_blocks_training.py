"""trainer.activation_checkpointing=true inside the DeepSpeed engine: the same training, record for record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from train import activation_checkpointing
from train.loop import train

ROOT = Path(__file__).resolve().parents[2]
TIMING = ("tokens_per_s", "mfu")


def _records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("routing", [
    # jitter (random numbers redrawn in the recomputation) and bias balancing (step statistics)
    ["moe.jitter_eps=0.1", "moe.bias_update_rate=0.01"],
    ["moe=expert_choice"],  # thresholds gathered in the forward pass
], ids=["token-choice", "expert-choice"])  # fmt: skip
def test_checkpointed_run_writes_the_same_metrics(compose_run, tmp_path, routing, monkeypatch):
    overrides = [
        "model=gpt_tiny", *routing, "trainer.max_steps=4", "trainer.micro_batch_size=4", "trainer.grad_accum=2",
        "trainer.eval_every=2", "trainer.eval_batches=1", "trainer.checkpoint_every=0", "logging.log_every=1",
        "logging.progress_bar=false", "logging.plots=off", f"data.cache_dir={ROOT / '.cache' / 'data'}",
    ]  # fmt: skip
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return torch_checkpoint(*args, **kwargs)

    monkeypatch.setattr(activation_checkpointing, "checkpoint", counting_checkpoint)
    train(compose_run([*overrides, f"trainer.run_dir={tmp_path / 'plain'}"]))
    assert not calls
    train(compose_run([*overrides, f"trainer.run_dir={tmp_path / 'checkpointed'}", "trainer.activation_checkpointing=true"]))
    # Every block of every training micro-batch (2 layers x 2 micro-batches x 4 steps), none in evaluation.
    assert len(calls) == 2 * 2 * 4
    plain, checkpointed = _records(tmp_path / "plain"), _records(tmp_path / "checkpointed")
    assert [r["step"] for r in plain if r["event"] == "train"] == [1, 2, 3, 4]
    # Bitwise on the CPU: losses, gradient norms, every expert figure and the validation losses.
    assert checkpointed == plain
