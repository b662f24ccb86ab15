"""Resuming, beyond the trajectory (test_kill_resume, test_preempt_resume): the whole-run expert
figures in summary.json survive a crash between two logged steps; a finished run is left alone; a
checkpoint past trainer.max_steps, or one that no longer fits the model, is refused in one line and
leaves the run directory's config.yaml as it was; changed settings are printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.config import ConfigError
from train.loop import Trainer, train

ROOT = Path(__file__).resolve().parents[2]


def _overrides(run_dir: Path, steps: int, *extra: str) -> list[str]:
    # Saves at step 3; logs (and so folds the expert counts into the run's total) only at 4 and
    # at the end: the step-3 checkpoint falls inside an unlogged window.
    return [
        "model=gpt_tiny", f"trainer.max_steps={steps}", "trainer.micro_batch_size=4", "trainer.eval_every=0",
        "trainer.eval_batches=1", "trainer.checkpoint_every=3", "logging.log_every=4", "logging.progress_bar=false",
        "logging.plots=off", "trainer.peak_tflops=1", f"data.cache_dir={ROOT / '.cache' / 'data'}",
        f"trainer.run_dir={run_dir}", *extra,
    ]


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_resume_keeps_whole_run_figures_leaves_a_finished_run_and_refuses_what_cannot_resume(
    compose_run, tmp_path, monkeypatch, capsys
):
    reference = train(compose_run(_overrides(tmp_path / "reference", 6)))

    original_step = Trainer.train_step

    def crash_after_the_save(self, step):
        if step == 3:  # the fourth step: after the step-3 save, before the step-4 log
            raise _Crash()
        return original_step(self, step)

    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", crash_after_the_save)
        with pytest.raises(_Crash):
            train(compose_run(_overrides(run_dir, 6)))
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
    resumed = train(compose_run(_overrides(run_dir, 6, "trainer.resume=true")))
    assert resumed["steps_this_session"] == 3 and resumed["initial_val_loss_on_other_windows"] is False
    # Steps 1-3 were counted in the first session only, and never logged there.
    assert resumed["experts"] == reference["experts"]
    routed = sum(resumed["experts"]["moe_layer_0"]["routed"])
    assert routed == 6 * 4 * 32 * 2  # steps x rows x tokens x top-2

    config, summary = (run_dir / "config.yaml").read_bytes(), (run_dir / "summary.json").read_bytes()
    capsys.readouterr()

    # Already at trainer.max_steps: nothing trained, nothing rewritten, no error.
    done = train(compose_run(_overrides(run_dir, 6, "trainer.resume=true")))
    assert done == {"run_dir": str(run_dir), "already_complete": True, "checkpoint": "step_00000006"}
    assert "already trained to its trainer.max_steps" in capsys.readouterr().out
    assert (run_dir / "summary.json").read_bytes() == summary and (run_dir / "config.yaml").read_bytes() == config

    with pytest.raises(ConfigError, match=r"trainer.max_steps=5 is below the step of the checkpoint .* step 6"):
        train(compose_run(_overrides(run_dir, 5, "trainer.resume=true")))

    with pytest.raises(ConfigError) as mismatch:
        train(compose_run(_overrides(run_dir, 8, "trainer.resume=true", "model.hidden_size=32")))
    message = str(mismatch.value)
    assert "\n" not in message and "does not fit the model" in message and "size mismatch for" in message
    assert "model.hidden_size 64 -> 32" in message
    assert (run_dir / "config.yaml").read_bytes() == config  # eval, generate and export still read the run

    capsys.readouterr()
    longer = train(compose_run(_overrides(run_dir, 8, "trainer.resume=true", "deepspeed.lr=0.001")))
    assert longer["steps_this_session"] == 2
    out = capsys.readouterr().out
    assert "settings changed since the last save: deepspeed.lr 0.003 -> 0.001, trainer.max_steps 6 -> 8" in out
    assert "max_steps: 8" in (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8
    assert "measured on other validation windows" not in out

    # Validated on other windows than at the start: the closing line says its first figure is not comparable.
    other = train(compose_run(_overrides(run_dir, 9, "trainer.resume=true", "deepspeed.lr=0.001", "trainer.eval_batches=2")))
    assert other["initial_val_loss_on_other_windows"] is True
    assert "measured on other validation windows" in capsys.readouterr().out


@pytest.mark.slow
def test_a_resume_killed_before_its_first_save_leaves_the_checkpoints_settings_in_charge(
    compose_run, tmp_path, monkeypatch, capsys
):
    """The run directory's config.yaml follows a resumed run from its start; each checkpoint keeps the
    settings it was trained with, and readers (a later resume, eval, generate, export) take those."""
    from train import checkpoint
    from train.load import load_model

    run_dir = tmp_path / "run"
    train(compose_run(_overrides(run_dir, 3)))  # step_00000003, top-2
    original_save = checkpoint.save

    def killed_saving_step_6(*args, **kwargs):
        if args[2] == 6:  # as a SIGKILL mid-save leaves it: part of the tag written, no cleanup
            (args[1] / "step_00000006").mkdir()
            (args[1] / "step_00000006" / "mp_rank_00_model_states.pt").write_bytes(b"half")
            raise _Crash()
        return original_save(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save", killed_saving_step_6)
        with pytest.raises(_Crash):
            train(compose_run(_overrides(run_dir, 6, "trainer.resume=true", "moe.top_k=1")))
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000003"
    assert "top_k: 1" in (run_dir / "config.yaml").read_text()  # ahead of `latest`: the session had started
    assert load_model(run_dir).run.moe.top_k == 2  # the weights' own settings
    capsys.readouterr()
    train(compose_run(_overrides(run_dir, 4, "trainer.resume=true")))
    out = capsys.readouterr().out
    assert "settings changed since the last save: trainer.max_steps 3 -> 4" in out
    assert "removed step_00000006, a save that did not finish" in out and not (run_dir / "checkpoints" / "step_00000006").exists()
    assert "top_k: 2" in (run_dir / "checkpoints" / "step_00000004" / "config.yaml").read_text()
    # The tokenizer the weights go with is in the tag too, and is the one readers take.
    assert load_model(run_dir).tokenizer_file == run_dir / "checkpoints" / "step_00000004" / "tokenizer.json"
    assert load_model(run_dir).tokenizer_file.read_text() == (run_dir / "tokenizer.json").read_text()
