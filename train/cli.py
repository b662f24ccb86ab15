"""Console entry points. `@hydra.main` is a thin wrapper: the work is in `train.loop.train`."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from train.config import ConfigError, register_schemas

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_schemas()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_train(cfg: DictConfig) -> None:
    from train.distributed import close_world
    from train.loop import train

    try:
        train(cfg)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except SystemExit:  # an agreed stop (preemption, non-finite losses): every rank is here
        close_world()
        raise
    # Not after other exceptions: a rank that crashed mid-collective leaves the others waiting,
    # and tearing NCCL down then could block its exit too.
    close_world()


def main() -> None:
    _hydra_train()


if __name__ == "__main__":
    main()
