"""A checkpoint save that fails on one rank only (its disk is full) stops every rank at once, each
with the same one line, where the other ranks used to wait at the save's barrier for the process
group's timeout (no launcher stops ranks on other nodes of a `deepspeed --hostfile` run). Real
training, two gloo ranks at ep 2, DeepSpeed's own save."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from distributed.layout_runs import CHECKPOINT_EVERY, COMMON, TOKEN_CHOICE, layout
from distributed.processes import launch_ranks

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).resolve().parent / "save_failure_worker.py"


def test_a_full_disk_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, str(WORKER), *COMMON, *TOKEN_CHOICE, *layout(2, 2), f"trainer.run_dir={run_dir}"]
    # Both ranks exit with status 2 by themselves well inside gloo's 30-minute timeout.
    outputs = launch_ranks(2, command, cwd=tmp_path, timeout=240, status=2)
    tag = f"step_{CHECKPOINT_EVERY:08d}"
    for output in outputs:
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, output[-3000:]
        assert errors[0].startswith(f"error: checkpoint {tag} not saved: rank 1 could not write {run_dir / 'checkpoints' / tag}/")
        # torch's zip writer names no full disk, so the line adds the free space.
        assert re.search(r"optim_states\.pt \(RuntimeError: \[enforce fail at inline_container\.cc:\d+\] \. unexpected pos \d+ "
                         r"vs \d+; \d+ MiB free there\); no earlier checkpoint was saved$", errors[0]), errors[0]
        assert "Traceback" not in output
    # The part-written tag is gone, and no `latest` (DeepSpeed's recovery scripts stay beside the tags).
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["zero_to_fp32.py", "zero_to_torch.py"]
