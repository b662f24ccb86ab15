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
    # The step-4 record averages steps 1-4 as in the run never stopped: the checkpoint carried each
    # rank's unlogged losses and counts (it averaged step 4 alone before).
    def records(directory):
        kept = ("event", "step", "tokens", "loss", "aux_loss", "lr", "grad_norm", "experts", "val_loss")
        lines = (directory / "metrics.jsonl").read_text().splitlines()
        return [{k: r[k] for k in kept if k in r} for r in map(json.loads, lines)]

    assert records(run_dir) == records(tmp_path / "reference")
    assert resumed["final_train_loss"] == reference["final_train_loss"]
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
    # More experts than were saved: files the checkpoint never had, not a damaged checkpoint.
    with pytest.raises(ConfigError) as more:
        train(compose_run(_overrides(run_dir, 8, "trainer.resume=true", "moe.num_experts=16")))
    message = str(more.value)
    assert "\n" not in message and "does not fit the model" in message and "moe.num_experts 8 -> 16" in message
    assert "(no layer_0_expert_8_mp_rank_00_model_states.pt in it)" in message and "earlier" not in message
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

    # A resume with a larger global batch counts the earlier steps' tokens at their own batch.
    bigger = train(compose_run(_overrides(run_dir, 10, "trainer.resume=true", "deepspeed.lr=0.001", "trainer.eval_batches=2",
                                          "trainer.grad_accum=2")))
    assert bigger["tokens"] == 9 * 4 * 32 + 1 * 8 * 32
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 10 and last["tokens"] == bigger["tokens"]


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


@pytest.mark.slow
def test_a_resume_at_the_same_layout_applies_the_changed_optimizer_settings(compose_run, tmp_path):
    # DeepSpeed's load brings the saved run's lr, betas and weight decay back into the optimizer; a
    # resume that changed them ran on with the old ones (at another layout the new ones applied).
    from train import checkpoint
    from train.config import to_run_config
    from train.distributed import init_world
    from train.loop import build_trainer

    run_dir = tmp_path / "run"
    base = [*_overrides(run_dir, 3), "logging.log_every=1", "deepspeed.warmup_steps=4", "deepspeed.lr=1e-3"]
    train(compose_run(base))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # The first step already learns (DeepSpeed's WarmupCosineLR ran steps 1 and 2 at lr 0).
    assert [r["lr"] for r in records if r["event"] == "train"] == pytest.approx([2.5e-4, 5e-4, 7.5e-4])

    changed = ["deepspeed.lr=2e-3", "deepspeed.weight_decay=0.5", "deepspeed.beta1=0.8", "deepspeed.eps=1e-6"]
    run = to_run_config(compose_run([*base, "trainer.max_steps=6", "trainer.resume=true", *changed]))
    trainer = build_trainer(run, init_world(run.trainer.device), lambda: run_dir)
    checkpoint.load(trainer.engine, run_dir / "checkpoints", 0)
    groups = trainer.engine.optimizer.param_groups
    assert {group["weight_decay"] for group in groups} == {0.5, 0.0}  # norms keep none
    assert all(group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 for group in groups)
    assert all(group["lr"] == pytest.approx(2e-3 * 1.0) for group in groups)  # step 4 of a 4-step warm-up


@pytest.mark.slow
def test_a_tensor_parallel_checkpoint_at_another_layout_is_refused_in_one_line(tmp_path):
    # Tensor-parallel saves wrote no portable index, so a resume at another layout went on to
    # DeepSpeed's full load and failed on every rank with a traceback.
    from types import SimpleNamespace

    import torch

    from train import checkpoint, portable_state
    from train.distributed import init_world
    from train.rank_writes import RankWrites

    init_world("cpu")

    def engine(tensor_parallel: int):
        return SimpleNamespace(mp_world_size=tensor_parallel, module=torch.nn.Linear(2, 2),
                               zero_optimization_stage=lambda: 1, bfloat16_enabled=lambda: False,
                               optimizer=SimpleNamespace(param_groups=[]))

    tag = tmp_path / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")  # there in a real save; never read here
    writes = RankWrites(0)
    portable_state.save(engine(2), tag, writes)
    assert writes.failure is None
    index = portable_state.read_index(tag)
    assert index["tensors"] is False and index["layout"]["tensor_parallel"] == 2
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002")
    with pytest.raises(ConfigError, match=r"saved at 1 rank, ep_size -, tensor parallel 2, ZeRO-1, fp32; resuming it at "
                                          r"1 rank, ep_size -, tensor parallel 1, ZeRO-1, fp32 is not supported with "
                                          r"tensor parallelism$"):
        checkpoint.load(engine(1), tmp_path / "checkpoints", 0)


