"""W&B sink pieces that need no run: key mapping, rank gating, config errors (the mode: test_wandb_mode.py)
(the whole path, read back with wandb's reader, is tests/integration/test_wandb.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("wandb")  # a required dependency, but absent where only the GPU tests run (bench/gpu_all.sh)

from train.config import ConfigError, to_run_config  # noqa: E402
from train.sinks import open_sinks  # noqa: E402
from train.wandb_sink import wandb_items  # noqa: E402


def test_keys_pad_indices_to_the_last_index_and_skip_nulls():
    record = {"event": "train", "step": 7, "loss": 2.5, "grad_norm": None,
              "experts": {"moe_layer_3": {"cv": 0.25, "load": [0.5] + [0.05] * 10}}}
    items = wandb_items(record)
    assert items["train/loss"] == 2.5 and "train/grad_norm" not in items and "train/step" not in items
    assert items["experts/moe_layer_3/cv"] == 0.25
    assert items["experts/moe_layer_3/load/00"] == 0.5 and items["experts/moe_layer_3/load/10"] == 0.05
    assert len(items) == 1 + 1 + 11


def test_other_ranks_get_no_sink(compose_run, tmp_path):
    run = to_run_config(compose_run(["logging=wandb", "logging.wandb_mode=offline"]))
    assert open_sinks(run, is_main=False, run_dir=tmp_path).active == []
    assert not list(Path(tmp_path).iterdir()), "nothing written for a non-zero rank"


@pytest.mark.parametrize(
    "override, message",
    [("logging.wandb_mode=sometimes", "logging.wandb_mode must be auto, online, offline or disabled"),
     ("logging.plots=always", "logging.plots must be end, eval or off")],
)
def test_bad_logging_values_name_the_field(compose_run, override, message):
    with pytest.raises(ConfigError, match=message):
        to_run_config(compose_run(["logging=wandb", override]))


class _FakeRun:
    def define_metric(self, *args, **kwargs) -> None:
        pass


def _unreachable_online(calls: list[str]):
    """wandb.init as it behaves with a key and no route to the server: online fails, offline works."""
    import wandb

    def init(**kwargs):
        calls.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("Run initialization has timed out after 90.0 sec.\nmore")
        return _FakeRun()

    return init


def test_a_stored_key_without_network_logs_offline_with_one_warning(compose_run, tmp_path, monkeypatch, capsys):
    from train import wandb_sink

    calls: list[str] = []
    monkeypatch.setattr(wandb_sink.wandb, "init", _unreachable_online(calls))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    sink = wandb_sink.WandbSink(to_run_config(compose_run(["logging=wandb"])), tmp_path / "run")
    assert calls == ["online", "offline"] and sink.mode == "offline"
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("warning     W&B could not be reached (CommError: Run initialization has timed out")
    assert "\n" not in warning


@pytest.mark.parametrize("asked", [["logging.wandb_mode=online"], []])
def test_online_asked_for_by_name_stays_an_error(compose_run, tmp_path, monkeypatch, asked):
    import wandb

    from train import wandb_sink

    calls: list[str] = []
    monkeypatch.setattr(wandb_sink.wandb, "init", _unreachable_online(calls))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    if asked:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", "online")  # asked for through the environment instead
    with pytest.raises(wandb.errors.CommError):
        wandb_sink.WandbSink(to_run_config(compose_run(["logging=wandb", *asked])), tmp_path / "run")
    assert calls == ["online"]


@pytest.mark.parametrize("resume", [True, False])
def test_a_resume_continues_the_wandb_run_and_a_start_over_opens_a_new_one(compose_run, tmp_path, monkeypatch, resume):
    from train import wandb_sink

    ids: list[str] = []
    monkeypatch.setattr(wandb_sink.wandb, "init", lambda **kwargs: ids.append(kwargs["id"]) or _FakeRun())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / wandb_sink.RUN_ID_FILE).write_text("earlier0attempt")  # an attempt killed before its first checkpoint
    run = to_run_config(compose_run(["logging=wandb", "logging.wandb_mode=offline", f"trainer.run_dir={run_dir}",
                                     f"trainer.resume={str(resume).lower()}"]))
    wandb_sink.WandbSink(run, run_dir)
    assert (ids == ["earlier0attempt"]) is resume
    assert (run_dir / wandb_sink.RUN_ID_FILE).read_text() == ids[0]


def test_a_settings_error_under_auto_is_not_hidden_by_going_offline(compose_run, tmp_path, monkeypatch):
    import wandb

    from train import wandb_sink

    def init(**kwargs):
        raise wandb.errors.UsageError("entity my-team not found")  # reached W&B: the settings are wrong

    monkeypatch.setattr(wandb_sink.wandb, "init", init)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(wandb.errors.UsageError):
        wandb_sink.WandbSink(to_run_config(compose_run(["logging=wandb"])), tmp_path / "run")
