"""One rank of a two-"node" job whose nodes do not share a cache directory (run by test_data_nodes.py,
2 processes): rank 1 plays the first rank of a second node (LOCAL_RANK 0) with a cache of its own.

    data_nodes_worker.py BASE_DIR CASE      CASE: ok | rank1_missing_file
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from train.cli import CONF_DIR
from train.config import ConfigError, to_run_config
from train.distributed import close_world, init_world
from train.loop import _prepared_data


def main(base: Path, case: str) -> None:
    rank = int(os.environ["RANK"])
    os.environ["LOCAL_RANK"] = "0"  # each rank the first of its node
    corpus = base / "corpus.jsonl"
    files = str(base / "missing.jsonl") if case == "rank1_missing_file" and rank == 1 else str(corpus)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["data=files", f"data.files=[{files}]", f"data.cache_dir={base / f'node{rank}'}",
                                           "data.vocab_size=300"])
    run = to_run_config(cfg)
    world = init_world("cpu")
    try:
        data_dir = _prepared_data(run, world)
        print(f"rank {rank}: prepared {data_dir}", flush=True)
    except ConfigError as error:
        print(f"rank {rank}: error {error}", flush=True)
    finally:
        close_world()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