@pytest.mark.slow
def test_data_that_changed_since_training_is_refused_by_resume_and_eval(compose_run, tmp_path):
    # Changed files give a newly trained tokenizer of the same size: the weights would load, and
    # every id would mean other text. Resume went on training; eval scored the model on that text.
    from train.load import load_model

    corpus = tmp_path / "corpus.jsonl"
    words = ["river", "stone", "light", "paper", "window", "garden", "signal", "harbour", "winter", "copper"]
    corpus.write_text("".join(json.dumps({"text": " ".join(words[(i * j) % 10] for j in range(60))}) + "\n"
                              for i in range(200)))
    run_dir = tmp_path / "run"
    overrides = [*_overrides(run_dir, 3), "data=files", f"data.files=[{corpus}]", "data.vocab_size=300",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.1"]
    train(compose_run(overrides))
    assert load_model(run_dir).validation_data_dir()  # unchanged data: found

    with corpus.open("a") as more:  # new words, frequent enough to change the tokenizer's merges
        more.write("".join(json.dumps({"text": "quartz zephyr vortex " * 30}) + "\n" for _ in range(100)))
    with pytest.raises(ConfigError, match=r"^trainer.resume: the data's tokenizer \(.*\) is not the one the checkpoint "
                                          r"was trained with \(.*step_00000003/tokenizer.json\): data.files or"):
        train(compose_run([*overrides[:1], "trainer.max_steps=6", *overrides[2:], "trainer.resume=true"]))
    with pytest.raises(ConfigError, match=r"has another tokenizer than the model's .*: data.files changed since training"):
        load_model(run_dir).validation_data_dir()


@pytest.mark.slow
def test_a_save_marks_its_tag_complete_last_and_a_broken_latest_is_one_line(compose_run, tmp_path, monkeypatch):
    """The tag's config.yaml (what marks a tag complete when `latest` is missing) is written after
    every other file of the tag is durable, and the checkpoints folder's entry is durable before
    `latest` names the tag; a `latest` naming no checkpoint, or a checkpoint file cut short, is
    refused in one line, not a traceback from DeepSpeed or torch."""
    from train import checkpoint

    order: list[str] = []
    real_fsync, real_write = checkpoint.fsync_path, checkpoint.write_text_atomically
    monkeypatch.setattr(checkpoint, "fsync_path", lambda path: (order.append(str(path)), real_fsync(path))[1])
    monkeypatch.setattr(checkpoint, "write_text_atomically",
                        lambda path, text: (order.append(f"write {path}"), real_write(path, text))[1])
    run_dir = tmp_path / "run"
    train(compose_run(_overrides(run_dir, 3)))
    monkeypatch.undo()
    tag_dir, checkpoints = run_dir / "checkpoints" / "step_00000003", run_dir / "checkpoints"
    config_at = order.index(f"write {tag_dir / 'config.yaml'}")
    tag_files = [i for i, path in enumerate(order) if path.startswith(str(tag_dir) + "/") and not path.endswith("config.yaml")]
    assert tag_files and max(tag_files) < config_at
    assert config_at < order.index(str(checkpoints)) < order.index(f"write {checkpoints / 'latest'}")

    (checkpoints / "latest").write_text("step_00000004")
    with pytest.raises(ConfigError, match=r"names .step_00000004., which is not a checkpoint in"):
        train(compose_run(_overrides(run_dir, 6, "trainer.resume=true")))
    (checkpoints / "latest").write_text("step_00000003")
    states = tag_dir / "mp_rank_00_model_states.pt"
    whole = states.read_bytes()
    states.write_bytes(whole[:1000])  # a copy stopped by a full disk
    with pytest.raises(ConfigError) as broken:
        train(compose_run(_overrides(run_dir, 6, "trainer.resume=true")))
    assert str(broken.value).startswith(f"{states}: cut short") and "\n" not in str(broken.value)
    second_entry = whole.index(b"PK\x03\x04", 4)  # damaged inside: the archive's end is intact
    states.write_bytes(whole[:second_entry] + b"XXXX" + whole[second_entry + 4:])
    with pytest.raises(ConfigError) as broken:
        train(compose_run(_overrides(run_dir, 6, "trainer.resume=true")))
    assert str(broken.value).startswith(f"{tag_dir}: not a readable checkpoint") and "\n" not in str(broken.value)
    # Empty, or cut where torch's reader fails with EOFError or EINVAL rather than RuntimeError.
    for size in (0, 5000):
        states.write_bytes(whole[:size])
        with pytest.raises(ConfigError) as broken:
            train(compose_run(_overrides(run_dir, 6, "trainer.resume=true")))
        assert str(broken.value).startswith(f"{states}: cut short"), (size, str(broken.value))
    states.write_bytes(whole)
    # Without this rank's RNG file the resume would not be exact, and would not say so.
    (tag_dir / "rng_rank00000.pt").unlink()
    with pytest.raises(ConfigError, match=rf"^{tag_dir}: not a readable checkpoint \(rng_rank00000.pt missing\); resume from"):
        train(compose_run(_overrides(run_dir, 6, "trainer.resume=true")))


@pytest.mark.slow
def test_auto_resume_starting_over_clears_a_killed_first_save(compose_run, tmp_path, capsys):
    # What a first save killed before its tag was complete leaves: files, no config.yaml, no `latest`;
    # here one from another layout, which the new save into the same tag must not keep.
    run_dir = tmp_path / "run"
    killed = run_dir / "checkpoints" / "step_00000003"
    killed.mkdir(parents=True)
    (killed / "mp_rank_01_model_states.pt").write_bytes(b"from a 2-rank layout")
    (run_dir / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n')  # the killed attempt's
    # Starting the record over needs the disk: where that fails, one line (from rank 0, on every rank).
    from train import metrics

    def full_disk(path, text):
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "write_text_atomically", full_disk)
        with pytest.raises(ConfigError) as refused:
            train(compose_run(_overrides(run_dir, 3, "trainer.auto_resume=true")))
    assert str(refused.value) == f"trainer.run_dir: cannot prepare {run_dir} for a new start: [Errno 28] No space left on device"
    train(compose_run(_overrides(run_dir, 3, "trainer.auto_resume=true")))
    assert "removed step_00000003, a save that did not finish" in capsys.readouterr().out
    assert not (killed / "mp_rank_01_model_states.pt").exists() and (killed / "config.yaml").is_file()


@pytest.mark.slow
def test_a_run_directory_in_use_by_another_run_is_refused_in_one_line(compose_run, tmp_path):
    """A second job training into the same directory (a requeued job and a hand-made copy) would
    save into the same tags: refused while the first holds the directory, allowed once it is gone."""
    from train.run_lock import RunDirectoryLock

    run_dir = tmp_path / "run"
    train(compose_run(_overrides(run_dir, 3)))
    other = RunDirectoryLock(run_dir)
    assert other.acquire() is None  # the first job, still training
    with pytest.raises(ConfigError) as refused:
        train(compose_run(_overrides(run_dir, 6, "trainer.resume=true")))
    assert str(refused.value).startswith(f"trainer.run_dir: {run_dir} is in use by another training run (pid ")
    # Past the start-up check (the other run took the directory while this one built its engine):
    # rank 0's own lock refuses it before it writes anything.
    from train import loop

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "checked_for_start", lambda run, *args: run)
        with pytest.raises(ConfigError, match=r"is in use by another training run \(pid "):
            train(compose_run(_overrides(run_dir, 6, "trainer.resume=true")))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    other.release()
    train(compose_run(_overrides(run_dir, 6, "trainer.resume=true")))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"


