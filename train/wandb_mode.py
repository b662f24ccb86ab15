"""Which W&B mode a run gets, and whether it can log in: read from the environment and ~/.netrc,
without importing wandb (every rank checks this at start-up; only rank 0 opens the W&B run)."""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from urllib.parse import urlparse

ENV_MODES = {"online": "online", "run": "online", "shared": "shared", "offline": "offline", "dryrun": "offline",
             "disabled": "disabled"}
"""What wandb accepts in WANDB_MODE, as the mode passed on to it ("run" and "dryrun" are its older
names for online and offline; "shared", several writers to one run, is online and stays itself)."""
ONLINE_MODES = ("online", "shared")


def resolve_mode(setting: str, environ: Mapping[str, str] = os.environ) -> str:
    """`auto`: WANDB_MODE when the user set it, else online with an API key (WANDB_API_KEY, or the
    one `wandb login` stored), else offline. Never a login prompt: a rank cannot answer one."""
    if setting != "auto":
        return setting
    if environ.get("WANDB_MODE"):
        return ENV_MODES.get(environ["WANDB_MODE"], environ["WANDB_MODE"])
    return inferred_mode(environ)


def inferred_mode(environ: Mapping[str, str] = os.environ) -> str:
    """auto's choice where nothing names a mode: online with an API key, else offline."""
    return "online" if environ.get("WANDB_API_KEY") or _stored_api_key(environ) else "offline"


def falls_back_offline(setting: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a failure to reach W&B may turn the run offline rather than stop it: when online was
    only inferred from a stored key (`auto`, no WANDB_MODE), not asked for. A laptop or a compute node
    with a key and no route out is common, and its metrics are worth keeping for `wandb sync`."""
    return setting == "auto" and not environ.get("WANDB_MODE") and inferred_mode(environ) == "online"


def _stored_api_key(environ: Mapping[str, str]) -> bool:
    """Whether `wandb login` left a key for the W&B server in use: it writes one to ~/.netrc (or the
    file $NETRC names) under the server's host, which is where the README tells cluster users to keep
    it (never in the environment the launcher forwards to every node)."""
    url = urlparse(environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    path = environ.get("NETRC") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".netrc")
    try:
        stored = netrc.netrc(path)
    except (OSError, netrc.NetrcParseError):
        return False
    # wandb files a server on a port under host:port (its netloc), and a plain one under its host.
    for machine in dict.fromkeys(m for m in (url.netloc, url.hostname) if m):
        entry = stored.authenticators(machine)
        if entry is not None and entry[2]:
            return True
    return False


def online_without_key(setting: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why the run cannot log to W&B, in one line: WANDB_MODE names no mode wandb knows, or the mode
    resolves to online but no API key is found (wandb would stop the run with a traceback once the
    engine is built); else None."""
    if setting == "auto" and environ.get("WANDB_MODE") and environ["WANDB_MODE"] not in ENV_MODES:
        return (f"WANDB_MODE={environ['WANDB_MODE']}: not a W&B mode; expected one of {', '.join(ENV_MODES)} "
                "(or unset it: logging.wandb_mode=auto then goes online with an API key, else offline)")
    if resolve_mode(setting, environ) not in ONLINE_MODES or environ.get("WANDB_API_KEY") or _stored_api_key(environ):
        return None
    source = f"logging.wandb_mode={setting}" if setting != "auto" else f"WANDB_MODE={environ.get('WANDB_MODE', 'online')}"
    return (f"{source} needs a W&B API key: run `wandb login` (it stores the key in ~/.netrc) or set "
            "WANDB_API_KEY; or log offline with logging.wandb_mode=offline")
