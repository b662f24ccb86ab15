"""Console entry points. `@hydra.main` is a thin wrapper: the work is in `train.loop.train`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig

from train.config import ConfigError, RunConfig, register_schemas

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_schemas()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_train(cfg: DictConfig) -> None:
    train_command(cfg)


def train_command(cfg: DictConfig) -> None:
    """`train(cfg)` as the command runs it: a user's mistake is one line and exit status 2, a
    second Ctrl-C one line and 130."""
    from train.distributed import close_world
    from train.loop import train

    try:
        train(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except SystemExit:  # an agreed stop (preemption, Ctrl-C, non-finite losses): every rank is here
        close_world()
        raise
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, not at the step boundary
        print("interrupted at once: no checkpoint for this step (the last saved one is intact)", file=sys.stderr, flush=True)
        sys.exit(130)
    # Not after other exceptions: a rank that crashed mid-collective leaves the others waiting,
    # and tearing NCCL down then could block its exit too.
    close_world()


def main() -> None:
    problem = override_problem(sys.argv[1:])
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        sys.exit(2)
    _hydra_train()


def launch_check(argv: list[str]) -> int:
    """The launch scripts' check before DeepSpeed starts a rank (`WORLD_SIZE SOURCE OVERRIDE...`):
    `settings_problem` with the start-up checks. 0 after printing, as the last line, the device type
    this machine's ranks will train on (cuda or cpu), or `planned` after a dry run's plan (the job is
    then done: nothing to start); or 2 after one `error:` line. Left to the ranks, each would
    print the same error after its seconds of start-up, under DeepSpeed's own lines (and a
    multi-node job's into its log files, away from the terminal)."""
    world_size, source, *overrides = argv
    cfg, problem = composed_overrides(overrides)
    if cfg is not None:
        problem = _settings_problem(cfg, int(world_size), source, before_start=True)
    if problem is None and cfg is not None and cfg.dry_run:  # the plan, printed here once rather than by every rank
        from train.loop import train

        try:
            train(cfg)
        except ConfigError as error:
            problem = str(error)
        else:
            print("planned", flush=True)
            return 0
    if problem is None:
        import torch

        print("cuda" if torch.cuda.is_available() else "cpu", flush=True)
        return 0
    print(f"error: {problem}", file=sys.stderr, flush=True)
    return 2


def override_problem(args: list[str]) -> str | None:
    """What is wrong with the command line's overrides, in one line; None when they compose
    (`composed_overrides`)."""
    return composed_overrides(args)[1]


def composed_overrides(args: list[str]) -> tuple[DictConfig | None, str | None]:
    """(the composed config, None), or (None, what is wrong with the overrides in one line).

    Hydra reports a bad override (a typo in a key, a value of the wrong type, an unknown config
    group option) in several lines of OmegaConf detail and exits 1; composing the same overrides
    first gives our own one-line `error:` and exit status 2, as every other bad input gets. With
    any Hydra flag (--multirun, --cfg, -cn, ...) Hydra's own parsing is left to do the job, as
    sweeps and other primary configs do not compose here.
    """
    if not Path(CONF_DIR, "config.yaml").is_file():
        # A non-editable install copies the packages, not conf/ beside them.
        return None, (f"no configs at {CONF_DIR}: moe-gpt runs from its checkout; install it editable there "
                      "(make install, or pip install -e .)")
    if any(arg.startswith("-") or arg.startswith("hydra.mode=") for arg in args):
        return None, None
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=args), None
    except MissingConfigException as error:
        missing, options = error.missing_cfg_file or "", error.options
        for arg in args:
            group, _, name = arg.lstrip("+~").partition("=")
            if missing == f"{group}/{name}":  # (`model=`, no name at all, is "model/")
                return None, _no_such_config(arg, group, options)
        return None, _one_line(str(error))
    except OverrideParseException as error:
        parser = OverridesParser.create()
        for arg in args:
            try:
                parser.parse_overrides([arg])
            except OverrideParseException as parse_error:
                return None, f"{arg!r} is not a valid override: {_first_line(str(parse_error))}"
        return None, _one_line(str(error))
    except ValueError as error:  # a config group given a number or null (`moe=null`): Hydra's own ValueError
        for arg in args:
            group, _, value = arg.lstrip("+~").partition("=")
            options = sorted(p.stem for p in Path(CONF_DIR, group).glob("*.yaml")) if group else []
            if options and value not in options:
                return None, _no_such_config(arg, group, options)
        return None, _one_line(str(error))
    except (HydraException, OmegaConfBaseException) as error:
        cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
        full_key = getattr(cause, "full_key", None)
        message = _first_line(getattr(cause, "msg", None) or str(cause))
        return None, f"{full_key}: {message}" if full_key else _one_line(str(error))


def _no_such_config(arg: str, group: str, options: list[str]) -> str:
    return f"{arg}: no such config" + (f"; {group} is one of {', '.join(options)}" if options else "")


def settings_problem(args: list[str], world_size: int | None = None, source: str = "given by the launcher",
                     before_start: bool = False, also: Callable[[RunConfig], None] | None = None) -> str | None:
    """What is wrong with the overrides (`override_problem`) or what the settings' own checks reject
    (a value out of range, moe.ep_size not dividing moe.num_experts, and with `world_size` the
    parallel degrees against it; `source` says where that number comes from), in one line; None
    when they pass. With `before_start`, on the machine that runs the job, also what a rank checks
    at start-up: the data files and the run directory (`train.loop.checked_for_start`). `also`: a
    caller's own check of the settings (raising ConfigError). Composed once, checked where no rank
    runs yet."""
    cfg, problem = composed_overrides(args)
    return problem if cfg is None else _settings_problem(cfg, world_size, source, before_start, also)


def _settings_problem(cfg: DictConfig, world_size: int | None, source: str, before_start: bool = False,
                      also: Callable[[RunConfig], None] | None = None) -> str | None:
    """`settings_problem` of an already composed config."""
    from train.config import to_run_config

    try:
        run = to_run_config(cfg)
        if also is not None:
            also(run)
        if world_size is None or run.dry_run:  # a dry run plans for its own world_size and starts nothing
            return None
        if before_start:
            from train.loop import checked_for_start

            checked_for_start(run, world_size, source)
        else:
            run.check_world_size(world_size, source)
    except ConfigError as error:
        return str(error)
    return None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    main()