@pytest.mark.slow
def test_a_run_directory_that_cannot_be_written_is_one_line_at_the_start_and_at_the_end(compose_run, tmp_path):
    """Rank 0 writes the run's config.yaml at the start and summary.json at the end; a full disk there
    is one line on every rank (rank 0 reports it through the broadcast the others wait at, instead of
    raising alone)."""
    from train import loop

    run_dir = tmp_path / "run"
    written = loop.write_text_atomically

    def full_disk(path, text):
        if path == run_dir / "config.yaml":
            raise OSError(28, "No space left on device")
        written(path, text)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "write_text_atomically", full_disk)
        with pytest.raises(ConfigError) as refused:
            train(compose_run(_overrides(run_dir, 3)))
    assert str(refused.value) == f"trainer.run_dir: cannot write into {run_dir}: [Errno 28] No space left on device"
    # And at the end: the summary that cannot be written is one line on every rank, the run itself saved.
    written = loop.write_text_atomically

    def full_at_the_end(path, text):
        if path.name == "summary.json":
            raise OSError(28, "No space left on device")
        written(path, text)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "write_text_atomically", full_at_the_end)
        with pytest.raises(ConfigError) as refused:
            train(compose_run(_overrides(tmp_path / "ends", 3)))
    assert str(refused.value) == (f"trainer.run_dir: could not write {tmp_path / 'ends' / 'summary.json'} (No space left on "
                                  "device); the run finished and its checkpoint step_00000003 is saved")


