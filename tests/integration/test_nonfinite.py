"""NaN losses injected into a real `train(cfg)` run: skipped steps change nothing and are counted,
and `trainer.max_nonfinite_steps` in a row stop the run, leaving the last good checkpoint as `latest`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from train import loop
from train.model import GPT
from train.nonfinite import EXIT_STATUS, NonFiniteLossStop

ROOT = Path(__file__).resolve().parents[2]
ISOLATED, STREAK = {3}, {6, 7, 8}  # 1-based optimizer steps whose loss is NaN (grad_accum=1)


def _inject_nan_losses(monkeypatch, bad_steps: set[int]) -> None:
    """Training forward pass n (= optimizer step n here) returns NaN logits when n is in bad_steps."""
    original = GPT.forward
    calls = {"train": 0}

    def forward(self, tokens, *args, **kwargs):
        out = original(self, tokens, *args, **kwargs)
        if not self.training:
            return out
        calls["train"] += 1
        if calls["train"] in bad_steps:
            return dataclasses.replace(out, logits=out.logits * float("nan"))
        return out

    monkeypatch.setattr(GPT, "forward", forward)


def _record_state_after_each_step(monkeypatch) -> list[dict]:
    """Weights and the AdamW step count after every train_step."""
    snapshots: list[dict] = []
    original = loop.Trainer.train_step

    def train_step(self, step):
        result = original(self, step)
        inner = self.engine.optimizer.optimizer
        flat = self.engine.optimizer.single_partition_of_fp32_groups[0]
        snapshots.append({
            "weights": {n: p.detach().clone() for n, p in self.model.named_parameters()},
            "adam_step": int(inner.state[flat]["step"]) if flat in inner.state else 0,
            "lr": self.scheduler.get_last_lr()[0],
        })
        return result

    monkeypatch.setattr(loop.Trainer, "train_step", train_step)
    return snapshots


@pytest.mark.slow
def test_nan_steps_are_skipped_counted_and_a_streak_stops_the_run(compose_run, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    _inject_nan_losses(monkeypatch, ISOLATED | STREAK)
    after = _record_state_after_each_step(monkeypatch)
    overrides = [
        "model=gpt_tiny", "trainer.max_steps=10", "trainer.micro_batch_size=4", "trainer.checkpoint_every=1",
        "trainer.eval_every=0", "trainer.eval_batches=1", "trainer.max_nonfinite_steps=3", "logging.log_every=1",
        "logging.progress_bar=false", "deepspeed.warmup_steps=1", f"data.cache_dir={ROOT / '.cache' / 'data'}",
        f"trainer.run_dir={run_dir}",
    ]
    with pytest.raises(NonFiniteLossStop) as stop:
        loop.train(compose_run(overrides))

    # The stop: exit status 3 for the process, one line naming the streak and the good checkpoint.
    assert stop.value.code == EXIT_STATUS
    message = "error: 3 non-finite losses in a row (steps 6-8; trainer.max_nonfinite_steps=3); " \
              "stopped, the last good checkpoint is step_00000005"
    assert str(stop.value) == message
    assert capsys.readouterr().err.count(message) == 1

    # Skipped steps leave weights, AdamW's step count and the learning rate exactly as they were.
    def same_weights(a, b):
        return all(torch.equal(a["weights"][n], b["weights"][n]) for n in a["weights"])

    step = {i + 1: s for i, s in enumerate(after)}
    assert len(after) == 8
    assert same_weights(step[3], step[2]) and not same_weights(step[4], step[3])
    assert same_weights(step[8], step[5]) and same_weights(step[6], step[5])
    assert [step[i]["adam_step"] for i in range(1, 9)] == [1, 2, 2, 3, 4, 4, 4, 4]
    assert step[3]["lr"] == step[2]["lr"] and step[4]["lr"] != step[3]["lr"]
    assert all(torch.isfinite(w).all() for w in step[8]["weights"].values())

    # Counted in the metrics; a skipped step has no loss or gradient norm.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = {r["step"]: r for r in records if r["event"] == "train"}
    assert sorted(train_records) == [1, 2, 3, 4, 5, 6, 7]  # step 8 stopped the run before its line
    assert [train_records[i]["skipped_nonfinite"] for i in range(1, 8)] == [0, 0, 1, 1, 1, 2, 3]
    assert train_records[3]["loss"] is None and train_records[3]["grad_norm"] is None
    assert train_records[4]["loss"] is not None and train_records[4]["grad_norm"] > 0
    assert records[-1] == {"event": "stopped", "step": 8, "reason": "non-finite loss", "skipped_nonfinite": 4}

    # No checkpoint after a skipped step; `latest` still names the last good one.
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000005"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == [f"step_0000000{i}" for i in (1, 2, 4, 5)]
    assert not (run_dir / "summary.json").exists()
    # The sinks were finished all the same: the expert-load plots of the steps that ran are drawn.
    assert sorted(p.name for p in (run_dir / "plots").glob("*.png")), "no plots after the stop"


@pytest.mark.slow
def test_a_skipped_last_step_is_still_saved_and_the_streak_carries_over_a_resume(compose_run, tmp_path, monkeypatch):
    """The save that ends a run is made after a skipped step too (nothing was updated; without it the
    last steps would be lost, and skipped again at every resume), with the streak's count, which a
    resume carries on."""
    run_dir = tmp_path / "run"
    _inject_nan_losses(monkeypatch, {4, 5, 6})  # the 6th training forward is the resumed run's first
    overrides = [
        "model=gpt_tiny", "trainer.micro_batch_size=4", "trainer.checkpoint_every=2", "trainer.eval_every=0",
        "trainer.eval_batches=1", "trainer.max_nonfinite_steps=3", "logging.progress_bar=false",
        "deepspeed.warmup_steps=1", f"data.cache_dir={ROOT / '.cache' / 'data'}", f"trainer.run_dir={run_dir}",
    ]
    loop.train(compose_run([*overrides, "trainer.max_steps=5"]))
    checkpoints = run_dir / "checkpoints"
    # Step 4's periodic save is not made (skipped), step 5's final one is.
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000002", "step_00000005"]
    assert (checkpoints / "latest").read_text().strip() == "step_00000005"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 5

    with pytest.raises(NonFiniteLossStop, match=r"3 non-finite losses in a row \(steps 4-6;"):
        loop.train(compose_run([*overrides, "trainer.max_steps=8", "trainer.resume=true"]))


@pytest.mark.slow
def test_a_diverged_model_s_validation_is_logged_as_null_and_the_streak_still_stops_the_run(
    compose_run, tmp_path, monkeypatch
):
    # Every forward pass NaN from training step 3 on, evaluation included (weights gone to NaN): the
    # step-4 validation record must not stop rank 0 alone (JSON has no NaN), before the streak does.
    original = GPT.forward
    calls = {"train": 0}

    def forward(self, tokens, *args, **kwargs):
        out = original(self, tokens, *args, **kwargs)
        calls["train"] += self.training
        return dataclasses.replace(out, logits=out.logits * float("nan")) if calls["train"] >= 3 else out

    monkeypatch.setattr(GPT, "forward", forward)
    run_dir = tmp_path / "run"
    overrides = [
        "model=gpt_tiny", "trainer.max_steps=10", "trainer.micro_batch_size=4", "trainer.checkpoint_every=0",
        "trainer.eval_every=4", "trainer.eval_batches=1", "trainer.max_nonfinite_steps=5", "logging.log_every=1",
        "logging.progress_bar=false", "deepspeed.warmup_steps=1", f"data.cache_dir={ROOT / '.cache' / 'data'}",
        f"trainer.run_dir={run_dir}",
    ]
    with pytest.raises(NonFiniteLossStop, match=r"5 non-finite losses in a row \(steps 3-7"):
        loop.train(compose_run(overrides))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = {r["step"]: r for r in records if r["event"] == "eval"}
    assert evaluations[0]["val_loss"] > 0
    assert evaluations[4]["val_loss"] is None and evaluations[4]["val_ppl"] is None
