"""train/wandb_mode.py: which W&B mode a run gets, and the one-line refusal of online without a key."""

from __future__ import annotations

import pytest

from train.wandb_mode import online_without_key, resolve_mode


@pytest.mark.parametrize(
    "setting, environ, mode",
    [
        ("auto", {}, "offline"),
        ("auto", {"WANDB_API_KEY": "k" * 40}, "online"),
        ("auto", {"WANDB_API_KEY": ""}, "offline"),
        ("auto", {"WANDB_API_KEY": "k" * 40, "WANDB_MODE": "offline"}, "offline"),
        ("offline", {"WANDB_API_KEY": "k" * 40}, "offline"),
        ("disabled", {}, "disabled"),
        # wandb's older names for the same modes.
        ("auto", {"WANDB_MODE": "run"}, "online"),
        ("auto", {"WANDB_MODE": "dryrun"}, "offline"),
        ("auto", {"WANDB_MODE": "shared"}, "shared"),  # online, several writers: passed on as it is
    ],
)
def test_mode(setting, environ, mode):
    assert resolve_mode(setting, {"HOME": "/nonexistent", **environ}) == mode


def test_a_key_stored_by_wandb_login_means_online(tmp_path):
    # `wandb login` writes the key to ~/.netrc under the server's host; the README tells cluster
    # users to keep it there rather than in the environment forwarded to every node.
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert resolve_mode("auto", {"HOME": str(tmp_path)}) == "online"
    assert resolve_mode("auto", {"HOME": str(tmp_path), "WANDB_MODE": "offline"}) == "offline"
    # A key for another server (a self-hosted one named by WANDB_BASE_URL) does not count.
    assert resolve_mode("auto", {"HOME": str(tmp_path), "WANDB_BASE_URL": "https://wandb.example.com"}) == "offline"
    other = tmp_path / "other.netrc"
    other.write_text("machine wandb.example.com login user password " + "k" * 40 + "\n")
    other.chmod(0o600)
    assert resolve_mode("auto", {"HOME": str(tmp_path), "NETRC": str(other),
                                 "WANDB_BASE_URL": "https://wandb.example.com"}) == "online"
    # A self-hosted server on a port: wandb files its key under host:port.
    other.write_text("machine localhost:8080 login user password " + "k" * 40 + "\n")
    assert resolve_mode("auto", {"HOME": str(tmp_path), "NETRC": str(other),
                                 "WANDB_BASE_URL": "http://localhost:8080"}) == "online"
    (tmp_path / ".netrc").write_text("this is not a netrc file")
    assert resolve_mode("auto", {"HOME": str(tmp_path)}) == "offline"


@pytest.mark.parametrize(
    "setting, environ, source",
    [
        ("online", {}, "logging.wandb_mode=online"),
        ("auto", {"WANDB_MODE": "online"}, "WANDB_MODE=online"),
        ("auto", {"WANDB_MODE": "run"}, "WANDB_MODE=run"),
        ("auto", {"WANDB_MODE": "shared"}, "WANDB_MODE=shared"),
    ],
)
def test_online_without_a_key_is_refused_by_name(setting, environ, source):
    problem = online_without_key(setting, {"HOME": "/nonexistent", **environ})
    assert problem is not None and problem.startswith(f"{source} needs a W&B API key") and "\n" not in problem
    # With a key, offline, or auto without a key (which goes offline), nothing to refuse.
    assert online_without_key(setting, {"HOME": "/nonexistent", "WANDB_API_KEY": "k" * 40, **environ}) is None
    assert online_without_key("offline", {"HOME": "/nonexistent"}) is None
    assert online_without_key("auto", {"HOME": "/nonexistent"}) is None


def test_an_unknown_wandb_mode_in_the_environment_is_refused_by_name():
    problem = online_without_key("auto", {"HOME": "/nonexistent", "WANDB_MODE": "ofline"})
    assert problem is not None and problem.startswith("WANDB_MODE=ofline: not a W&B mode; expected one of online")
    # logging.wandb_mode set by name wins over the environment, as wandb.init(mode=...) does.
    assert online_without_key("offline", {"HOME": "/nonexistent", "WANDB_MODE": "ofline"}) is None