@pytest.mark.slow
def test_metrics_the_disk_refused_stop_the_next_save_and_a_resume_logs_them_again(compose_run, tmp_path, capsys):
    """metrics.jsonl cannot be written from step 4 on (a full disk): training goes on with the records
    held, the save at step 6 stops every rank with one line and leaves `latest` at step 3, and once
    there is room a resume redoes steps 4-6: every step is in metrics.jsonl once."""
    import builtins

    from train import checkpoint, metrics
    from train.checkpoint import CheckpointNotSaved

    run_dir = tmp_path / "run"
    calls = {"n": 0}

    def disk_fills_after_step_3(file, mode="r", **kwargs):
        if Path(file).name == "metrics.jsonl" and "a" in mode:
            calls["n"] += 1
            if calls["n"] > 4:  # the step-0 evaluation and steps 1-3 go in
                raise OSError(28, "No space left on device")
        return builtins.open(file, mode, **kwargs)

    overrides = [*_overrides(run_dir, 6), "logging.log_every=1"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "open", disk_fills_after_step_3, raising=False)
        with pytest.raises(CheckpointNotSaved) as refused:
            train(compose_run(overrides))
    metrics_file = run_dir / "metrics.jsonl"
    assert str(refused.value).startswith(f"checkpoint step_00000006 not saved: rank 0 could not write {metrics_file} "
                                         "(No space left on device; ")
    assert str(refused.value).endswith(f"records held in memory); {run_dir / 'checkpoints' / 'latest'} still names "
                                       "step_00000003, the last complete one")
    assert checkpoint.latest_tag(run_dir / "checkpoints") == "step_00000003"
    def trained_steps():
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in records if r["event"] == "train"]

    assert trained_steps() == [1, 2, 3]
    train(compose_run([*overrides, "trainer.resume=true"]))
    assert trained_steps() == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_a_complete_checkpoint_after_a_hand_set_latest_is_set_aside_not_deleted(compose_run, tmp_path, capsys):
    """`latest` set back by hand (past a loss spike): the resumed run saves its own step 6, so the
    abandoned run's step_00000006 moves to checkpoints/set_aside/ whole, for the user to keep or delete."""
    from train import checkpoint

    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    train(compose_run(_overrides(run_dir, 6)))
    abandoned = sorted(path.name for path in (checkpoints / "step_00000006").iterdir())
    (checkpoints / "latest").write_text("step_00000003")
    capsys.readouterr()
    train(compose_run(_overrides(run_dir, 6, "trainer.resume=true", "deepspeed.lr=1e-4")))
    out = capsys.readouterr().out
    (kept,) = (checkpoints / checkpoint.SET_ASIDE).iterdir()
    assert kept.name.startswith("step_00000006-") and sorted(path.name for path in kept.iterdir()) == abandoned
    assert f"resume      moved step_00000006, newer than the one `latest` names, to {kept}" in out
    assert "lr: 0.0001" in (checkpoints / "step_00000006" / "config.yaml").read_text()  # the resumed run's own
    assert "lr: 0.0001" not in (kept / "config.yaml").read_text()
    assert checkpoint.latest_tag(checkpoints) == "step_00000006"
    # A move that fails (a full disk after a crash) stops the resume in one line, on every rank.
    (checkpoints / "latest").write_text("step_00000003")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "set_aside", lambda tag_dir: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        with pytest.raises(ConfigError) as refused:
            train(compose_run(_overrides(run_dir, 6, "trainer.resume=true")))
    assert str(refused.value) == (f"trainer.run_dir: cannot prepare {run_dir} for the resume: "
                                  "[Errno 28] No space left on device")
